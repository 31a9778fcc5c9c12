#!/bin/bash
# 25-epoch recipe row, issue 30: the combination of the winners so far, seed 0, W&B offline.
# translate 4 and fc1 scaled each ended at 83.22% ten-view validation, above the default's three-seed range
# (82.56-83.18%); conv1 from the data joins only if its own row also ended above 83.18% (decided by next.sh
# before this file ran, recorded in EXTRA below).
# code: alexnet-dist commit 7134a2b (a detached worktree of it), one CPU process, 2 threads
# Set CODE (a checkout of that commit), VENV (its environment) and DATA (the JPEG tree, see docs/results.md);
# the defaults are relative to this repository.
cd "$(dirname "$0")"
repo=$(cd ../../../.. && pwd)
CODE=${CODE:-$repo} VENV=${VENV:-$repo/.venv} DATA=${DATA:-$repo/data/cifar10-jpeg}
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
EXTRA=""
exec nice -n 19 "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  "$CODE/launch/train.py" --num_epochs 25 --dataset folder --data_dir "$DATA" \
  --translate 4 --first_linear_scaled $EXTRA --run_dir run --save model.pth --tags recipe,combo,seed0
