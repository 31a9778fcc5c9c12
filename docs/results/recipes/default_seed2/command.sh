#!/bin/bash
# 25-epoch recipe baseline, third seed: the default job with --seed 2 (its own split), W&B offline
# code: alexnet-dist commit 5623cce (a detached worktree of it), one CPU process, 2 threads (the thread fix 8a4b30d)
# Set CODE (a checkout of that commit), VENV (its environment) and DATA (the JPEG tree, see docs/results.md);
# the defaults are relative to this repository.
cd "$(dirname "$0")"
repo=$(cd ../../../.. && pwd)
CODE=${CODE:-$repo} VENV=${VENV:-$repo/.venv} DATA=${DATA:-$repo/data/cifar10-jpeg}
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  "$CODE/launch/train.py" --num_epochs 25 --dataset folder --data_dir "$DATA" \
  --seed 2 --run_dir run --save model.pth --tags recipe,default,seed2
