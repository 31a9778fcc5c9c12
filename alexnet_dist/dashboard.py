"""End-of-run pictures for the dashboard: a table of predictions and the most confused pairs.

On the main process, with the unwrapped model (no collective), over a seeded pool of up to
`POOL` images of the test split (validation if there is none): every image's probabilities in the
run's test-time mode. The table holds a seeded sample of `SAMPLE` of them plus the `MISTAKES` most
confident mistakes; the grid shows examples of the classes most often mistaken for each other.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import view_probabilities
from .files import atomic_write
from .plot import new_figure

POOL, SAMPLE, MISTAKES, PAIRS, PER_PAIR = 1000, 100, 10, 4, 6


@dataclass
class Gallery:
    columns: list   # image, true, predicted, probability, top-3
    rows: list      # [uint8 HWC image array, true class, predicted class, probability, "a 81%, b 9%, c 3%"]
    pairs_png: Path | None


@torch.no_grad()
def gallery(model, loader, accelerator, classes, tta: str, confusion, out_dir: Path, seed: int) -> Gallery:
    images, labels = loader.sample_images(POOL, seed)
    model.eval()
    probabilities = []
    with accelerator.autocast():
        for chunk in images.split(128):
            probabilities.append(
                view_probabilities(model, loader.augmentation, chunk.to(accelerator.device), tta).cpu()
            )
    probabilities = torch.cat(probabilities)
    confidence, predicted = probabilities.max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    confident_mistakes = wrong[confidence[wrong].argsort(descending=True)][:MISTAKES]
    sample = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:SAMPLE]
    chosen = torch.cat([sample, confident_mistakes[~torch.isin(confident_mistakes, sample)]])
    top = probabilities.topk(min(3, len(classes)), dim=1)
    rows = [
        [
            images[i].permute(1, 2, 0).numpy(),
            classes[labels[i]],
            classes[predicted[i]],
            round(float(confidence[i]), 4),
            ", ".join(f"{classes[c]} {100 * p:.0f}%" for p, c in zip(top.values[i].tolist(), top.indices[i].tolist())),
        ]
        for i in chosen.tolist()
    ]
    pairs = most_confused(confusion, PAIRS)
    pairs_png = draw_pairs(pairs, images, labels, predicted, classes, out_dir / "ConfusedPairs.png") if pairs else None
    return Gallery(["image", "true", "predicted", "probability", "top-3"], rows, pairs_png)


def most_confused(confusion: torch.Tensor, count: int) -> list:
    """(true, predicted, images) of the largest off-diagonal cells, largest first."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    values, cells = off.flatten().topk(min(count, off.numel()))
    size = confusion.shape[1]
    return [(int(cell) // size, int(cell) % size, int(value)) for value, cell in zip(values, cells) if value > 0]


def draw_pairs(pairs, images, labels, predicted, classes, path: Path) -> Path:
    """One row per confused pair: examples of true class a predicted as b."""
    figure = new_figure(figsize=(1.6 * PER_PAIR, 1.8 * len(pairs)), dpi=100)
    axes = figure.subplots(len(pairs), PER_PAIR, squeeze=False)
    for row, (true, guess, count) in enumerate(pairs):
        examples = ((labels == true) & (predicted == guess)).nonzero().flatten()[:PER_PAIR].tolist()
        for column in range(PER_PAIR):
            axis = axes[row][column]
            axis.axis("off")
            if column < len(examples):
                axis.imshow(images[examples[column]].permute(1, 2, 0).numpy())
        axes[row][0].set_title(f"{classes[true]} -> {classes[guess]} ({count})", loc="left", fontsize=9)
    figure.tight_layout()
    atomic_write(path, figure.savefig)
    return path
