"""Started by every Python process the tests launch (conftest.cli_env puts this folder on PYTHONPATH): with
TEST_HIDDEN=N in the environment, AlexNet's fc1 and fc2 get N neurons instead of the paper's 4096 (alexnet_dist.model's
HIDDEN, set before anything builds a network or reads the constant).

The tests launch hundreds of runs to check what the code does with the network (flags, layouts, resumes, stops,
exchanges), none of which depends on the width of fc1 and fc2; at 512 neurons the network has 7.5 M parameters
instead of 57 M, a launch of 5 steps takes 13 s instead of 19 s and writes a seventh of the bytes. The tests of the
paper's network itself (its parameter count, the layer sizes, what the GPU script and the benchmarks measure) launch it
with TEST_HIDDEN empty (conftest.PAPER_WIDTH: this file then imports nothing) or build it in the test process, which
this file does not touch.
"""

import os

if os.environ.get("TEST_HIDDEN"):
    try:
        import alexnet_dist.model
    except ImportError:  # a process without torch (pip, a helper script): nothing to narrow
        pass
    else:
        alexnet_dist.model.HIDDEN = int(os.environ["TEST_HIDDEN"])
