#!/bin/bash
# 25-epoch recipe candidate: the default job with --dropout 0.25 (one change), seed 0, W&B offline
cd "$(dirname "$0")"
export WANDB_MODE=offline WANDB_DIR="$PWD/wandb-dir"
mkdir -p "$WANDB_DIR"
exec nice -n 19 /work/main/.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  /work/main/launch/train.py --num_epochs 25 --dataset folder --data_dir /work/data/cifar10-jpeg \
  --dropout 0.25 --run_dir run --save model.pth --tags recipe,dropout0.25
