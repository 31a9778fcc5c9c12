#!/usr/bin/env bash
# Example SLURM job: one `accelerate launch` per node, every node pointed at the head node.
#   sbatch launch/slurm.sh --num_epochs 25            (flags after the script go to train.py)
# Adjust the #SBATCH lines to your cluster; the global batch stays --batch_size (default 256)
# whatever the number of nodes and GPUs, so the results do not change with the allocation.
#SBATCH --job-name=alexnet-dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

export HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export NUM_PROCESSES=$((SLURM_NNODES * ${SLURM_GPUS_ON_NODE:-8}))
export WANDB_MODE=${WANDB_MODE:-offline}   # compute nodes often have no network: wandb sync afterwards

# single quotes: SLURM_NODEID is read on each node, and "$@" keeps every flag intact
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --multi_gpu --mixed_precision bf16 \
    --num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$HEAD_NODE" --main_process_port 29500 --rdzv_backend static --same_network \
    launch/train.py "$@"' _ "$@"
