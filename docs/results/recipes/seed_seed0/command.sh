#!/bin/bash
# 25-epoch recipe row: the seed's recipe (configs/recipes/seed.yaml), seed 0, W&B offline
# code: alexnet-dist commit 4d13db1 (a detached worktree of it), one CPU process
# Set CODE (a checkout of that commit), VENV (its environment) and DATA (the JPEG tree, see docs/results.md);
# the defaults are relative to this repository.
cd "$(dirname "$0")"
repo=$(cd ../../../.. && pwd)
CODE=${CODE:-$repo} VENV=${VENV:-$repo/.venv} DATA=${DATA:-$repo/data/cifar10-jpeg}
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  "$CODE/launch/train.py" --num_epochs 25 --dataset folder --data_dir "$DATA" \
  --recipe "$CODE/configs/recipes/seed.yaml" --run_dir run --save model.pth --tags recipe,seed
