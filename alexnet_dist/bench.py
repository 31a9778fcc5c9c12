"""Throughput: the seed's pipeline, this project's default training step, and the compute ceiling.

    python -m alexnet_dist.bench                       # on the GPU if there is one, else the CPU
    python -m alexnet_dist.bench --compile true --json_path bench.json

All three train the same AlexNet at the same batch size on the same device, in one run:
  (a) seed:    PIL Resize(70) + RandomCrop(64) + ToTensor + Normalize in a DataLoader with
               `seed_workers` workers (the seed's 0), fp32, the pooled classifier, plain SGD;
  (b) default: this project's training epoch (Trainer.train_epoch) over uint8 images held on the
               device, augmentation and bookkeeping included, with the training defaults;
  (c) ceiling: the same step as (b) on one random batch already on the device: no data work.
Each figure is the median images/s over `windows` timed windows of `steps` optimizer steps, after
warm-up. The 25-epoch time is extrapolated from (b) for 45,000 training images.
"""

import json
import statistics
import sys
import time

import fire
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .config import Config, UsageError, load_recipe
from .data import ImageSet
from .engine import Trainer, build_optimizer, build_scheduler, use_cuda_graphs
from .loaders import make_loader
from .model import alexnet
from .runtime import build_accelerator, micro_batch_size
from .training import device_name
from .transforms import Augmentation, colour_pca

CIFAR_TRAIN_IMAGES = 45_000


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(run_window, windows: int, images_per_window: int, device) -> float:
    rates = []
    for _ in range(windows):
        synchronize(device)
        started = time.perf_counter()
        run_window()
        synchronize(device)
        rates.append(images_per_window / (time.perf_counter() - started))
    return statistics.median(rates)


class SeedCifar(Dataset):
    """What torchvision's CIFAR10 does per image: a PIL image from the uint8 array, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def seed_pipeline(device, batch_size: int, steps: int, windows: int, warmup: int, workers: int) -> float:
    torch.backends.cudnn.benchmark = False  # the seed ran with PyTorch's defaults
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = np.random.default_rng(0)
    count = batch_size * (warmup + steps * windows)
    images = generator.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = generator.integers(0, 10, count)
    transform = transforms.Compose([transforms.Resize((70, 70)), transforms.RandomCrop((64, 64)), transforms.ToTensor(),
                                    transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    loader = DataLoader(SeedCifar(images, labels, transform), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True)
    model = alexnet().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    batches = iter(loader)

    def seed_step():
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        features = torch.flatten(model.avgpool(model.features(inputs)), 1)  # the seed's pooled classifier
        loss = criterion(model.classifier(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        seed_step()
    return median_rate(lambda: [seed_step() for _ in range(steps)], windows, steps * batch_size, device)


def project_pipeline(cfg: Config, steps: int, windows: int) -> dict:
    """(b) and (c) with the training code itself; returns both rates and what was used."""
    accelerator = build_accelerator(cfg)
    device = accelerator.device
    generator = torch.Generator().manual_seed(0)
    count = steps * cfg.batch_size
    imageset = ImageSet(torch.randint(10, (count,), generator=generator),
                        torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator))
    augmentation = Augmentation(cfg.random_crop, cfg.mean, cfg.std, device, cutout=cfg.cutout,
                                colour_basis=colour_pca(imageset.images) if cfg.pca_color else None,
                                channels_last=device.type == "cuda")
    micro_batch = micro_batch_size(cfg.batch_size, 1, cfg.grad_accum_steps)
    loader = make_loader(imageset, augmentation, device, cfg, micro_batch, 0, 1)
    graphs = use_cuda_graphs(cfg, accelerator, streaming=loader.streams)
    model = alexnet(groups=cfg.groups, init=cfg.init, dropout=cfg.dropout)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, device, lr_on_device=graphs)
    scheduler = build_scheduler(optimizer, cfg, loader.steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, loader, log=lambda values, step: None, graphs=graphs)

    trainer.train_epoch(0)  # warm-up: compilation, graph recording, cuDNN's choice of algorithms
    default_rates = [trainer.train_epoch(epoch)["images_per_second"] for epoch in range(1, 1 + windows)]

    images = torch.randn(micro_batch, 3, *cfg.random_crop, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(10, (micro_batch,), device=device)
    ceiling = median_rate(lambda: [trainer.step(images, labels) for _ in range(steps)], windows, steps * micro_batch, device)
    return {"default": statistics.median(default_rates), "ceiling": ceiling, "graphs": graphs,
            "precision": accelerator.mixed_precision, "device": device}


def main(steps: int | None = None, windows: int = 5, seed_workers: int = 0, json_path: str | None = None, **flags):
    """Print images/s of (a) the seed's pipeline, (b) this project's default step, (c) the ceiling.

    Args:
        steps: optimizer steps per timed window (default: 50 on a GPU, 3 on a CPU).
        windows: timed windows; each figure is their median.
        seed_workers: DataLoader workers of the seed's pipeline (the seed used 0).
        json_path: also write the figures to this JSON file.
        flags: training flags for (b) and (c), e.g. --batch_size 256 --compile true --recipe R.yaml.
    """
    recipe = load_recipe(flags["recipe"]) if flags.get("recipe") else None
    cfg = Config.from_flags({**flags, "logger": "none", "num_epochs": 1 + windows, "dataset": "fake"}, base=recipe)
    batch_size, compile = cfg.batch_size, cfg.compile
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    steps = steps or (50 if on_gpu else 3)
    torch_device = torch.device("cuda" if on_gpu else "cpu")
    seed = seed_pipeline(torch_device, batch_size, steps, windows, warmup=2, workers=seed_workers)
    project = project_pipeline(cfg, steps, windows)
    name = device_name(torch_device)
    result = {
        "device": name, "torch": torch.__version__, "batch_size": batch_size, "precision": project["precision"],
        "cuda_graphs": project["graphs"], "compile": compile, "seed_workers": seed_workers, "steps": steps,
        "windows": windows, "seed_images_per_s": seed, "default_images_per_s": project["default"],
        "ceiling_images_per_s": project["ceiling"], "default_over_seed": project["default"] / seed,
        "default_over_ceiling": project["default"] / project["ceiling"],
        "seconds_25_epochs": 25 * CIFAR_TRAIN_IMAGES / project["default"],
    }
    print(f"{name}, torch {torch.__version__}, batch {batch_size}, {project['precision']} precision, "
          f"CUDA graphs {'on' if project['graphs'] else 'off'}, compile {compile}; median of {windows} windows of {steps} steps")
    print(f"(a) seed pipeline (PIL, {seed_workers} workers, fp32): {seed:12,.0f} images/s")
    print(f"(b) this project's default training:    {project['default']:12,.0f} images/s")
    print(f"(c) ceiling, random batch on the device:  {project['ceiling']:12,.0f} images/s")
    print(f"b/a = {result['default_over_seed']:.2f}   b/c = {result['default_over_ceiling']:.2f}   "
          f"25 epochs of {CIFAR_TRAIN_IMAGES:,} images at (b): {result['seconds_25_epochs']:.1f} s")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)


def cli():
    try:
        fire.Fire(main)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
