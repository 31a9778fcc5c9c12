"""Test helper: train like launch/train.py and record, on each rank, its first training input, the dropout masks
of its first step and its final weights, saved as OUT/probe<R>.pt.

    torchrun --nproc_per_node 2 tests/rank_probe.py OUT --dataset fake ...
"""

import os
import sys

import torch

from alexnet_dist import model as model_module
from alexnet_dist.cli import parse_flags, run

RECORD = {"inputs": [], "masks": []}
original_dropout = torch.nn.functional.dropout
original_forward = model_module.AlexNet.forward


def recording_dropout(input, p=0.5, training=True, inplace=False):
    """The same dropout, with its keep-mask drawn (from the same RNG) on a tensor of ones and kept."""
    if not training or p == 0:
        return original_dropout(input, p, training, inplace)
    kept = original_dropout(torch.ones_like(input), p, True, False)
    if len(RECORD["masks"]) < 2:
        RECORD["masks"].append((kept != 0).cpu())
    return input * kept


def recording_forward(self, x):
    if self.training and not RECORD["inputs"]:
        RECORD["inputs"].append(x.detach().float().cpu())
    return original_forward(self, x)


if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    torch.nn.functional.dropout = recording_dropout
    model_module.AlexNet.forward = recording_forward
    RECORD["weights"] = run(parse_flags(argv)).state_dict()
    torch.save(RECORD, os.path.join(out, f"probe{os.environ.get('RANK', '0')}.pt"))
