"""Every flag that changes what is learned does what its help line says.

One row per flag of WHAT_IS_LEARNED, read off Config: a learned flag added without a row fails here by name. Each row
sets its flag to two or more values, at least one not the default, and compares what the run builds or computes
against an expectation worked out in the row from those values (SGD, softmax, covariance, crop arithmetic), never from
the code's own constants. The rows run the code the CLI runs (build_trainer, the training loop, load_data,
evaluate_saved), on a tiny network where the flag is not about the network. Each row is proven by breaking the line it
guards:

    python scripts/mutation_check.py --only <flag>
"""

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from fake_cifar10 import CIFAR_CLASSES, cifar_members, md5_lists
from test_data import write_folder

from alexnet_dist import training
from alexnet_dist.config import WHAT_IS_LEARNED, Config
from alexnet_dist.data import Data, ImageSet, load_data
from alexnet_dist.engine import build_optimizer
from alexnet_dist.preflight import Plan
from alexnet_dist.runtime import micro_batch_size

CPU = torch.device("cpu")
FEATURES, CLASSES = 4, 3
# full precision: bf16 autocast, the default on CPUs that have it, would round the steps worked out by hand
BASE = {"logger": "none", "dataset": "fake", "mixed_precision": "no"}
# two batches of four inputs for the tiny network
BATCHES = [(torch.randn(4, FEATURES, generator=torch.Generator().manual_seed(seed)), torch.tensor(labels))
           for seed, labels in ((5, [0, 1, 2, 1]), (6, [2, 2, 0, 1]))]
QUARTERS = [(inputs[half], labels[half]) for inputs, labels in BATCHES for half in (slice(0, 2), slice(2, 4))]
# pixels as given: a batch times 255 is the uint8 image
RAW_PIXELS = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def config(**flags) -> Config:
    return Config.from_flags({**BASE, **flags})


def tiny_network(**_) -> torch.nn.Module:
    """Stands in for AlexNet's builder: a linear layer drawn from the seeded global generator, as AlexNet's are."""
    return torch.nn.Linear(FEATURES, CLASSES)


def blank(count: int, size: int = 70) -> ImageSet:
    return ImageSet(torch.zeros(count, dtype=torch.int64), torch.zeros(count, 3, size, size, dtype=torch.uint8))


def trainer_for(monkeypatch, images=None, **flags) -> training.Trainer:
    """build_trainer as the CLI calls it on one CPU process, on the tiny network; `images`: the training split
    (default 8 blank images: 4 optimizer steps an epoch at batch 2)."""
    monkeypatch.setattr(training, "alexnet", tiny_network)
    cfg = config(**flags)
    micro_batch = micro_batch_size(cfg.batch_size, 1, cfg.grad_accum_steps)
    return training.build_trainer(cfg, Accelerator(cpu=True), blank(8) if images is None else images, CLASSES,
                                  micro_batch)


def alexnet_for(**flags) -> torch.nn.Module:
    return training.build_model(config(**flags), Accelerator(cpu=True), num_classes=10)


def weights(model) -> list:
    return [parameter.detach().clone() for parameter in model.parameters()]


def training_batches(trainer) -> tuple:
    """(images, labels) of the first epoch of the trainer's own loader, all micro-batches together."""
    batches = list(trainer.loader.train_epoch(0))
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


# ---------------------------------------------------------------- optimisation: two SGD steps by hand

# the SGD rows start from here: every value differs from its default, so that a flag replaced by its default (or by
# torch's) gives other steps
SGD = {"lr": 0.2, "momentum": 0.6, "nesterov": False, "weight_decay": 0.03, "label_smoothing": 0.0}


def two_steps(monkeypatch, **flags) -> tuple:
    """(trainer, initial weights, the two losses, the weights after each step): two optimizer steps of the training
    loop on BATCHES."""
    trainer = trainer_for(monkeypatch, batch_size=4, schedule="constant", **flags)
    initial, losses, after = weights(trainer.model), [], []

    def each_step():
        losses.append(trainer.meter.log_point()[0])
        after.append(weights(trainer.model))

    trainer.loader = training.GivenBatches(BATCHES)
    training.train(trainer, training.Steps([0], each_step))
    return trainer, initial, losses, after


def sgd_by_hand(initial, lr, momentum, nesterov, weight_decay, label_smoothing) -> tuple:
    """(losses, weights after each step) of SGD on BATCHES as PyTorch documents it, in float64. The smoothed
    cross-entropy of logits z against targets q = (1 - e) one-hot + e / K is -sum(q log softmax(z)); its gradient
    with respect to z is softmax(z) - q (over the batch: divided by its size)."""
    parameters = [parameter.double() for parameter in initial]
    buffers, losses, after = None, [], []
    for inputs, labels in BATCHES:
        weight, bias = parameters
        inputs = inputs.double()
        target = (1 - label_smoothing) * F.one_hot(labels, CLASSES).double() + label_smoothing / CLASSES
        log_probabilities = torch.log_softmax(inputs @ weight.T + bias, dim=1)
        losses.append(float(-(target * log_probabilities).sum(dim=1).mean()))
        error = (log_probabilities.exp() - target) / len(labels)
        gradients = [error.T @ inputs + weight_decay * weight, error.sum(dim=0) + weight_decay * bias]
        buffers = gradients if buffers is None else [momentum * b + g for b, g in zip(buffers, gradients)]
        steps = [g + momentum * b for g, b in zip(gradients, buffers)] if nesterov else buffers
        parameters = [p - lr * s for p, s in zip(parameters, steps)]
        after.append(parameters)
    return losses, after


def assert_steps_match(flags: dict, losses, after, by_hand):
    hand_losses, hand_after = by_hand
    assert losses == pytest.approx(hand_losses, rel=1e-5), flags
    for step, (got, expected) in enumerate(zip(after, hand_after)):
        for parameter, hand in zip(got, expected):
            torch.testing.assert_close(parameter.double(), hand, rtol=1e-5, atol=1e-6,
                                       msg=lambda text: f"{flags}, after step {step + 1}: {text}")


def sgd_row(name: str, values: tuple):
    """Two steps through the loop at each value of one SGD flag (the others as in SGD) equal two SGD steps by hand."""
    def check(monkeypatch, tmp_path):
        for value in values:
            flags = {**SGD, name: value}
            _, initial, losses, after = two_steps(monkeypatch, **flags)
            assert_steps_match(flags, losses, after, sgd_by_hand(initial, **flags))
    return check


def ema_row(monkeypatch, tmp_path):
    """The average's first update copies the weights, the second moves it 1 - decay of the way to them."""
    for decay in (0.75, 0.5):
        trainer, _, _, (first, second) = two_steps(monkeypatch, **SGD, ema=decay)
        expected = [decay * a + (1 - decay) * b for a, b in zip(first, second)]
        assert not torch.equal(first[0], second[0])  # the steps moved the weights
        for got, hand in zip(weights(trainer.average.module), expected):
            torch.testing.assert_close(got, hand, msg=lambda text: f"--ema {decay}: {text}")
    assert trainer_for(monkeypatch, ema=0.0).average is None


# ---------------------------------------------------------------- schedules


def lr_per_step(monkeypatch, **flags) -> list:
    """The lr of each of the 12 optimizer steps of 3 epochs of 4 steps (peak 0.1) through the training loop, and the
    lr left after the last."""
    trainer = trainer_for(monkeypatch, batch_size=2, lr=0.1, num_epochs=3, **flags)
    lrs = [trainer.lr]
    trainer.loader = training.GivenBatches(QUARTERS)  # 4 steps an epoch, as the blank split gave the schedule
    training.train(trainer, training.Steps(range(3), lambda: lrs.append(trainer.lr)))
    return lrs


def warm_then_decay(warmup_steps: int, decay) -> list:
    """By hand, peak 0.1 over 12 steps: step k < W takes 0.1 (k + 1) / W, then decay(progress) with progress
    (k - W) / (12 - W) from 0 at the warm-up's end to 1 after the last step."""
    return [0.1 * (k + 1) / warmup_steps if k < warmup_steps
            else 0.1 * decay((k - warmup_steps) / (12 - warmup_steps)) for k in range(13)]


def linear(progress):
    return 1 - progress


def cosine(progress):
    return (1 + math.cos(math.pi * progress)) / 2


def schedule_row(monkeypatch, tmp_path):
    """Half an epoch of warm-up is 2 steps; linear and cosine decay differ from step 3 on; constant and plateau keep
    the peak through the steps (plateau changes the lr only between epochs: the plateau_patience row)."""
    expected = {"warmup_linear": warm_then_decay(2, linear), "warmup_cosine": warm_then_decay(2, cosine),
                "constant": [0.1] * 13, "plateau": [0.1] * 13}
    for schedule, lrs in expected.items():
        assert lr_per_step(monkeypatch, schedule=schedule, warmup_epochs=0.5) == pytest.approx(lrs, abs=1e-9), schedule


def warmup_epochs_row(monkeypatch, tmp_path):
    """The warm-up ends after warmup_epochs x 4 steps: the lr reaches the peak at that step, not before or after."""
    for warmup_epochs, warmup_steps in ((0.5, 2), (1.5, 6)):
        lrs = lr_per_step(monkeypatch, schedule="warmup_linear", warmup_epochs=warmup_epochs)
        assert lrs == pytest.approx(warm_then_decay(warmup_steps, linear), abs=1e-9), warmup_epochs
        assert lrs.index(max(lrs)) == warmup_steps - 1
    assert lr_per_step(monkeypatch, schedule="warmup_linear", warmup_epochs=0)[0] == pytest.approx(0.1)


def plateau_patience_row(monkeypatch, tmp_path):
    """lr / 10 at the (patience + 1)-th epoch in a row without a better accuracy, then the count starts again:
    accuracies 0.5, 0.6 (better), then 0.6 four times (none better)."""
    accuracies = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
    expected = {0: [0.1, 0.1, 0.01, 0.001, 1e-4, 1e-5], 2: [0.1, 0.1, 0.1, 0.1, 0.01, 0.01]}
    for patience, lrs in expected.items():
        trainer = trainer_for(monkeypatch, schedule="plateau", lr=0.1, plateau_patience=patience)
        seen = []
        for accuracy in accuracies:
            trainer.scheduler.step(accuracy)  # as Run.end_epoch does, once an epoch
            seen.append(trainer.lr)
        assert seen == pytest.approx(lrs, rel=1e-9), patience


# ---------------------------------------------------------------- crops, flips and colours, through the loader


def position_coded(count: int, height: int, width: int) -> ImageSet:
    """Images whose red value is 3 x the row and green 3 x the column, labelled 0..count-1: a crop tells where it was
    cut and whether it was mirrored."""
    rows = (3 * torch.arange(height)).view(1, height, 1).expand(1, height, width)
    cols = (3 * torch.arange(width)).view(1, 1, width).expand(1, height, width)
    image = torch.cat([rows, cols, torch.zeros(1, height, width, dtype=torch.int64)]).to(torch.uint8)
    return ImageSet(torch.arange(count), image.expand(count, 3, height, width).contiguous())


def cut_positions(batch) -> tuple:
    """(top, left, mirrored) of each crop of position-coded images (mean 0, std 1), read at the crop's middle, which
    a border never mirrors: the source row and column there, less the middle's index."""
    middle_row, middle_col = batch.shape[2] // 2, batch.shape[3] // 2
    rows = (batch[:, 0, :, middle_col] * 255 / 3).round().long()
    cols = (batch[:, 1, middle_row, :] * 255 / 3).round().long()
    mirrored = cols[:, middle_col] < cols[:, middle_col - 1]
    cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    return rows[:, middle_row] - middle_row, cols[:, middle_col] - middle_col, mirrored


def crops_of(monkeypatch, resize, **flags) -> tuple:
    """cut_positions of the training crops of 400 position-coded images made at the `resize` size (so that resizing
    leaves them as made), and the trainer."""
    images = position_coded(400, *resize)
    trainer = trainer_for(monkeypatch, images=images, resize=resize, batch_size=400, **RAW_PIXELS, **flags)
    batch, _ = training_batches(trainer)
    return cut_positions(batch), batch, trainer


def assert_offsets(top, left, rows: range, cols: range, flags):
    """Every offset in the ranges is taken (400 crops), and none outside them."""
    assert sorted(set(top.tolist())) == list(rows), flags
    assert sorted(set(left.tolist())) == list(cols), flags


def resize_row(monkeypatch, tmp_path):
    """The crop's offsets run over the resized image less the crop: 0..H-64 and 0..W-64."""
    for resize in ((80, 72), (66, 66)):
        (top, left, _), _, _ = crops_of(monkeypatch, resize, random_crop=64, translate=0, flip=False)
        assert_offsets(top, left, range(resize[0] - 64 + 1), range(resize[1] - 64 + 1), resize)


def random_crop_row(monkeypatch, tmp_path):
    """Training crops of the asked size, at offsets 0..70-h and 0..70-w; the evaluation view is the centre crop,
    at ((70 - h) // 2, (70 - w) // 2)."""
    for crop in ((66, 64), (64, 70)):
        (top, left, _), batch, trainer = crops_of(monkeypatch, (70, 70), random_crop=crop, translate=0, flip=False)
        assert batch.shape[-2:] == crop
        assert_offsets(top, left, range(70 - crop[0] + 1), range(70 - crop[1] + 1), crop)
        centre = next(trainer.loader.augmentation.views(position_coded(2, 70, 70).images, 1))
        assert [offsets.tolist() for offsets in cut_positions(centre)[:2]] == [[(70 - crop[0]) // 2] * 2,
                                                                             [(70 - crop[1]) // 2] * 2]


def translate_row(monkeypatch, tmp_path):
    """translate t widens the offsets of a 64 crop of a 70 image from 0..6 to -t..6+t."""
    for translate in (3, 0):
        (top, left, _), _, _ = crops_of(monkeypatch, (70, 70), random_crop=64, translate=translate, flip=False)
        assert_offsets(top, left, range(-translate, 6 + translate + 1), range(-translate, 6 + translate + 1),
                       translate)


def mirrored_by_image(trainer, epoch: int) -> torch.Tensor:
    """Whether each of the position-coded images (labelled by index) was mirrored in `epoch`."""
    batches = list(trainer.loader.train_epoch(epoch))
    _, _, mirrored = cut_positions(torch.cat([images for images, _ in batches]))
    return mirrored[torch.cat([labels for _, labels in batches]).argsort()]


def flip_row(monkeypatch, tmp_path):
    """Of 400 images: flip=False mirrors none; True about half, a fresh coin per image each epoch (about half the
    images come out alike in two epochs); alternate about half, then each image the other way the next epoch, and
    back the one after."""
    (_, _, mirrored), _, _ = crops_of(monkeypatch, (70, 70), random_crop=64, flip=False)
    assert not mirrored.any()
    for flip in (True, "alternate"):
        _, _, trainer = crops_of(monkeypatch, (70, 70), random_crop=64, flip=flip)
        first, second, third = (mirrored_by_image(trainer, epoch) for epoch in range(3))
        assert 0.4 < first.float().mean() < 0.6, flip
        if flip is True:
            assert 0.4 < (first == second).float().mean() < 0.6
        else:
            assert (first != second).all() and (first == third).all()


def coloured(rgb, count: int = 8, size: int = 70) -> ImageSet:
    colour = torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1)
    return ImageSet(torch.arange(count), colour.expand(count, 3, size, size).contiguous())


def assert_normalised(monkeypatch, mean, std):
    """An image of colour (51, 102, 204), i.e. (0.2, 0.4, 0.8), becomes (c - mean) / std everywhere, in training and
    in the evaluation views."""
    trainer = trainer_for(monkeypatch, images=coloured((51, 102, 204)), batch_size=8, mean=mean, std=std)
    expected = torch.tensor([(c - m) / s for c, m, s in zip((0.2, 0.4, 0.8), mean, std)]).view(1, 3, 1, 1)
    batch, _ = training_batches(trainer)
    for images in (batch, next(trainer.loader.augmentation.views(coloured((51, 102, 204)).images, 10))):
        torch.testing.assert_close(images, expected.expand_as(images), msg=lambda text: f"{mean}, {std}: {text}")


def mean_row(monkeypatch, tmp_path):
    for mean in ((0.1, 0.2, 0.3), (0.6, 0.5, 0.4)):
        assert_normalised(monkeypatch, mean, (0.5, 0.25, 0.125))


def std_row(monkeypatch, tmp_path):
    for std in ((0.5, 0.25, 0.125), (1.0, 2.0, 4.0)):
        assert_normalised(monkeypatch, (0.1, 0.2, 0.3), std)


def pca_color_row(monkeypatch, tmp_path):
    """The paper's colour noise shifts an image by sum_i a_i l_i p_i, a_i ~ N(0, s), (l_i, p_i) the eigenpairs of the
    training pixels' RGB covariance C: the shifts' covariance is s^2 sum_i l_i^2 p_i p_i^T = s^2 C^2. By hand on 2000
    one-colour images, their colours correlated; the shift is what the crop shows less the image's own colour."""
    generator = torch.Generator().manual_seed(1)
    level = torch.rand(2000, generator=generator)
    colours = torch.stack([40 + 160 * level, 40 + 80 * level + 30 * torch.rand(2000, generator=generator),
                           100 + 50 * torch.rand(2000, generator=generator)], dim=1).round()
    images = ImageSet(torch.arange(2000), colours.to(torch.uint8)[:, :, None, None].repeat(1, 1, 64, 64))
    covariance = torch.cov((colours / 255).double().T)
    for strength in (0.5, 0.0):
        trainer = trainer_for(monkeypatch, images=images, pca_color=strength, resize=64, random_crop=64, translate=0,
                              batch_size=500, **RAW_PIXELS)
        batch, labels = training_batches(trainer)
        shifts = batch[:, :, 0, 0].double() - colours[labels].double() / 255
        if strength == 0:
            assert shifts.abs().max() < 1e-6
            continue
        expected = strength**2 * covariance @ covariance
        error = (torch.cov(shifts.T) - expected).norm() / expected.norm()
        assert error < 0.15, error  # a sampling error of a few percent over 2000 images


def cutout_row(monkeypatch, tmp_path):
    """Each training crop (64 x 64) has one blank rectangle, the side x side square unless a border clips it: a square
    centred at c covers [c - side // 2, c - side // 2 + side), at the edges 3 of a side of 5 or 6, or 4 of 6."""
    for side, smallest in ((6, 3), (5, 3), (0, 0)):
        trainer = trainer_for(monkeypatch, images=coloured((255, 255, 255), count=200), batch_size=200, cutout=side,
                              random_crop=64, translate=0)
        batch, _ = training_batches(trainer)
        blank = batch[:, 0] == 0  # white is 1 after the default normalisation; the cutout is 0, the mean colour
        heights, widths = blank.any(dim=2).sum(dim=1), blank.any(dim=1).sum(dim=1)
        assert torch.equal(blank.sum(dim=(1, 2)), heights * widths), side  # one rectangle
        for sides in (heights, widths):
            assert int(sides.min()) == smallest and int(sides.max()) == side, side
            assert int(sides.mode().values) == side, side  # most centres are far from the borders


# ---------------------------------------------------------------- data


def val_size_row(monkeypatch, tmp_path):
    """Of the fake data set's 1000 training images, val_size x 1000 are held out."""
    for val_size, held_out in ((0.25, 250), (0.0, 0)):
        data = load_data(config(val_size=val_size, batch_size=8), CPU, writer=True)
        assert len(data.train) == 1000 - held_out, val_size
        assert (len(data.val) if data.val is not None else 0) == held_out, val_size


def fraction_of_data_row(monkeypatch, tmp_path):
    """After 200 of 1000 fake images are held out, the fraction of the other 800 trains, each image once."""
    for fraction, count in ((0.3, 240), (1.0, 800)):
        data = load_data(config(val_size=0.2, fraction_of_data=fraction, batch_size=8), CPU, writer=True)
        assert len(data.train) == count, fraction
        assert len(torch.unique(data.train.images.flatten(1), dim=0)) == count, fraction  # without replacement


def seed_row(monkeypatch, tmp_path):
    """The seed draws the split, the initial weights, the data order and crops, and the dropout stream: each the same
    for the same seed, another for another seed."""
    def draws(seed):
        data = load_data(config(seed=seed, batch_size=8), CPU, writer=True)
        trainer = trainer_for(monkeypatch, images=data.train, seed=seed, batch_size=8)
        plan = trainer.loader.plan(0)
        return {"split": data.val.images, "weights": weights(trainer.model)[0], "order": plan.order,
                "crops": plan.top, "dropout": torch.rand(8)}

    first, again, other = draws(3), draws(3), draws(4)
    for name in first:
        assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name]), name


def folder_config(root, **flags) -> Config:
    return config(data_dir=str(root), val_size=0.0, batch_size=2, num_workers=0, cache_dir="none", **flags)


def dataset_row(monkeypatch, tmp_path):
    """One data_dir holding both CIFAR-10's batches (4 images a batch, 5 training batches) and an image folder
    (2 classes of 3): each dataset reads its own; fake makes its 1000 images of 10 patterns."""
    from torchvision.datasets import CIFAR10

    members = cifar_members(per_batch=4)
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name, data in members.items():
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(data)
    for name, value in md5_lists(members).items():  # torchvision checks the files against these md5s
        monkeypatch.setattr(CIFAR10, name, value)
    write_folder(tmp_path, "train", per_class=3, classes=("cat", "dog"))
    expected = {"cifar10": (CIFAR_CLASSES, 20), "folder": (["cat", "dog"], 6),
                "fake": ([f"pattern{i}" for i in range(10)], 1000)}
    for dataset, (classes, count) in expected.items():
        data = load_data(folder_config(tmp_path, dataset=dataset), CPU, writer=True)
        assert (data.classes, len(data.train)) == (classes, count), dataset


def data_dir_row(monkeypatch, tmp_path):
    """Two image folders, 2 classes of 2 images and 3 classes of 1: each data_dir reads its own."""
    write_folder(tmp_path / "a", "train", per_class=2, classes=("ant", "bee"))
    write_folder(tmp_path / "b", "train", per_class=1, classes=("cat", "dog", "elk"))
    for folder, classes, count in (("a", ["ant", "bee"], 4), ("b", ["cat", "dog", "elk"], 3)):
        data = load_data(folder_config(tmp_path / folder, dataset="folder"), CPU, writer=True)
        assert (data.classes, len(data.train)) == (classes, count), folder


def batch_size_row(monkeypatch, tmp_path):
    """12 training images make 12 // batch optimizer steps of batch images each."""
    for batch_size in (4, 6):
        trainer = trainer_for(monkeypatch, images=blank(12), batch_size=batch_size)
        sizes = [len(labels) for _, labels in trainer.loader.train_epoch(0)]
        assert sizes == [batch_size] * (12 // batch_size), batch_size


# ---------------------------------------------------------------- the network (AlexNet itself)


def convolutions(model) -> list:
    return [layer for layer in model.features if isinstance(layer, torch.nn.Conv2d)]


def mixes(convolution) -> bool:
    """Whether the first half of a convolution's outputs sees the second half of its inputs."""
    inputs = torch.randn(1, convolution.in_channels, 11, 11, generator=torch.Generator().manual_seed(0))
    changed = inputs.clone()
    changed[:, convolution.in_channels // 2:] += 1
    half = convolution.out_channels // 2
    with torch.no_grad():
        return not torch.equal(convolution(inputs)[:, :half], convolution(changed)[:, :half])


def groups_row(monkeypatch, tmp_path):
    """groups=2 is the paper's network: 96, 256, 384, 384, 256 maps, and conv2, conv4 and conv5 see only their own
    column; groups=1 the seed's one column of 64, 192, 384, 256, 256, every layer seeing every map."""
    expected = {2: ([96, 256, 384, 384, 256], [True, False, True, False, False]),
                1: ([64, 192, 384, 256, 256], [True] * 5)}
    for groups, (widths, mixing) in expected.items():
        convs = convolutions(alexnet_for(groups=groups))
        assert [conv.out_channels for conv in convs] == widths, groups
        assert [mixes(conv) for conv in convs] == mixing, groups


def dropout_row(monkeypatch, tmp_path):
    """Both dropouts (before the two hidden linear layers) zero a fraction p of a training batch's features and
    scale the others by 1 / (1 - p)."""
    model = alexnet_for(dropout=0.3).train()
    dropouts = [layer for layer in model.classifier if isinstance(layer, torch.nn.Dropout)]
    assert len(dropouts) == 2
    for dropout in dropouts:
        out = dropout(torch.ones(200_000))
        assert abs(float((out == 0).float().mean()) - 0.3) < 0.01
        torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))


class Widths(torch.nn.Dropout):
    """Stands in for the first dropout (a p of 0.5, as the model checks it): records how many features it is handed."""

    def __init__(self):
        super().__init__(p=0.5)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[1])
        return x


def first_linear_once_row(monkeypatch, tmp_path):
    """At 64 x 64, conv5 leaves 256 maps of 1 x 1, pooled to 256 x 6 x 6 = 9216 copies: in training the first
    dropout sees the 256 features once (one mask per feature) with the flag, the 9216 copies without."""
    for once, width in ((True, 256), (False, 9216)):
        model = alexnet_for(first_linear_once=once, dropout=0.5).train()
        model.classifier[0] = Widths()
        model(torch.randn(2, 3, 64, 64))
        assert model.classifier[0].seen == [width], once


def lrn_alpha_row(monkeypatch, tmp_path):
    """Both normalisations (after conv1 and conv2) divide each map by (2 + alpha / 5 x the sum of the squares of it
    and its two neighbours on each side, zeros past the ends)^0.75: on six maps of 1..6, by hand."""
    maps = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    for alpha in (1e-4, 0.5):
        by_hand = [value / (2 + alpha / 5 * sum(v * v for v in maps[max(0, i - 2):i + 3])) ** 0.75
                   for i, value in enumerate(maps)]
        norms = [layer for layer in alexnet_for(lrn_alpha=alpha).features
                 if isinstance(layer, torch.nn.LocalResponseNorm)]
        assert len(norms) == 2
        for norm in norms:
            out = norm(torch.tensor(maps).view(1, 6, 1, 1)).flatten()
            torch.testing.assert_close(out, torch.tensor(by_hand), msg=f"alpha {alpha}")


def first_linear_scaled_row(monkeypatch, tmp_path):
    """fc1 gets its own group, lr / copies and weight decay x copies, where copies is how often the 6x6 pooling repeats
    each conv5 value. Sides through conv1 (11/4, padded 2) and the three 3/2 poolings: a 64 crop 64 -> 15 -> 7 -> 3 ->
    1, a 1x1 map, 36 copies; a 95 crop 95 -> 23 -> 11 -> 5 -> 2, a 2x2 map, 9 copies. Without the flag, one group."""
    fc1 = {"classifier.1.weight", "classifier.1.bias"}
    for crop, copies in ((64, 36), (95, 9)):
        model = alexnet_for(random_crop=(crop, crop), resize=(crop, crop))
        names = {id(p): name for name, p in model.named_parameters()}
        for scaled in (False, True):
            groups = build_optimizer(model, config(first_linear_scaled=scaled, random_crop=(crop, crop),
                                                   resize=(crop, crop), lr=0.05, weight_decay=5e-4)).param_groups
            if not scaled:
                assert len(groups) == 1 and groups[0]["lr"] == 0.05 and groups[0]["weight_decay"] == 5e-4
                continue
            assert [{names[id(p)] for p in group["params"]} & fc1 for group in groups] == [set(), fc1], crop
            assert groups[0]["lr"] == 0.05 and groups[0]["weight_decay"] == 5e-4
            assert groups[1]["lr"] == pytest.approx(0.05 / copies) and groups[1]["weight_decay"] == pytest.approx(
                5e-4 * copies), crop


def conv1_from_data_row(monkeypatch, tmp_path):
    """conv1 from the training images: on their 11x11 patches (stride 4, normalised as the network sees them), the
    first half of the filters give uncorrelated outputs, each of the variance He's initialisation gives there
    (2 / 363 x the patches' summed second moment), the second half their negatives; without the flag, He's own."""
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(300, 3, 18, 18, generator=generator), size=(70, 70),
                                             mode="bilinear")  # correlated pixels, as in photographs
    images = ImageSet(torch.zeros(300, dtype=torch.int64), (smooth * 255).round().to(torch.uint8))
    x = (images.images.double() / 255 - 0.5) / 0.5
    patches = torch.cat([x[:, :, top:top + 11, left:left + 11].reshape(300, -1)
                         for top in range(0, 60, 4) for left in range(0, 60, 4)])
    covariance = torch.cov(patches.T)
    target = 2 / 363 * float((patches ** 2).mean(0).sum())
    for on in (True, False):
        cfg = config(conv1_from_data=on)
        model = training.build_model(cfg, Accelerator(cpu=True), 10, train_set=images)
        filters = model.features[0].weight.detach().double().reshape(64, -1)
        outputs = filters[:32] @ covariance @ filters[:32].T
        whitened = torch.allclose(outputs, target * torch.eye(32, dtype=torch.float64), atol=0.02 * target)
        assert whitened == on, on
        if on:
            assert torch.equal(filters[32:], -filters[:32]) and not model.features[0].bias.any()


def init_row(monkeypatch, tmp_path):
    """Standard deviations of conv1 (fan-in 3 x 11 x 11 = 363) and fc1 (fan-in 9216): He's sqrt(2 / fan_in),
    PyTorch's uniform of bound 1 / sqrt(fan_in), i.e. 1 / sqrt(3 fan_in), the paper's 0.01 (and its biases of 1)."""
    expected = {"kaiming": (math.sqrt(2 / 363), math.sqrt(2 / 9216)),
                "pytorch": (1 / math.sqrt(3 * 363), 1 / math.sqrt(3 * 9216)), "paper": (0.01, 0.01)}
    for init, stds in expected.items():
        model = alexnet_for(init=init)
        layers = convolutions(model)[0], model.classifier[1]
        assert [float(layer.weight.detach().std()) for layer in layers] == pytest.approx(stds, rel=0.03), init
        assert bool((convolutions(model)[1].bias == 1).all()) == (init == "paper"), init


class ViewRecorder(torch.nn.Module):
    """Stands in for AlexNet in evaluation: records every view it is shown, predicts class 0."""

    def __init__(self, num_classes: int, **_):
        super().__init__()
        self.num_classes, self.views = num_classes, []

    def forward(self, x):
        self.views.append(x.clone())
        return torch.zeros(len(x), self.num_classes)


def tta_row(monkeypatch, tmp_path):
    """--train=False evaluates each test image through the views of --tta, 64 crops of 70 x 70 images: none the
    centre (3, 3); flip adds its mirror; ten the paper's four corners too, each also mirrored."""
    recorders = []

    def recorder(**flags):
        recorders.append(ViewRecorder(**flags))
        return recorders[-1]

    monkeypatch.setattr(training, "alexnet", recorder)
    centre = [(3, 3, False)]
    expected = {"none": centre, "flip": centre + [(3, 3, True)],
                "ten": [(top, left, mirrored) for top, left in ((3, 3), (0, 0), (0, 6), (6, 0), (6, 6))
                        for mirrored in (False, True)]}
    test = position_coded(4, 70, 70)
    for tta, views in expected.items():
        cfg = config(tta=tta, train=False, load_model_path="unused.pth", translate=0, **RAW_PIXELS)
        plan = Plan(cfg=cfg, weights=None, data=Data(test, None, test, ["a", "b", "c", "d"]), micro_batch=4)
        training.evaluate_saved(plan, Accelerator(cpu=True))
        seen = [tuple(int(values[0]) for values in cut_positions(view)) for view in recorders[-1].views]
        assert sorted(seen) == sorted(views), tta


# ---------------------------------------------------------------- the table

LEARNED_ROWS = {
    "resize": resize_row,
    "random_crop": random_crop_row,
    "mean": mean_row,
    "std": std_row,
    "batch_size": batch_size_row,
    "val_size": val_size_row,
    "fraction_of_data": fraction_of_data_row,
    "lr": sgd_row("lr", (0.2, 0.7)),
    "momentum": sgd_row("momentum", (0.6, 0.3)),
    "weight_decay": sgd_row("weight_decay", (0.03, 0.1)),
    "nesterov": sgd_row("nesterov", (False, True)),
    "schedule": schedule_row,
    "warmup_epochs": warmup_epochs_row,
    "plateau_patience": plateau_patience_row,
    "label_smoothing": sgd_row("label_smoothing", (0.0, 0.4)),
    "ema": ema_row,
    "dropout": dropout_row,
    "first_linear_once": first_linear_once_row,
    "seed": seed_row,
    "dataset": dataset_row,
    "data_dir": data_dir_row,
    "flip": flip_row,
    "translate": translate_row,
    "pca_color": pca_color_row,
    "cutout": cutout_row,
    "groups": groups_row,
    "lrn_alpha": lrn_alpha_row,
    "first_linear_scaled": first_linear_scaled_row,
}
# flags outside the resume set that still decide what a run computes: the initial weights, the final evaluation
OTHER_ROWS = {"init": init_row, "conv1_from_data": conv1_from_data_row, "tta": tta_row}

MISSING_ROW = (
    "--{name} changes what is learned (learned=True in alexnet_dist/config.py) but has no row in LEARNED_ROWS of "
    "tests/test_learned_flags.py: add a check that fails when the flag is ignored or mis-applied, its expectation "
    "worked out by hand, and a mutation that proves it in scripts/mutation_check.py"
)


@pytest.mark.parametrize("name", WHAT_IS_LEARNED + tuple(OTHER_ROWS))
def test_flag_does_what_its_help_line_says(name, monkeypatch, tmp_path):
    row = LEARNED_ROWS.get(name) or OTHER_ROWS.get(name)
    assert row is not None, MISSING_ROW.format(name=name)
    row(monkeypatch, tmp_path)


def test_the_rows_are_the_resume_set():
    """A row whose flag is no longer learned (renamed, or learned=False) belongs in OTHER_ROWS or nowhere, and a flag
    now learned moves from OTHER_ROWS to LEARNED_ROWS."""
    assert sorted(set(LEARNED_ROWS) - set(WHAT_IS_LEARNED)) == [], "rows of flags that are not learned=True"
    assert sorted(set(OTHER_ROWS) & set(WHAT_IS_LEARNED)) == [], "learned flags among OTHER_ROWS"
