"""Augmentation as a few batched tensor ops on the device: crops, flips, colour noise, cutout.

Images arrive as uint8 (N, 3, H, W) already resized; the random choices of a whole epoch (crop
offsets, flips, colour noise, cutout squares) are drawn at once from a seeded CPU generator,
identical on every rank, so an image gets the same augmentation whatever the number of processes.

The paper's augmentations: random crops with horizontal reflections, and "PCA colour": the
principal components p_i and eigenvalues l_i of the training set's RGB values, each image shifted
by sum_i a_i l_i p_i with a_i ~ N(0, 0.1) drawn per image. Its test-time augmentation averages the
softmax of ten views: the four corner crops and the centre crop, each with its reflection.
"""

from dataclasses import dataclass, fields

import torch


@dataclass
class EpochPlan:
    """Data order and augmentation of one epoch: position i of the epoch shows image order[i]."""
    order: torch.Tensor   # int64 (N,)
    top: torch.Tensor     # int64 (N,) crop offsets, negative or past the edge with `translate`
    left: torch.Tensor
    flip: torch.Tensor    # bool (N,)
    colour: torch.Tensor  # float (N, 3) PCA coefficients a_i (zeros when off)
    cut_y: torch.Tensor   # int64 (N,) cutout centres (unused when cutout is off)
    cut_x: torch.Tensor

    def to(self, device) -> "EpochPlan":
        return EpochPlan(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))

    def slice(self, start: int, stop: int) -> "EpochPlan":
        return EpochPlan(*(getattr(self, f.name)[start:stop] for f in fields(self)))


OWN_COINS = 100_002  # no run's epoch: the seed's stream of each image's own flip coin under flip="alternate"


def draw_plan(count: int, image_size, crop, flip: bool | str, seed: int, epoch: int, translate: int = 0,
              colour_std: float = 0.0) -> EpochPlan:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(count, generator=generator)
    top = torch.randint(image_size[0] - crop[0] + 1 + 2 * translate, (count,), generator=generator) - translate
    left = torch.randint(image_size[1] - crop[1] + 1 + 2 * translate, (count,), generator=generator) - translate
    coins = torch.rand(count, generator=generator) < 0.5  # drawn in every mode: the draws after it stay the same
    if flip == "alternate":  # each image's own coin, reversed every other epoch: every image seen both ways in two
        own = torch.rand(count, generator=torch.Generator().manual_seed(seed * 100_003 + OWN_COINS)) < 0.5
        coins = own[order] ^ bool(epoch % 2)
    flips = coins & bool(flip)
    colour = torch.randn(count, 3, generator=generator) * colour_std
    cut_y = torch.randint(crop[0], (count,), generator=generator)
    cut_x = torch.randint(crop[1], (count,), generator=generator)
    return EpochPlan(order, top, left, flips, colour, cut_y, cut_x)


def colour_pca(images: torch.Tensor, max_pixels: int = 1_000_000) -> torch.Tensor:
    """The paper's colour basis: columns p_i * l_i of the RGB covariance (pixels scaled to [0, 1])."""
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1)
    pixels = pixels[:, :: max(1, pixels.shape[1] // max_pixels)].double() / 255.0
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(pixels))
    return (eigenvectors * eigenvalues).float()


def patch_filters(images: torch.Tensor, mean, std, filters: int, kernel: int = 11, stride: int = 4,
                   chunk: int = 250) -> torch.Tensor:
    """conv1's weights from the data (uint8 `images` at the network's input size, normalised as the network sees
    them): the leading filters // 2 eigenvectors of the kernel x kernel x 3 patch covariance and their negatives
    (ReLU passes one sign of each), each scaled to whiten its direction and then to the output variance He's
    initialisation gives on these inputs (2 / fan_in x the patches' summed second moment). Signs made canonical
    (largest component positive), so every process computes the same weights."""
    shift = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    fan_in = 3 * kernel * kernel
    moment = torch.zeros(fan_in, fan_in, dtype=torch.float64)  # sums of patch x patch^T, of patches, and a count
    total, count = torch.zeros(fan_in, dtype=torch.float64), 0

    for part in images.split(chunk):
        x = (part.double() / 255 - shift) / scale
        patches = torch.nn.functional.unfold(x, kernel, stride=stride).transpose(1, 2).reshape(-1, fan_in)
        moment += patches.T @ patches
        total += patches.sum(0)
        count += len(patches)
    centre = total / count
    covariance = moment / count - torch.outer(centre, centre)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    leading = eigenvectors[:, -(filters // 2):].flip(1).T  # (filters // 2, fan_in), largest first
    leading = leading * torch.sign(leading.gather(1, leading.abs().argmax(1, keepdim=True)))
    he_variance = 2 / fan_in * float(torch.diagonal(moment).sum() / count)
    whitened = leading / eigenvalues.flip(0)[: filters // 2].clamp(min=1e-8).sqrt()[:, None]
    weights = torch.cat([whitened, -whitened]) * he_variance ** 0.5
    return weights.view(-1, 3, kernel, kernel).float()


class Augmentation:
    """Crop, flip, colour-shift, cut out and normalise uint8 batches into the network's float input."""

    def __init__(self, crop, mean, std, device, colour_basis=None, cutout: int = 0, channels_last: bool = True):
        self.crop, self.cutout, self.channels_last = tuple(crop), cutout, channels_last
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * self.std)  # (x / 255 - mean) / std as one multiply-add
        self.shift = -mean / self.std
        self.colour_basis = None if colour_basis is None else colour_basis.to(device)
        self.rows = torch.arange(self.crop[0], device=device)
        self.cols = torch.arange(self.crop[1], device=device)

    def crop_flip(self, images, top, left, flip):
        """Per-image crops at (top, left), mirrored where `flip`, as one gather; borders reflect."""
        height, width = images.shape[-2:]
        batch = torch.arange(len(images), device=images.device)[:, None, None, None]
        channel = torch.arange(3, device=images.device)[None, :, None, None]
        rows = _reflect(top[:, None] + self.rows, height)[:, None, :, None]
        cols = torch.where(flip[:, None], self.crop[1] - 1 - self.cols, self.cols) + left[:, None]
        return images[batch, channel, rows, _reflect(cols, width)[:, None, None, :]]

    def normalise(self, images, colour=None):
        out = images.to(self.scale.dtype).mul_(self.scale).add_(self.shift)  # torch's default dtype (float32)
        if colour is not None and self.colour_basis is not None:
            out += ((colour @ self.colour_basis.T)[:, :, None, None] / self.std)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def train(self, images, plan: EpochPlan):
        out = self.normalise(self.crop_flip(images, plan.top, plan.left, plan.flip), plan.colour)
        if self.cutout:  # a cutout x cutout square centred on (cut_y, cut_x), clipped at the borders
            rows = self.rows[None, :] - plan.cut_y[:, None] + self.cutout // 2
            cols = self.cols[None, :] - plan.cut_x[:, None] + self.cutout // 2
            inside_rows = ((rows >= 0) & (rows < self.cutout))[:, None, :, None]
            inside_cols = ((cols >= 0) & (cols < self.cutout))[:, None, None, :]
            out.masked_fill_(inside_rows & inside_cols, 0.0)  # in place keeps channels_last; 0 is the mean colour
        return out

    def views(self, images, count: int = 1):
        """The first `count` of the paper's ten test views: centre, centre mirrored, then the corners."""
        height, width = images.shape[-2:]
        bottom, right = height - self.crop[0], width - self.crop[1]
        corners = [(bottom // 2, right // 2), (0, 0), (0, right), (bottom, 0), (bottom, right)]
        offsets = [(top, left, mirrored) for top, left in corners for mirrored in (False, True)][:count]
        for top, left, mirrored in offsets:
            size = len(images)
            yield self.normalise(
                self.crop_flip(
                    images,
                    torch.full((size,), top, device=images.device),
                    torch.full((size,), left, device=images.device),
                    torch.full((size,), mirrored, device=images.device),
                )
            )


def _reflect(index, size: int):
    """Indices past either edge mirrored back inside [0, size)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)
