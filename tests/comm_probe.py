"""Test helper: train like launch/train.py with every Python-level all-reduce recorded (dtype, elements), saved as
OUT/comm<R>.pt. DDP's own gradient all-reduce runs in C++ and passes no Python call; a communication hook sends its
buckets through `torch.distributed.all_reduce`, so the record shows what the hook put on the wire.

    torchrun --nproc_per_node 2 tests/comm_probe.py OUT --dataset fake --ddp_comm_hook fp16 ...
"""

import os
import sys

import torch
import torch.distributed as dist

from alexnet_dist.cli import parse_flags, run

RECORD = []
original_all_reduce = dist.all_reduce


def recording_all_reduce(tensor, *args, **kwargs):
    RECORD.append((str(tensor.dtype), tensor.numel()))
    return original_all_reduce(tensor, *args, **kwargs)


if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    dist.all_reduce = recording_all_reduce
    run(parse_flags(argv))
    torch.save(RECORD, os.path.join(out, f"comm{os.environ.get('RANK', '0')}.pt"))
