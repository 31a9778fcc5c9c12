"""Optimizer, schedules, evaluation, the weights' moving average, and the on-device training meter.

One optimizer step = grad_accum_steps micro-batches on each of num_processes ranks, inside
`accelerator.accumulate()`; the learning-rate schedule advances once per optimizer step.
Losses and accuracies stay on the device and are read (a host synchronisation) only every
`log_freq` steps and at the end of an epoch. Evaluation counts a confusion matrix over each rank's
disjoint shard and sums it across ranks, so every image is counted exactly once.
"""

import math
import time

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .model import layer_name, pooled_copies

FIRST_LINEAR = f"{layer_name('fc1')}."  # fc1's parameters


def build_optimizer(model: nn.Module, cfg) -> torch.optim.SGD:
    """SGD as the paper ran it (momentum, weight decay), fused into a few kernels.

    fc1 reads each conv5 value `copies` times (the 6x6 pooling repeats a 1x1 map 36 times), so its 36 weight blocks
    get the same gradient and their sum, the layer that acts, moves `copies` times as far per step as a plain layer
    over conv5's outputs would, while weight decay shrinks it at the plain rate. --first_linear_scaled gives fc1 its
    own group with lr / copies and weight decay x copies: the steps of that plain layer. Its group comes second, so
    that group 0 holds the peak lr the logs show."""
    copies = pooled_copies(cfg.random_crop) if cfg.first_linear_scaled else 1
    named = list(model.named_parameters())
    groups = [{"params": [p for name, p in named if not name.startswith(FIRST_LINEAR)], "decay_scale": 1.0}]
    first = [p for name, p in named if name.startswith(FIRST_LINEAR)]
    if copies == 1:
        groups[0]["params"] += first
    else:
        groups.append({"params": first, "lr": cfg.lr / copies, "weight_decay": cfg.weight_decay * copies,
                       "decay_scale": float(copies)})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov, fused=True)


def lr_factor(schedule: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (warm-up, then decay to 0 at the end)."""
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "warmup_cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer, cfg, steps_per_epoch: int):
    """plateau: the paper's "divide by 10 when validation accuracy stops improving", once per epoch;
    the others: a LambdaLR stepped once per optimizer step."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.1, patience=cfg.plateau_patience
        )
    warmup = round(cfg.warmup_epochs * steps_per_epoch) if cfg.schedule.startswith("warmup") else 0
    total = cfg.num_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg.schedule, step, warmup, total))


def accuracy(confusion: torch.Tensor) -> float:
    return float(confusion.diagonal().sum().double() / confusion.sum().clamp(min=1).double())


def per_class_accuracy(confusion: torch.Tensor) -> list:
    """Accuracy of each true class (a row of the confusion matrix)."""
    return (confusion.diagonal().double() / confusion.sum(dim=1).clamp(min=1).double()).tolist()


TTA_VIEWS = {"none": 1, "flip": 2, "ten": 10}  # how many of Augmentation.views each mode averages


@torch.no_grad()
def view_probabilities(model, augmentation, images, tta: str) -> torch.Tensor:
    """Class probabilities of uint8 `images`, softmax averaged over the test-time views of `tta`."""
    views = list(augmentation.views(images, TTA_VIEWS[tta]))
    return sum(torch.softmax(model(view).float(), dim=1) for view in views) / len(views)


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int, batch_size: int, modes=("none",)) -> dict:
    """Confusion matrices (true x predicted class), one per test-time mode, over the whole split.

    Each view is computed once: "none" is the centre crop, "flip" adds its mirror image, "ten" the
    four corners and their mirrors, softmax averaged. Per-rank counts are summed across ranks.
    """
    model.eval()
    cells = num_classes * num_classes
    confusions = torch.zeros(len(modes), cells, dtype=torch.int64, device=accelerator.device)
    with accelerator.autocast():
        for images, labels, valid in loader.eval_batches(batch_size):
            probabilities = 0
            for count, view in enumerate(loader.augmentation.views(images, max(TTA_VIEWS[m] for m in modes)), 1):
                probabilities = probabilities + torch.softmax(model(view).float(), dim=1)
                for index, mode in enumerate(modes):
                    if TTA_VIEWS[mode] == count:
                        predictions = probabilities[:valid].argmax(dim=1)
                        confusions[index] += torch.bincount(
                            labels[:valid] * num_classes + predictions, minlength=cells
                        )
    confusions = accelerator.reduce(confusions, reduction="sum").view(len(modes), num_classes, num_classes).cpu()
    return dict(zip(modes, confusions))


def build_average(model, decay: float) -> AveragedModel | None:
    """--ema: an exponential moving average of the weights (its first update copies them), evaluated alongside."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay > 0 else None


class Evaluator:
    """Accuracy of the current weights, and of their moving average when there is one."""

    def __init__(self, accelerator, model, num_classes: int, batch_size: int, average=None):
        self.accelerator, self.num_classes, self.batch_size = accelerator, num_classes, batch_size
        self.models = {"model": model, **({"ema": average} if average is not None else {})}

    def __call__(self, loader, modes) -> dict:
        """{(weights, mode): confusion}, weights being "model" and, with an average, "ema"."""
        return {
            (name, mode): confusion
            for name, model in self.models.items()
            for mode, confusion in evaluate(
                model, loader, self.accelerator, self.num_classes, self.batch_size, modes
            ).items()
        }


class Meter:
    """The training loss and accuracy, summed on the device (read only at log points and epoch ends: reading is a
    host synchronisation), and the first optimizer step whose loss was not finite.

    window and epoch hold four sums: loss, correct predictions, micro-batches, images (since the last log point,
    and over the epoch). Summed across ranks they give the figures whatever the number of processes, and a
    checkpoint keeps them (`totals`, `restore`), so that a resumed run logs what an unbroken one would."""

    def __init__(self, accelerator, replicas: int | None = None):
        self.accelerator, device = accelerator, accelerator.device
        # the copies that train on different images (the layout's replicas: a pair of columns shares its images)
        self.replicas = replicas or accelerator.num_processes
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=device)  # -1: none yet
        self.nonfinite_count = torch.zeros((), dtype=torch.int64, device=device)
        self.window = torch.zeros(4, device=device)
        self.epoch = torch.zeros(4, device=device)
        self.start_epoch()

    def start_epoch(self):
        self.epoch.zero_()
        self.timed_images, self.epoch_started = 0, time.perf_counter()  # this process's, for the speed

    def add(self, loss, logits, labels, step: int):
        """One micro-batch of optimizer step `step` (device operations only: no synchronisation)."""
        bad = ~torch.isfinite(loss)
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & bad, step, self.first_nonfinite)
        self.nonfinite_count += bad
        correct = (logits.argmax(dim=1) == labels).sum().float()
        sums = torch.stack([loss.float(), correct, torch.ones_like(correct), torch.full_like(correct, len(labels))])
        self.window += sums
        self.epoch += sums
        self.timed_images += len(labels)

    def images_per_second(self) -> float:
        return self.timed_images * self.replicas / max(time.perf_counter() - self.epoch_started, 1e-9)

    def _means(self, sums) -> tuple:
        """(mean loss per micro-batch, accuracy) of summed figures, across ranks (a synchronisation)."""
        loss, correct, micro_batches, images = self.accelerator.reduce(sums.clone(), reduction="sum").tolist()
        return loss / max(1.0, micro_batches), correct / max(1.0, images)

    def log_point(self) -> tuple:
        """(mean training loss, accuracy) since the last log point, across ranks (a synchronisation)."""
        values = self._means(self.window)
        self.window.zero_()
        return values

    def epoch_stats(self) -> dict:
        train_loss, train_accuracy = self._means(self.epoch)
        seconds = time.perf_counter() - self.epoch_started
        return {
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "images_per_second": self.timed_images * self.replicas / seconds,
            "epoch_seconds": seconds,
        }

    def totals(self) -> dict:
        """The sums across ranks, for a checkpoint (a synchronisation)."""
        window, epoch = (self.accelerator.reduce(sums.clone(), reduction="sum").tolist()
                         for sums in (self.window, self.epoch))
        first, count = self.nonfinite()
        return {"window": window, "epoch": epoch, "first_nonfinite": first, "nonfinite_count": count}

    def restore(self, totals: dict, epoch: bool):
        """A checkpoint's sums back on the main process (zeros on the others: the sums across ranks are the saved
        ones, whatever the number of processes now): the log window and non-finite record, or (epoch=True, after
        start_epoch) the sums of the epoch the checkpoint fell in."""
        main = self.accelerator.is_main_process
        if epoch:
            self.epoch.copy_(torch.tensor(totals["epoch"]) if main else torch.zeros(4))
            return
        self.window.copy_(torch.tensor(totals["window"]) if main else torch.zeros(4))
        first = totals["first_nonfinite"]
        self.first_nonfinite.fill_(-1 if first is None else first)
        self.nonfinite_count.fill_(totals["nonfinite_count"] if main else 0)

    def nonfinite(self) -> tuple:
        """(first optimizer step with a non-finite loss on any rank, or None; how many micro-batches had one).
        The first step is a minimum across ranks: gathered, as Accelerate's reduce has only sum and mean."""
        firsts = self.accelerator.gather(self.first_nonfinite[None]).tolist()
        count = int(self.accelerator.reduce(self.nonfinite_count.clone(), reduction="sum"))
        steps = [step for step in firsts if step >= 0]
        return (min(steps) if steps else None), count


class NonfiniteGuard:
    """--skip_nonfinite: an optimizer step whose loss was not finite on any micro-batch of any rank is skipped
    (DDP has already averaged that rank's gradients into every rank's). Works with any optimizer, at the price of
    one host synchronisation per micro-step and one all-reduce per optimizer step; without the flag it costs nothing.
    """

    def __init__(self, accelerator, enabled: bool):
        self.accelerator, self.enabled, self.bad = accelerator, enabled, False

    def allows(self, loss) -> bool:
        if not self.enabled:
            return True
        self.bad = self.bad or not bool(torch.isfinite(loss))
        if not self.accelerator.sync_gradients:
            return True  # Accelerate's optimizer does not step before the last micro-step anyway
        flag = torch.tensor(float(self.bad), device=self.accelerator.device)
        self.bad = False
        return float(self.accelerator.reduce(flag, reduction="sum")) == 0
