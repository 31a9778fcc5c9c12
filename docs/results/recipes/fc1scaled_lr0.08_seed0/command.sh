#!/bin/bash
# 25-epoch recipe row, issue 30 lever 1 at a higher peak lr: --first_linear_scaled --lr 0.08, seed 0, with the weights' average --ema 0.998 evaluated alongside (training unchanged), W&B offline
# code: alexnet-dist commit d96aeea (a detached worktree of it), one CPU process, 2 threads
# Set CODE (a checkout of that commit), VENV (its environment) and DATA (the JPEG tree, see docs/results.md);
# the defaults are relative to this repository.
cd "$(dirname "$0")"
repo=$(cd ../../../.. && pwd)
CODE=${CODE:-$repo} VENV=${VENV:-$repo/.venv} DATA=${DATA:-$repo/data/cifar10-jpeg}
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  "$CODE/launch/train.py" --num_epochs 25 --dataset folder --data_dir "$DATA" \
  --first_linear_scaled --lr 0.08 --ema 0.998 --run_dir run --save model.pth --tags recipe,fc1scaled,lr0.08,seed0
