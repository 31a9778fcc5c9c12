"""Test helper: train like launch/train.py, then save this rank's own weights as OUT/rank<R>.pt.

    torchrun --nproc_per_node 2 tests/rank_weights.py OUT --dataset fake ...
"""

import os
import sys

import torch

from alexnet_dist.cli import parse_flags, run

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    model = run(parse_flags(argv))
    torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ.get('RANK', '0')}.pt"))
