#!/bin/bash
# 25-epoch recipe row, issue 30 lever 2: a local response normalisation that acts (--lrn_alpha 2 instead of the paper's 1e-4), seed 0, W&B offline
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
  --lrn_alpha 2 --run_dir run --save model.pth --tags recipe,lrn2,seed0
