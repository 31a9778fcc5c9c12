"""launch/train.py as the tests launch it, with two test-only switches read from the environment:

    TEST_FLOAT64=1        torch's default dtype float64: the network, its inputs and gradients in double precision
    TEST_HIDDEN=N         fc1 and fc2 of N neurons instead of the paper's 4096
    TEST_RANK_WEIGHTS=DIR each rank saves its own weights as DIR/rank<R>.pt after the run

The exactness tests (marked `exact`) compare layouts, launches, accumulation and resumes in float64. In float32 a few
decisions of every step (a ReLU input, or the gap between a max-pool window's two largest values) lie within
float32's rounding of a tie, and another CPU's kernels round them the other way: one such flip moves a layer's
gradient by up to 5% of its size, and the runs part (docs/results/divergence.py). In float64 the same decisions lie
about a billion times further from a flip, and a wrong exchange still shows a billion times above the tolerance.
They also narrow fc1 and fc2 to 512 neurons (conftest.EXACT_ENV): how a training is computed across processes,
layouts and resumes does not depend on the width, and the narrow network's 7.5 M parameters (the paper's 57 M)
write an eighth of the bytes in float64 (0.46 GB instead of 3.5 GB for a run with --ema) and train its 5 steps in
half the time.
"""

import os
import sys

import torch

from alexnet_dist.cli import main, parse_flags, run

if __name__ == "__main__":
    if os.environ.get("TEST_FLOAT64") == "1":
        torch.set_default_dtype(torch.float64)
    if "TEST_HIDDEN" in os.environ:
        import alexnet_dist.model
        alexnet_dist.model.HIDDEN = int(os.environ["TEST_HIDDEN"])
    out = os.environ.get("TEST_RANK_WEIGHTS")
    if out is None:
        main(sys.argv[1:])
    else:
        model = run(parse_flags(sys.argv[1:]))
        torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ.get('RANK', '0')}.pt"))
