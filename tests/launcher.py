"""launch/train.py as the tests launch it, with two test-only switches read from the environment:

    TEST_FLOAT64=1        torch's default dtype float64: the network, its inputs and gradients in double precision
    TEST_RANK_WEIGHTS=DIR each rank saves its own weights as DIR/rank<R>.pt after the run

The exactness tests (marked `exact`) compare layouts, launches, accumulation and resumes in float64. In float32 a few
decisions of every step (a ReLU input, or the gap between a max-pool window's two largest values) lie within
float32's rounding of a tie, and another CPU's kernels round them the other way: one such flip moves a layer's
gradient by up to 5% of its size, and the runs part (docs/results/divergence.py). In float64 the same decisions lie
about a billion times further from a flip, and a wrong exchange still shows a billion times above the tolerance.
Like every run the tests launch, these have fc1 and fc2 of 512 neurons (tests/narrow/sitecustomize.py): in float64 a
run with --ema then writes 0.46 GB instead of 3.5 GB. Their final report measures the fit on 32 training images
instead of every one of the 180 (FIT_SAMPLE): in float64 that took 40% of the report. And --dataset fake gives them
64 test images instead of 200 (FLOAT64_TEST_IMAGES; the training images are the same): the test split's evaluation,
twice with --ema, took a quarter of a float64 launch of 5 steps.
"""

import functools
import os
import sys

import torch

from alexnet_dist.cli import main, parse_flags, run

FLOAT64_TEST_IMAGES = 64  # fake data's test split in float64 launches (tests/test_layouts.py counts them)

if __name__ == "__main__":
    if os.environ.get("TEST_FLOAT64") == "1":
        torch.set_default_dtype(torch.float64)
        import alexnet_dist.run

        alexnet_dist.run.FIT_SAMPLE = 32  # the final report's fit, which no exact test reads: 32 images, not all 180
        import alexnet_dist.data

        alexnet_dist.data.fake = functools.partial(alexnet_dist.data.fake, test_size=FLOAT64_TEST_IMAGES)
    out = os.environ.get("TEST_RANK_WEIGHTS")
    if out is None:
        main(sys.argv[1:])
    else:
        model = run(parse_flags(sys.argv[1:]))
        torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ.get('RANK', '0')}.pt"))
