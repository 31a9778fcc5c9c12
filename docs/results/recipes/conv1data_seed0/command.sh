#!/bin/bash
# 25-epoch recipe row, issue 30 lever 4: conv1 started from the training images' whitened 11x11x3 patch statistics (--conv1_from_data), seed 0, W&B offline
# code: alexnet-dist commit 7134a2b (a detached worktree of it), one CPU process, 2 threads
cd "$(dirname "$0")"
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 /work/main/.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  /work/recipe-code/7134a2b/launch/train.py --num_epochs 25 --dataset folder --data_dir /work/data/cifar10-jpeg \
  --conv1_from_data --run_dir run --save model.pth --tags recipe,conv1data,seed0
