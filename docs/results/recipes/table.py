"""The recipe table's figures, read from each run's own metrics file (nothing typed by hand).

    python docs/results/recipes/table.py              # every <name>_seed<k>/ folder beside this script
    python docs/results/recipes/table.py paper_seed0  # some of them

One line per run: its folder, the whole command's time (`time/total`), the final validation accuracy in
the three test-time modes (centre / flip / ten views) and the last epoch's training accuracy (measured
on augmented images, dropout on); where the run logged them, its fit (`Accuracy/Train_fit`: the final
weights on 5,000 training images, centre crop, dropout off) and the weights' average (`--ema`) in the
three modes. Then, for every name with more than one seed, the mean and the spread (max - min) of each
test-time mode.
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def metrics(name) -> list:
    """The rows of a run's metrics file: a folder beside this script (or any folder), or a metrics.jsonl path."""
    path = Path(name)
    if path.suffix != ".jsonl":
        path = (HERE / path) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def figures(folder: Path) -> dict:
    rows = metrics(folder)
    final = next(row for row in reversed(rows) if "time/total" in row)
    last_epoch = next(row for row in reversed(rows) if "Accuracy/Train" in row)
    modes = [100 * final[f"Accuracy/Validation_final/tta_{mode}"] for mode in ("none", "flip", "ten")]
    average = [final.get(f"Accuracy/Validation_final_EMA/tta_{mode}") for mode in ("none", "flip", "ten")]
    return {"wall": final["time/total"], "modes": modes, "train": 100 * last_epoch["Accuracy/Train"],
            "epochs": last_epoch["epoch"], "fit": final.get("Accuracy/Train_fit"),
            "average_fit": final.get("Accuracy/Train_fit_EMA"),
            "average": None if None in average else [100 * value for value in average]}


def main(names: list) -> None:
    folders = [HERE / name for name in names] or sorted(path.parent for path in HERE.glob("*_seed*/metrics.jsonl"))
    seeds = defaultdict(list)
    for folder in folders:
        got = figures(folder)
        centre, flip, ten_views = got["modes"]
        print(f"{folder.name}: {got['epochs']} epochs, {got['wall']:,.0f} s, validation {centre:.2f} / {flip:.2f} / "
              f"{ten_views:.2f}% (centre / flip / ten), training accuracy {got['train']:.2f}%"
              + (f", fit {100 * got['fit']:.2f}%" if got["fit"] is not None else "")
              + (", average {:.2f} / {:.2f} / {:.2f}%".format(*got["average"]) if got["average"] else "")
              + (f", average's fit {100 * got['average_fit']:.2f}%" if got["average_fit"] is not None else ""))
        seeds[folder.name.rsplit("_seed", 1)[0]].append(got["modes"])
    for name, runs in seeds.items():
        if len(runs) > 1:
            modes = [
                f"{mode} mean {statistics.mean(values):.2f}%, spread {max(values) - min(values):.2f}"
                for mode, values in zip(("centre", "flip", "ten views"), zip(*runs))
            ]
            print(f"{name}: {len(runs)} seeds, " + "; ".join(modes) + " points")


if __name__ == "__main__":
    main(sys.argv[1:])
