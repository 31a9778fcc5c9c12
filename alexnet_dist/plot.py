"""The seed's three curves (training loss, training accuracy, validation accuracy) from metrics files.

    python -m alexnet_dist.plot runs/RUN                    # redraw RUN's PNGs in place
    python -m alexnet_dist.plot runs/A runs/B --out cmp/    # overlay several runs

Every run directory has `metrics.jsonl`: one JSON object per logged point, with the global
optimizer step under "step", so curves of resumed runs and of different process counts line up.
"""

import json
import sys
from pathlib import Path

import fire

from .files import atomic_write

CURVES = [  # metric, axis label, file name (the seed's README images)
    ("Loss/Train", "training loss", "LossTrain.png"),
    ("Accuracy/Train", "training accuracy", "AccuracyTrain.png"),
    ("Accuracy/Validation", "validation accuracy", "AccuracyValidation.png"),
]


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def new_figure(**options):
    """A matplotlib Figure to draw into and save: no pyplot, so no GUI backend, no global figure to close."""
    from matplotlib.figure import Figure  # here, not at the top: half a second more at every rank's start

    return Figure(**options)


def draw_curves(run_dirs, out_dir, labels=None) -> list:
    """One PNG per curve in `out_dir`, each run a line; returns (file written, runs drawn in it) pairs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [
        (label, read_metrics(run_dir)) for label, run_dir in zip(labels or [Path(d).name for d in run_dirs], run_dirs)
    ]
    written = []
    for metric, label, name in CURVES:
        figure = new_figure(figsize=(6, 4), dpi=100)
        axes = figure.subplots()
        drawn = 0
        for run_label, rows in runs:
            points = [(row["step"], row[metric]) for row in rows if metric in row]
            if points:
                axes.plot(*zip(*points), marker="." if len(points) < 60 else None, label=run_label)
                drawn += 1
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if len(runs) > 1:
            axes.legend()
        figure.tight_layout()
        written.append((atomic_write(out_dir / name, figure.savefig), drawn))
    return written


def draw_confusion(confusion, classes, path) -> Path:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG."""
    rates = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4, 0.5 * len(classes) + 2)
    figure = new_figure(figsize=(size, size), dpi=100)
    axes = figure.subplots()
    axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=90)
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(classes) <= 20:
        for row in range(len(classes)):
            for col in range(len(classes)):
                value = rates[row, col].item()
                axes.text(
                    col,
                    row,
                    f"{100 * value:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )
    figure.tight_layout()
    atomic_write(path, figure.savefig)
    return Path(path)


def main(*run_dirs, out: str | None = None):
    """Redraw the curves of RUN_DIR (in place), or overlay several runs into --out.

    Args:
        run_dirs: run directories holding metrics.jsonl.
        out: folder for the PNGs (default: the run directory itself when there is one run).
    """
    if not run_dirs:
        print("usage: python -m alexnet_dist.plot RUN_DIR [RUN_DIR ...] [--out DIR]", file=sys.stderr)
        sys.exit(2)
    if out is None and len(run_dirs) > 1:
        print("error: overlaying several runs needs --out DIR", file=sys.stderr)
        sys.exit(2)
    try:
        written = draw_curves([str(d) for d in run_dirs], out or run_dirs[0])
    except (FileNotFoundError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for path, drawn in written:
        print(f"{path}: {drawn} run(s)")


if __name__ == "__main__":
    fire.Fire(main)
