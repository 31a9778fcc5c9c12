"""Data sets as uint8 image tensors: CIFAR-10, an image folder, or generated images; splits; cache.

Every source ends as `ImageSet`s (uint8 images N x 3 x H x W plus int64 labels), decoded once:
CIFAR-10 from its python batches, read and md5-checked by torchvision (downloaded by the main
process), an image folder decoded by DataLoader workers and cached beside the data, keyed on its
file list, or generated images.
A folder too large to decode into memory stays a list of files for the stream loader.
The validation split is carved out of the training images by a seeded permutation, so every rank
(and every run with the same seed) holds the same split.
"""

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import UsageError
from .files import atomic_write, unwritable_folder
from .runtime import usable_cores

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CIFAR10_FOLDER = "cifar-10-batches-py"
CACHE_VERSION = 2


@dataclass
class ImageSet:
    labels: torch.Tensor                 # int64 (N,)
    images: torch.Tensor | None = None   # uint8 (N, 3, H, W) when decoded in memory
    files: list | None = None            # image paths, when decoded on the fly by the stream loader

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        images = None if self.images is None else self.images[index]
        files = None if self.files is None else [self.files[i] for i in index.tolist()]
        return ImageSet(self.labels[index], images, files)


@dataclass
class Data:
    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    classes: list
    test_note: str = ""  # why there is no test split, when there is none


# ---------------------------------------------------------------- decoding


class UnreadableImage(Exception):
    pass


def read_image(path) -> torch.Tensor:
    """One image file as uint8 RGB (3, H, W); UnreadableImage names the file otherwise."""
    from torchvision.io import ImageReadMode, decode_image  # torchvision here: its import costs every launch 1.2 s
    from torchvision.transforms.functional import pil_to_tensor

    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception:
        pass
    else:  # a 16-bit PNG decodes to uint16: scaled to 0-255 and rounded, not wrapped around
        return image if image.dtype == torch.uint8 else ((image.to(torch.int32) + 128) // 257).to(torch.uint8)
    try:
        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))
    except Exception as error:
        raise UnreadableImage(f"{path}: cannot be read as an image ({type(error).__name__})") from None


def resize_images(images: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 images (N, 3, H, W), rounded back to uint8 like PIL."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    resized = F.interpolate(images.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


class ImageFiles(Dataset):
    """Image files (or rows of a uint8 tensor) decoded, and resized, in DataLoader workers.

    size: resize every image to it; shrink_to: resize only the images larger than it (bounds the
    memory a folder of large photos takes). blank_unreadable: an unreadable file gives a black
    image instead of an error, and the stream loader stops every rank together at the end of the
    epoch. Items are (uint8 image (3, H, W), readable).
    """

    def __init__(self, files=None, images=None, size=None, shrink_to=None, blank_unreadable=False):
        self.files, self.images, self.size, self.shrink_to = files, images, size, shrink_to
        self.blank_unreadable = blank_unreadable

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.images)

    def __getitem__(self, index):
        try:
            image = read_image(self.files[index]) if self.files is not None else self.images[index]
        except UnreadableImage:
            if not self.blank_unreadable:
                raise
            return torch.zeros(3, *self.size, dtype=torch.uint8), False
        if self.shrink_to is not None and (image.shape[-2] > self.shrink_to[0] or image.shape[-1] > self.shrink_to[1]):
            image = resize_images(image[None], self.shrink_to)[0]
        if self.size is not None:
            image = resize_images(image[None], self.size)[0]
        return image, True


def worker_count(requested) -> int:
    """--num_workers: the number asked for, else one per usable core, at most 8."""
    return min(8, usable_cores()) if requested is None else requested


def _stack_or_arrays(items: list):
    """One tensor per batch when the sizes agree (few shared-memory handles), else plain arrays."""
    images = [image for image, _ in items]
    if len({tuple(image.shape) for image in images}) == 1:
        return torch.stack(images)
    return [image.numpy() for image in images]


def _decode_all(files, size, num_workers) -> torch.Tensor:
    """Decode every file into one preallocated uint8 tensor, batch by batch (each worker batch is freed once
    copied); images larger than `size` are shrunk to it in the workers, and once sizes differ every image is
    resized to `size`, so that they fit one tensor."""
    loader = DataLoader(ImageFiles(files, shrink_to=size), batch_size=256, num_workers=worker_count(num_workers),
                        collate_fn=_stack_or_arrays)
    images, count = None, 0
    try:
        for batch in loader:
            for image in batch:
                image = torch.as_tensor(image)
                if images is None:
                    images = torch.empty((len(files), *image.shape), dtype=torch.uint8)
                if image.shape != images.shape[1:]:
                    if tuple(images.shape[-2:]) != tuple(size):  # the first other size: all to `size` from now on
                        resized = torch.empty((len(files), 3, *size), dtype=torch.uint8)
                        if count:
                            resized[:count] = resize_images(images[:count], size)
                        images = resized
                    image = resize_images(image[None], size)[0]
                images[count] = image
                count += 1
    except UnreadableImage as error:  # from a worker it carries the worker's traceback: keep the last line
        message = str(error).strip().splitlines()[-1].removeprefix(f"{__name__}.UnreadableImage: ")
        raise UsageError(f"unreadable image in the data set: {message}") from None
    return images


def _cache_key(files, root: Path, size) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size[0]}x{size[1]}".encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def decode_cached(files, root: Path, size, cache_dir: Path | None, num_workers: int, write: bool) -> torch.Tensor:
    """Decoded images of `files`, from the cache when its key (the file list) still matches."""
    if cache_dir is None:
        return _decode_all(files, size, num_workers)
    key = _cache_key(files, root, size)
    path = cache_dir / f"images-{key}.pt"
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if len(cached["images"]) == len(files):
                return cached["images"]
        except Exception:
            pass  # a damaged cache entry is rebuilt below

    def cannot_write(reason: str) -> UsageError:
        return UsageError(f"cannot write the decoded-image cache in {cache_dir} ({reason}): "
                          "give a writable folder with --cache_dir, or --cache_dir none")

    blocker = unwritable_folder(cache_dir) if write else None
    if blocker is not None:  # say so now, not after decoding every image
        raise cannot_write(f"{blocker} is not a writable folder")
    images = _decode_all(files, size, num_workers)
    if write:
        try:
            atomic_write(path, lambda temporary: torch.save({"images": images}, temporary))
        except OSError as error:
            raise cannot_write(error.strerror) from None
    return images


# ---------------------------------------------------------------- sources


def download_cifar10(root: Path):
    """Download and verify CIFAR-10 into `root` unless its batches are there (main process only)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    if (root / CIFAR10_FOLDER).is_dir():
        return
    archive = root / CIFAR10.filename
    if archive.exists() and not check_integrity(str(archive), CIFAR10.tgz_md5):
        raise UsageError(f"{archive} is corrupt or partly downloaded (its checksum is wrong): delete it and run again")
    try:
        CIFAR10(str(root), train=True, download=True)
    except (tarfile.TarError, EOFError, OSError, RuntimeError) as error:
        raise UsageError(
            f"could not get CIFAR-10 into {root} ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
            f"delete {archive} if it is partial, and run with network access, or use --dataset folder"
        ) from None


def cifar10(root: Path) -> tuple:
    """(training, test, class names) of the CIFAR-10 batches in `root`, each file checked against its md5."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10_FOLDER
    try:
        splits = CIFAR10(str(root), train=True), CIFAR10(str(root), train=False)
    except RuntimeError:  # torchvision's "not found or corrupted", for any batch file or batches.meta
        raise UsageError(
            f"{folder} is incomplete or corrupt (a file is missing or its md5 is wrong): delete {folder} "
            f"(and {root / CIFAR10.filename}) and run again to download it afresh"
        ) from None
    train, test = (ImageSet(torch.tensor(split.targets, dtype=torch.int64),
                            torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous())  # from N x H x W x 3
                   for split in splits)
    return train, test, splits[0].classes


def scan_folder(root: Path, split: str, classes=None) -> tuple:
    """Files and labels of root/split/<class>/*, classes sorted by name (or given)."""
    folder = root / split
    found = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UsageError(f"{folder / unknown[0]} is a class that {root / 'train'} does not have")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_folder = folder / name
        if not class_folder.is_dir():
            continue
        for entry in sorted(os.scandir(class_folder), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(entry.path)
                labels.append(label)
    if not files:
        raise UsageError(f"{folder} holds no images (expected {folder}/<class>/*.jpg or .png)")
    return files, torch.tensor(labels, dtype=torch.int64), classes


def check_folder(root: Path):
    if not root.is_dir():
        raise UsageError(f"--data_dir {root} does not exist (dataset=folder expects {root}/train/<class>/*)")
    if not (root / "train").is_dir():
        raise UsageError(f"--data_dir {root} has no train/ folder (dataset=folder expects {root}/train/<class>/*)")


def fake(num_classes: int = 10, train_size: int = 1000, test_size: int = 200, size: int = 32) -> tuple:
    """Generated images that a network can learn: a smooth colour pattern per class, shifted, plus noise."""
    generator = torch.Generator().manual_seed(20120101)
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=generator), size=2 * size, mode="bilinear")

    def draw(count):
        labels = torch.randint(num_classes, (count,), generator=generator)
        shifts = torch.randint(size, (count, 2), generator=generator)
        rows = (shifts[:, :1] + torch.arange(size))[:, None, :, None]
        cols = (shifts[:, 1:] + torch.arange(size))[:, None, None, :]
        images = patterns[labels[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        images = 0.7 * images + 0.3 * torch.rand(count, 3, size, size, generator=generator)
        return ImageSet(labels, (images * 255).round().to(torch.uint8))

    return draw(train_size), draw(test_size), [f"pattern{i}" for i in range(num_classes)]


# ---------------------------------------------------------------- splits


def split_indices(count: int, val_size: float, fraction: float, seed: int) -> tuple:
    """(train, val) indices: a seeded permutation, val first; the train part subsampled without replacement."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    num_val = round(val_size * count)
    train, val = order[num_val:], order[:num_val]
    train = train[: round(fraction * len(train))]
    return train, val


def check_split(count: int, cfg):
    """Before any decoding: a training run's split must hold at least one global batch."""
    if not cfg.train:
        return
    num_val = round(cfg.val_size * count)
    num_train = round(cfg.fraction_of_data * (count - num_val))
    if num_train < cfg.batch_size:
        raise UsageError(f"{num_train} training images (of {count}, after --val_size {cfg.val_size} and "
                         f"--fraction_of_data {cfg.fraction_of_data}) are fewer than one batch of --batch_size "
                         f"{cfg.batch_size}")


def split(full: ImageSet, val_size: float, fraction: float, seed: int) -> tuple:
    train_index, val_index = split_indices(len(full), val_size, fraction, seed)
    return full.subset(train_index), (full.subset(val_index) if len(val_index) else None)


# ---------------------------------------------------------------- all of it


def memory_budget(device) -> int:
    """Bytes a decoded split may take: half of what is free on the device (or in RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 1 << 62


def streamed(cfg, count: int, device) -> bool:
    """Whether a split of `count` files stays files for the stream loader: asked for, or too large to decode."""
    resized_bytes = count * 3 * cfg.resize[0] * cfg.resize[1]
    return cfg.loader == "stream" or (cfg.loader == "auto" and resized_bytes > memory_budget(device))


def load_data(cfg, device, writer: bool, stream: bool | None = None) -> Data:
    """Train / validation / test splits of `cfg.dataset`, the same wherever they are loaded.

    The `writer` (the main process, which runs first) downloads CIFAR-10 and writes the decode
    cache; the other ranks then read them. `stream`: the writer's choice of the stream loader
    (None: choose here).
    """
    root = Path(cfg.data_dir)
    test_note = ""
    if cfg.dataset == "fake":
        full, test, classes = fake()
        check_split(len(full), cfg)
    elif cfg.dataset == "cifar10":
        if writer:
            download_cifar10(root)
        full, test, classes = cifar10(root)
        check_split(len(full), cfg)
    else:
        check_folder(root)
        files, labels, classes = scan_folder(root, "train")
        test_files = scan_folder(root, "test", classes) if (root / "test").is_dir() else None
        check_split(len(files), cfg)
        stream = streamed(cfg, len(files), device) if stream is None else stream
        cache_dir = None if cfg.cache_dir == "none" else Path(cfg.cache_dir or root / ".alexnet_dist_cache")

        def images(files, labels) -> ImageSet:
            if stream:
                return ImageSet(labels, files=files)
            return ImageSet(labels, decode_cached(files, root, cfg.resize, cache_dir, cfg.num_workers, writer))

        full = images(files, labels)
        test = None if test_files is None else images(*test_files[:2])
        if test is None:
            test_note = f"{root} has no test/ folder: skipping the test evaluation"
    train, val = split(full, cfg.val_size, cfg.fraction_of_data, cfg.seed)
    return Data(train, val, test, classes, test_note)


def pixel_sample(imageset: ImageSet, size, max_images: int = 2000) -> torch.Tensor:
    """uint8 images to estimate colour statistics from: all of them, or a spread of decoded files."""
    if imageset.images is not None:
        return imageset.images
    step = max(1, len(imageset.files) // max_images)
    sample = ImageFiles(imageset.files[::step], size=size, blank_unreadable=True)
    return torch.stack([image for image, readable in map(sample.__getitem__, range(len(sample))) if readable])
