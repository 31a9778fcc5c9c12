"""`accelerate launch launch/train.py --num_epochs 25`: hands the command line to alexnet_dist.cli."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alexnet_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
