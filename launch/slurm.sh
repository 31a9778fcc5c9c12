#!/usr/bin/env bash
# Example SLURM job: one torchrun per node, the nodes meeting at the head node (c10d rendezvous).
#   sbatch launch/slurm.sh --num_epochs 25                               (flags after the script go to train.py)
#   sbatch --nodes 4 --gpus-per-node 4 launch/slurm.sh --num_epochs 25   (sbatch's options win over the lines below)
#   MASTER_PORT=29600 sbatch launch/slurm.sh ...                         (the rendezvous port, if the default is taken)
# The counts come from the allocation: nodes from SLURM_NNODES, one process per GPU from SLURM_GPUS_ON_NODE (one
# per node without GPUs; NPROC_PER_NODE=N sets it). The #SBATCH lines are only what is asked for when sbatch is
# given no other: 2 nodes x 8 GPUs here; change them, or pass sbatch's options, for your cluster. The global batch
# stays --batch_size (default 256) whatever the allocation. runs/ and the data folder must be on a file system
# every node sees.
#SBATCH --job-name=alexnet-dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

# awk reads every name: `head` would close the pipe early, and pipefail would end the job with SIGPIPE (141)
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk "NR == 1")
# a port per job, so that two jobs whose head node is the same machine do not meet at one rendezvous
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export WANDB_MODE=${WANDB_MODE:-offline}   # compute nodes often have no network: wandb sync afterwards

# Something already listening on the port would keep the other nodes' launchers waiting for its
# answer for ever (torch's store client has no timeout there): refuse before any node starts.
if timeout 10 bash -c "exec 3<>/dev/tcp/$HEAD_NODE/$MASTER_PORT" 2>/dev/null; then
    echo "error: port $MASTER_PORT on $HEAD_NODE is already taken: submit again with MASTER_PORT set to a free port" >&2
    exit 1
fi

# c10d: every node runs the same command; if a node has not joined within join_timeout (600 s), the
# others stop with RendezvousTimeoutError. --kill-on-bad-exit ends the job when any launcher fails.
srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    launch/train.py "$@"
