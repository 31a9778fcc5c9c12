#!/bin/bash
# issue 30 lever 6, the budget: the default job unchanged at 50 epochs instead of 25 (the lr schedule stretches with it), seed 0, W&B offline
# code: alexnet-dist commit 7134a2b (a detached worktree of it), one CPU process, 2 threads
# Set CODE (a checkout of that commit), VENV (its environment) and DATA (the JPEG tree, see docs/results.md);
# the defaults are relative to this repository.
cd "$(dirname "$0")"
repo=$(cd ../../../.. && pwd)
CODE=${CODE:-$repo} VENV=${VENV:-$repo/.venv} DATA=${DATA:-$repo/data/cifar10-jpeg}
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  "$CODE/launch/train.py" --num_epochs 50 --dataset folder --data_dir "$DATA" \
  --run_dir run --save model.pth --tags recipe,default,epochs50
