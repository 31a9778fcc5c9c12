"""Per-rank micro-batches: the whole split on the device (default) or streamed by DataLoader workers.

Both loaders walk the same seeded epoch plan: optimizer step s takes positions
[s * batch_size, (s + 1) * batch_size) of the epoch's permutation, and that global batch is cut
into num_processes x grad_accum_steps micro-batches, micro-step a of rank r taking slice a * P + r.
So every image is used once per epoch (less the last partial batch), with the same crop and flip,
whatever the launch. The last partial batch is dropped so that every step has the same global batch.
"""

import math
from functools import partial

import torch
from torch.utils.data import DataLoader

from .data import ImageFiles, ImageSet, resize_images, worker_count
from .runtime import stop_together
from .transforms import Augmentation, draw_plan


class DeviceLoader:
    """The split as uint8 on the device, resized once; batches are gathers and tensor ops there."""

    unreadable = ()  # files that could not be decoded (stream loader only)

    def __init__(self, imageset: ImageSet, augmentation: Augmentation, device, resize, batch_size: int,
                 micro_batch: int, rank: int, world: int, plan, counts: bool = True):
        self.augmentation, self.device, self.resize = augmentation, device, tuple(resize)
        self.batch_size, self.micro_batch, self.rank, self.world = batch_size, micro_batch, rank, world
        self.plan = plan  # epoch -> EpochPlan
        self.counts = counts  # whether this process's evaluation counts (the layout says: of a pair of columns, one)
        self.index_device = self._index_device(device)  # where `_batches` takes its image indices
        self.accum = batch_size // (micro_batch * world)
        self.labels = imageset.labels.to(device)
        self.count = len(imageset)
        self.steps_per_epoch = self.count // batch_size
        self._load(imageset)

    def _index_device(self, device):
        return device

    def _load(self, imageset: ImageSet):
        chunks = [resize_images(chunk.to(self.device), self.resize) for chunk in imageset.images.split(4096)]
        self.images = torch.cat(chunks)

    def _batches(self, order_slices):
        """uint8 device images for each index tensor of `order_slices`."""
        for index in order_slices:
            yield self.images[index]

    def _micro_slices(self, start_step: int):
        for step in range(start_step, self.steps_per_epoch):
            for micro in range(self.accum):
                start = step * self.batch_size + (micro * self.world + self.rank) * self.micro_batch
                yield start, start + self.micro_batch

    def train_epoch(self, epoch: int, start_step: int = 0):
        """This rank's (images, labels) micro-batches of `epoch`, from optimizer step `start_step` on."""
        cpu_plan = self.plan(epoch)
        plan = cpu_plan.to(self.device)
        order = plan.order if self.index_device == self.device else cpu_plan.order
        slices = list(self._micro_slices(start_step))
        images = self._batches(order[a:b] for a, b in slices)
        for (start, stop), batch in zip(slices, images):
            part = plan.slice(start, stop)
            yield self.augmentation.train(batch, part), self.labels[part.order]

    def sample_images(self, count: int, seed: int) -> tuple:
        """(uint8 images on the CPU, labels) of a seeded sample of up to `count` images of the split."""
        index = torch.randperm(self.count, generator=torch.Generator().manual_seed(seed))[:count].sort().values
        images = next(iter(self._batches([index.to(self.index_device)])))
        return images.cpu(), self.labels[index.to(self.device)].cpu()

    def eval_batches(self, batch_size: int):
        """(uint8 images, labels, number of real images) over this rank's shard of the split.

        Ranks take strided shards, padded to the longest shard's length (padding repeats image 0 and is not
        counted), so every rank runs the same shapes the same number of times: full batches, then one shorter
        batch where the shard does not divide (not padded to a full one: the split layouts' collectives need equal
        shapes across ranks, not across batches, and a 5-image split would cost 32 images' views).
        """
        shard = torch.arange(self.rank, self.count, self.world)
        padded = torch.zeros(math.ceil(self.count / self.world), dtype=torch.int64)
        padded[: len(shard)] = shard
        chunks = padded.split(batch_size)
        index_chunks = [chunk.to(self.index_device) for chunk in chunks]
        for number, (chunk, images) in enumerate(zip(chunks, self._batches(index_chunks))):
            valid = max(0, min(len(chunk), len(shard) - number * batch_size)) if self.counts else 0
            yield images, self.labels[chunk.to(self.device)], valid


class StreamLoader(DeviceLoader):
    """For splits too large for the device: workers decode and resize, the device crops and flips."""

    def __init__(self, *args, num_workers: int, **kwargs):
        self.num_workers = num_workers
        super().__init__(*args, **kwargs)

    def _index_device(self, device):
        return torch.device("cpu")  # DataLoader workers take plain indices

    def _load(self, imageset: ImageSet):
        self.dataset = ImageFiles(imageset.files, imageset.images, size=self.resize, blank_unreadable=True)
        self.unreadable = []

    def _batches(self, order_slices):
        batches = [index.tolist() for index in order_slices]
        # a generator of its own: a DataLoader seeds its workers from the global one otherwise, where dropout on
        # the CPU draws (and decoding and resizing draw nothing)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator())
        for indices, (images, readable) in zip(batches, loader):
            if not readable.all():  # a black image stands in; every rank stops at the epoch's end
                self.unreadable += [self.dataset.files[i] for i, ok in zip(indices, readable.tolist()) if not ok]
            yield images.to(self.device, non_blocking=True)


def make_loader(imageset: ImageSet, augmentation: Augmentation, device, cfg, micro_batch: int, rank: int, world: int,
                counts: bool = True):
    """Share `rank` of `world` of `imageset` (the layout's `shard`); `cfg` gives resize, random_crop, flip, seed,
    translate, pca_color, batch_size, loader and num_workers."""
    plan = partial(draw_plan, len(imageset), cfg.resize, cfg.random_crop, cfg.flip, cfg.seed,
                   translate=cfg.translate, colour_std=cfg.pca_color)
    common = dict(device=device, resize=cfg.resize, batch_size=cfg.batch_size, micro_batch=micro_batch, rank=rank,
                  world=world, plan=plan, counts=counts)
    if not streams(imageset, cfg):
        return DeviceLoader(imageset, augmentation, **common)
    return StreamLoader(imageset, augmentation, num_workers=worker_count(cfg.num_workers), **common)


def streams(imageset: ImageSet, cfg) -> bool:
    """Whether `make_loader` gives this split the stream loader: asked for, or the images are not in memory."""
    return imageset.images is None or cfg.loader == "stream"


def check_readable(accelerator, *loaders):
    """Stop every rank together, naming the file, when a stream loader met an unreadable image."""
    unreadable = [path for loader in loaders if loader is not None for path in loader.unreadable]
    stop_together(accelerator, f"unreadable image in the data set: {unreadable[0]} ({len(unreadable)} such file(s)); "
                               "remove or replace it and resume" if unreadable else None)
