"""Throughput: the seed's pipeline, this project's default training step, and the compute ceiling.

    python -m alexnet_dist.bench                       # on the GPU if there is one, else the CPU
    python -m alexnet_dist.bench --compile true --json_path bench.json

All three train the same AlexNet at the same batch size on the same device, in one run:
  (a) seed:    PIL Resize(70) + RandomCrop(64) + ToTensor + Normalize in a DataLoader with
               `seed_workers` workers (the seed's 0), fp32, the pooled classifier, plain SGD;
  (b) default: this project's training loop (training.train) for one epoch over uint8 images held
               on the device, augmentation and bookkeeping included, with the training defaults;
  (c) ceiling: the same loop and step as (b) over one random batch already on the device: no data work.
After warm-up, the timed windows of `steps` optimizer steps take turns (a, b, c, a, b, c, ...) so
that a machine whose speed drifts slows all three alike. Each figure is the median images/s with
the min-max over the windows; each ratio is taken window by window (b_i / a_i), with its median
and min-max, and called inconclusive when that range reaches across 1. The 25-epoch time is
extrapolated from (b) for CIFAR-10's training split under the flags (45,000 images by default). The
time breakdown at the end is the process's (training = the (b) and (c) windows and their warm-up; the
(a) windows are "other").
"""

import dataclasses
import itertools
import json
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .cli import read_flags
from .clock import clock
from .config import Config, UsageError, flag_lines, from_fire, number, optional_number
from .data import ImageSet
from .files import check_writable, write_text
from .loaders import streams
from .model import alexnet
from .runtime import build_accelerator, device_name, micro_batch_size
from .speedups import use_cuda_graphs
from .training import GivenBatches, Steps, build_trainer, train

CIFAR_IMAGES = 50_000  # CIFAR-10's training images, before the validation split


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(window, images: int, device) -> float:
    """images/s of one call of `window` (which trains `images` images)."""
    synchronize(device)
    started = time.perf_counter()
    window()
    synchronize(device)
    return images / (time.perf_counter() - started)


def spread(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio(values: list) -> dict:
    """A ratio's windows: their spread, and whether they all fall on one side of 1."""
    return {**spread(values), "conclusive": min(values) > 1 or max(values) < 1}


class SeedCifar(Dataset):
    """What torchvision's CIFAR10 does per image: a PIL image from the uint8 array, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def seed_pipeline(device, batch_size: int, steps: int, windows: int, warmup: int, workers: int):
    """(a): a function that trains `steps` steps as the seed did, warmed up already."""
    generator = np.random.default_rng(0)
    count = batch_size * (warmup + steps * windows)
    images = generator.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = generator.integers(0, 10, count)
    transform = transforms.Compose(
        [
            transforms.Resize((70, 70)),
            transforms.RandomCrop((64, 64)),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    loader = DataLoader(
        SeedCifar(images, labels, transform), batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    model = alexnet().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    batches = iter(loader)

    def seed_step():
        torch.backends.cudnn.benchmark = False  # the seed ran with PyTorch's defaults
        torch.backends.cuda.matmul.allow_tf32 = False
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        features = torch.flatten(model.avgpool(model.features(inputs)), 1)  # the seed's pooled classifier
        loss = criterion(model.classifier(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        seed_step()
    return lambda: [seed_step() for _ in range(steps)]


def project_pipeline(cfg: Config, steps: int) -> dict:
    """(b) and (c) with the training code itself, warmed up: their window functions and what they use."""
    accelerator = build_accelerator(cfg)
    device = accelerator.device
    generator = torch.Generator().manual_seed(0)
    count = steps * cfg.batch_size
    imageset = ImageSet(
        torch.randint(10, (count,), generator=generator),
        torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator),
    )
    micro_batch = micro_batch_size(cfg.batch_size, 1, cfg.grad_accum_steps)
    graphs = use_cuda_graphs(cfg, accelerator, accelerator.mixed_precision, streaming=streams(imageset, cfg))
    trainer = build_trainer(cfg, accelerator, imageset, 10, micro_batch, graphs)
    epochs = itertools.count()

    def default_window():  # one epoch of `steps` optimizer steps, through the training loop itself
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
        train(trainer, Steps([next(epochs)]))

    images = torch.randn(micro_batch, 3, *cfg.random_crop, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(10, (micro_batch,), device=device)
    # the same loop, model and step over one batch already on the device: steps x batch_size images in all
    ceiling = dataclasses.replace(trainer, loader=GivenBatches([(images, labels)] * (steps * cfg.grad_accum_steps)))

    def ceiling_window():
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
        train(ceiling, Steps([0]))

    default_window()  # warm-up: compilation, graph recording, cuDNN's choice of algorithms
    ceiling_window()
    return {
        "default": default_window,
        "ceiling": ceiling_window,
        "graphs": graphs,
        "precision": accelerator.mixed_precision,
        "device": device,
    }


@dataclasses.dataclass(frozen=True)
class Options:
    """The benchmark's own flags, checked, and the training configuration of (b) and (c)."""
    steps: int | None  # None: 50 on a GPU, 8 on a CPU
    windows: int
    seed_workers: int
    json_path: str | None
    flags: dict  # the training flags as given, recorded with the figures
    cfg: Config


USAGE = """\
usage: python -m alexnet_dist.bench [--steps N] [--windows N] [--seed_workers N] [--json_path FILE] [training flags]
  --steps (default: 50 on a GPU, 8 on a CPU): optimizer steps per timed window
  --windows (default 5): timed windows of each pipeline, taken in turns; each figure is their median
  --seed_workers (default 0, the seed's): DataLoader workers of the seed's pipeline
  --json_path (default none): also write the figures to this JSON file
Training flags set (b) and (c), e.g. --batch_size 256 --compile true --recipe R.yaml (the images are generated):

"""


def options(steps: int | None = None, windows: int = 5, seed_workers: int = 0, json_path: str | None = None,
            **flags) -> Options:
    """The flags of USAGE, checked, before anything is measured or written."""
    steps = optional_number(int, low=1)("steps", steps)
    windows = number(int, low=1)("windows", windows)
    seed_workers = number(int, low=0)("seed_workers", seed_workers)
    if json_path:  # now, not after the measurement
        check_writable("--json_path", str(json_path))
    cfg = from_fire(flags, logger="none", dataset="fake", num_epochs=windows + 2)
    return Options(steps, windows, seed_workers, json_path, flags, cfg)


def parse_flags(argv: list) -> Options:
    """The command line (read as launch/train.py's) -> checked Options; --help prints USAGE and the training flags."""
    return options(**read_flags(argv, "alexnet_dist.bench", USAGE + flag_lines()))


def main(opts: Options):
    """Print images/s of (a) the seed's pipeline, (b) this project's default step, (c) the ceiling."""
    cfg, windows, seed_workers = opts.cfg, opts.windows, opts.seed_workers
    train_images = round(cfg.fraction_of_data * (CIFAR_IMAGES - round(cfg.val_size * CIFAR_IMAGES)))
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    steps = opts.steps or (50 if on_gpu else 8)
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        clock.synchronize = torch.cuda.synchronize
    with clock.part("data"):
        seed_window = seed_pipeline(device, cfg.batch_size, steps, windows, warmup=2, workers=seed_workers)
    project = project_pipeline(cfg, steps)
    clock.begin("other")
    pipelines = {"seed": seed_window, "default": project["default"], "ceiling": project["ceiling"]}
    rates = {name: [] for name in pipelines}
    for _ in range(windows):
        for name, window in pipelines.items():
            rates[name].append(timed(window, steps * cfg.batch_size, device))
    ratios = {
        "default_over_seed": [b / a for a, b in zip(rates["seed"], rates["default"])],
        "default_over_ceiling": [b / c for b, c in zip(rates["default"], rates["ceiling"])],
    }
    times, table = clock.report()
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "batch_size": cfg.batch_size,
        "precision": project["precision"],
        "cuda_graphs": project["graphs"],
        "compile": cfg.compile,
        "seed_workers": seed_workers,
        "steps": steps,
        "windows": windows,
        "flags": opts.flags,
        **{f"{name}_images_per_s": spread(values) for name, values in rates.items()},
        **{name: ratio(values) for name, values in ratios.items()},
        "cifar10_training_images": train_images,
        "seconds_25_epochs": 25 * train_images / statistics.median(rates["default"]),
        "time": times,
    }
    print_result(result, table)
    if opts.json_path:
        write_text(opts.json_path, json.dumps(result, indent=2) + "\n")


def print_result(result: dict, table: str):
    print(
        f"{result['device']}, torch {result['torch']}, batch {result['batch_size']}, {result['precision']} precision, "
        f"CUDA graphs {'on' if result['cuda_graphs'] else 'off'}, compile {result['compile']}; {result['windows']} "
        f"windows of {result['steps']} steps each, taken in turns: median [min-max]"
    )
    labels = {
        "seed": f"(a) seed pipeline (PIL, {result['seed_workers']} workers, fp32)",
        "default": "(b) this project's default training",
        "ceiling": "(c) ceiling, random batch on the device",
    }
    for name, label in labels.items():
        figure = result[f"{name}_images_per_s"]
        print(f"{label:<42} {figure['median']:10,.0f} images/s  [{figure['min']:,.0f}-{figure['max']:,.0f}]")
    for name, label in (("default_over_seed", "b/a"), ("default_over_ceiling", "b/c")):
        figure = result[name]
        verdict = "" if figure["conclusive"] else "  inconclusive: the windows' range reaches across 1"
        print(f"{label} = {figure['median']:.2f}  [{figure['min']:.2f}-{figure['max']:.2f}]{verdict}")
    print(
        f"25 epochs of {result['cifar10_training_images']:,} CIFAR-10 training images at (b): "
        f"{result['seconds_25_epochs']:.1f} s"
    )
    print(table)


def cli():
    try:
        main(parse_flags(sys.argv[1:]))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
