#!/bin/bash
# 25-epoch recipe row, issue 30: the default job unchanged, seed 0, rerun on 7134a2b so that its fit (the final
# weights on a fixed 5,000-image sample of the training split) is logged: the first-round default runs (4d13db1)
# kept no weights. Also tells whether 7134a2b reproduces default_seed0 (81.06 / 82.36 / 83.18%). W&B offline.
# code: alexnet-dist commit 7134a2b (a detached worktree of it), one CPU process, 2 threads
# Set CODE (a checkout of that commit), VENV (its environment) and DATA (the JPEG tree, see docs/results.md);
# the defaults are relative to this repository.
cd "$(dirname "$0")"
repo=$(cd ../../../.. && pwd)
CODE=${CODE:-$repo} VENV=${VENV:-$repo/.venv} DATA=${DATA:-$repo/data/cifar10-jpeg}
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  "$CODE/launch/train.py" --num_epochs 25 --dataset folder --data_dir "$DATA" \
  --run_dir run --save model.pth --seed 0 --tags recipe,default,fit
