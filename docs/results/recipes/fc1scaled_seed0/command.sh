#!/bin/bash
# 25-epoch recipe row, issue 30 lever 1: fc1 at its real learning rate (--first_linear_scaled: fc1's own group at lr/36, weight decay x36), default lr 0.05, seed 0, W&B offline
# code: alexnet-dist commit be1a3ce (a detached worktree of it), one CPU process, 2 threads
cd "$(dirname "$0")"
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 /work/main/.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  /work/recipe-code/be1a3ce/launch/train.py --num_epochs 25 --dataset folder --data_dir /work/data/cifar10-jpeg \
  --first_linear_scaled --run_dir run --save model.pth --tags recipe,fc1scaled,seed0
