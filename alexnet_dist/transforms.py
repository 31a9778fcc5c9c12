"""Augmentation as a few batched tensor ops on the device: per-image crops and flips, normalisation.

Images arrive as uint8 (N, 3, H, W) already resized; the random choices of a whole epoch (crop
offsets, flips) are drawn at once from a seeded CPU generator, identical on every rank, so an
image gets the same augmentation whatever the number of processes.
"""

from dataclasses import dataclass

import torch


@dataclass
class EpochPlan:
    """Data order and augmentation of one epoch: position i of the epoch shows image order[i]."""
    order: torch.Tensor  # int64 (N,)
    top: torch.Tensor    # int64 (N,) crop offsets
    left: torch.Tensor
    flip: torch.Tensor   # bool (N,)

    def to(self, device) -> "EpochPlan":
        return EpochPlan(*(tensor.to(device, non_blocking=True) for tensor in (self.order, self.top, self.left, self.flip)))

    def slice(self, start: int, stop: int) -> "EpochPlan":
        return EpochPlan(self.order[start:stop], self.top[start:stop], self.left[start:stop], self.flip[start:stop])


def draw_plan(count: int, image_size, crop, flip: bool, seed: int, epoch: int) -> EpochPlan:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(count, generator=generator)
    top = torch.randint(image_size[0] - crop[0] + 1, (count,), generator=generator)
    left = torch.randint(image_size[1] - crop[1] + 1, (count,), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    return EpochPlan(order, top, left, flips & flip)


class Augmentation:
    """Crop, flip and normalise uint8 batches into the network's float input (channels_last)."""

    def __init__(self, crop, mean, std, device):
        self.crop = tuple(crop)
        std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)  # (x / 255 - mean) / std as one multiply-add
        self.shift = -mean / std
        self.rows = torch.arange(self.crop[0], device=device)
        self.cols = torch.arange(self.crop[1], device=device)

    def crop_flip(self, images, top, left, flip):
        """Per-image crops at (top, left), mirrored where `flip`, as one gather."""
        batch = torch.arange(len(images), device=images.device)[:, None, None, None]
        channel = torch.arange(3, device=images.device)[None, :, None, None]
        rows = (top[:, None] + self.rows)[:, None, :, None]
        cols = torch.where(flip[:, None], self.crop[1] - 1 - self.cols, self.cols) + left[:, None]
        return images[batch, channel, rows, cols[:, None, None, :]]

    def normalise(self, images):
        out = images.float().mul_(self.scale).add_(self.shift)
        return out.contiguous(memory_format=torch.channels_last)

    def train(self, images, plan: EpochPlan):
        return self.normalise(self.crop_flip(images, plan.top, plan.left, plan.flip))

    def centre(self, images):
        top = (images.shape[-2] - self.crop[0]) // 2
        left = (images.shape[-1] - self.crop[1]) // 2
        return self.normalise(images[..., top : top + self.crop[0], left : left + self.crop[1]])
