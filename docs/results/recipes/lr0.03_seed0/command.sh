#!/bin/bash
# 25-epoch recipe row: the default with --lr 0.03, seed 0, W&B offline
# code: alexnet-dist commit 5623cce (a detached worktree of it), one CPU process, 2 threads (the thread fix 8a4b30d)
cd "$(dirname "$0")"
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 /work/main/.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  /work/recipe-code/5623cce/launch/train.py --num_epochs 25 --dataset folder --data_dir /work/data/cifar10-jpeg \
  --lr 0.03 --run_dir run --save model.pth --tags recipe,lr0.03
