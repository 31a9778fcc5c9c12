"""Validation accuracy (centre crop) after every epoch, one column per run, read from each run's metrics file.

    python docs/results/recipes/curves.py default_seed0 default_seed1 default_seed2 fc1scaled_seed0

A run still going can be named by its metrics file's path instead of a folder beside this script.
"""

import sys
from pathlib import Path

from table import metrics


def validation_by_epoch(name: str) -> dict:
    rows = metrics(name)
    return {int(row["epoch"]): 100 * row["Accuracy/Validation"] for row in rows if "Accuracy/Validation" in row}


def main(names: list) -> None:
    curves = {name: validation_by_epoch(name) for name in names}
    labels = [Path(name).parent.parent.name if name.endswith(".jsonl") else name for name in names]
    width = max(8, *map(len, labels))
    print("epoch " + " ".join(f"{label:>{width}}" for label in labels))
    for epoch in range(1, max(max(curve, default=0) for curve in curves.values()) + 1):
        print(f"{epoch:5} " + " ".join(f"{curve[epoch]:{width}.2f}" if epoch in curve else " " * width
                                       for curve in curves.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
