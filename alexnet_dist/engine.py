"""Training and evaluation loops on an Accelerator.

One optimizer step = grad_accum_steps micro-batches on each of num_processes ranks, inside
`accelerator.accumulate()`; the learning-rate schedule advances once per optimizer step.
Losses and accuracies stay on the device and are read (a host synchronisation) only every
`log_freq` steps and at the end of an epoch. Evaluation counts a confusion matrix over each rank's
disjoint shard and sums it across ranks, so every image is counted exactly once.
"""

import contextlib
import math
import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .clock import clock



def build_optimizer(model: nn.Module, cfg, device, lr_on_device: bool = False) -> torch.optim.SGD:
    """Fused SGD; with `lr_on_device` the learning rate is a tensor the schedulers fill in place."""
    lr = torch.tensor(cfg.lr, device=device) if lr_on_device else cfg.lr
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
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
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=cfg.plateau_patience)
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
                        confusions[index] += torch.bincount(labels[:valid] * num_classes + predictions, minlength=cells)
    confusions = accelerator.reduce(confusions, reduction="sum").view(len(modes), num_classes, num_classes).cpu()
    return dict(zip(modes, confusions))


class WeightAverage:
    """Exponential moving average of the weights (decay ramped up as (1 + t) / (10 + t) early on)."""

    def __init__(self, model, decay: float):
        self.parameters = [parameter for parameter in model.parameters()]
        self.average = [parameter.detach().float().clone() for parameter in self.parameters]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [parameter.detach().float() for parameter in self.parameters], 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the averaged weights inside the block (copied in place: CUDA graphs keep working)."""
        backup = [parameter.detach().clone() for parameter in self.parameters]
        with torch.no_grad():
            for parameter, average in zip(self.parameters, self.average):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, saved in zip(self.parameters, backup):
                    parameter.copy_(saved)

    def state_dict(self) -> dict:
        return {"average": self.average, "updates": self.updates}

    def load_state_dict(self, state: dict):
        for average, saved in zip(self.average, state["average"]):
            average.copy_(saved)
        self.updates = state["updates"]


class Evaluator:
    """Accuracy of the current weights, and of their moving average when there is one."""

    def __init__(self, accelerator, model, num_classes: int, batch_size: int, average=None):
        self.accelerator, self.model, self.num_classes = accelerator, model, num_classes
        self.batch_size, self.average = batch_size, average

    def __call__(self, loader, modes) -> dict:
        """{(weights, mode): confusion}, weights being "model" and, with an average, "ema"."""
        run = lambda: evaluate(self.model, loader, self.accelerator, self.num_classes, self.batch_size, modes)
        results = {("model", mode): confusion for mode, confusion in run().items()}
        if self.average is not None:
            with self.average.swapped_in():
                results.update({("ema", mode): confusion for mode, confusion in run().items()})
        return results


class Trainer:
    """The prepared model, optimizer, schedule and step, the training loader, and the count of optimizer steps.

    `steps(epoch)` trains an epoch and yields after every optimizer step; the epoch's mean loss,
    accuracy and speed are in `epoch_stats` once it is done. Losses stay on the device and are read
    only at log points (`log_point`) and at the end of an epoch.
    """

    def __init__(self, cfg, accelerator, model, optimizer, scheduler, loader, step, make_loader):
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.optimizer, self.scheduler, self.loader, self.step = optimizer, scheduler, loader, step
        self.make_loader = make_loader  # an evaluation loader over another split, with the same preprocessing
        self.graphs = hasattr(step, "graph")
        self.average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
        self.global_step, self.epoch_stats = 0, None
        # the steps that warm up, record the graph or compile: counted apart in the time breakdown
        self.calls, self.first_steps = 0, getattr(step, "warmup", 0) + 1
        device = accelerator.device
        # the first optimizer step whose loss was not finite (-1: none), kept on the device until asked
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=device)
        self.nonfinite_count = torch.zeros((), dtype=torch.int64, device=device)
        self.window = torch.zeros(2, device=device)  # loss sum, correct predictions since the last log point
        self.window_micro = self.window_images = 0

    def nonfinite(self) -> tuple:
        """(first optimizer step with a non-finite loss on any rank, or None; how many micro-batches had one).

        Reads the device counters, so it synchronises: called at log points, epoch ends and saves.
        """
        firsts = self.accelerator.gather(self.first_nonfinite[None]).tolist()
        count = int(self.accelerator.reduce(self.nonfinite_count.clone(), reduction="sum"))
        steps = [step for step in firsts if step >= 0]
        return (min(steps) if steps else None), count

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def plateau(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def steps(self, epoch: int, start_step: int = 0):
        """Train `epoch` from optimizer step `start_step`; yield the steps done in the epoch after each one."""
        with clock.part("training"):
            yield from self._steps(epoch, start_step)

    def _steps(self, epoch: int, start_step: int):
        accelerator, device = self.accelerator, self.accelerator.device
        self.model.train()
        self.bar = tqdm(total=self.loader.steps_per_epoch - start_step, desc=f"epoch {epoch + 1}/{self.cfg.num_epochs}",
                        leave=False, dynamic_ncols=True, disable=not (accelerator.is_main_process and sys.stderr.isatty()))
        totals = torch.zeros(2, device=device)  # loss sum, correct predictions: of the epoch
        self.epoch_started, self.epoch_images = time.perf_counter(), 0
        step_in_epoch, micro_done = start_step, 0
        try:
            for images, labels in self.loader.train_epoch(epoch, start_step):
                with clock.part("first_steps") if self.calls < self.first_steps else contextlib.nullcontext():
                    loss, logits = self.step(images, labels)
                self.calls += 1
                bad = ~torch.isfinite(loss)
                self.first_nonfinite = torch.where((self.first_nonfinite < 0) & bad, self.global_step + 1, self.first_nonfinite)
                self.nonfinite_count += bad
                both = torch.stack([loss.float(), (logits.argmax(dim=1) == labels).sum().float()])
                totals += both
                self.window += both
                micro_done, self.window_micro = micro_done + 1, self.window_micro + 1
                self.window_images, self.epoch_images = self.window_images + len(labels), self.epoch_images + len(labels)
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                step_in_epoch += 1
                if self.average is not None:
                    self.average.update()
                if not self.plateau:
                    self.scheduler.step()
                self.bar.update(1)
                yield step_in_epoch
        finally:
            self.bar.close()
        loss_sum, correct_sum = accelerator.reduce(totals, reduction="sum").tolist()
        seconds = time.perf_counter() - self.epoch_started
        images_seen = self.epoch_images * accelerator.num_processes
        self.epoch_stats = {"train_loss": loss_sum / max(1, micro_done * accelerator.num_processes),
                            "train_accuracy": correct_sum / max(1, images_seen),
                            "images_per_second": images_seen / seconds, "epoch_seconds": seconds}

    def log_point(self) -> dict:
        """The training loss since the last log point, across ranks (a synchronisation); shown on the bar."""
        accelerator = self.accelerator
        loss_sum, correct_sum = accelerator.reduce(self.window, reduction="sum").tolist()
        train_loss = loss_sum / (self.window_micro * accelerator.num_processes)
        rate = self.epoch_images * accelerator.num_processes / (time.perf_counter() - self.epoch_started)
        self.bar.set_postfix(loss=f"{train_loss:.3f}", img_s=f"{rate:,.0f}",
                             acc=f"{correct_sum / (self.window_images * accelerator.num_processes):.3f}")
        if accelerator.is_main_process:
            self.bar.write(f"step {self.global_step}: training loss {train_loss:.4f}, lr {self.lr:.4g}, {rate:,.0f} images/s")
        self.window.zero_()
        self.window_micro = self.window_images = 0
        return {"Loss/Train": train_loss, "lr": self.lr}

    def end_of_epoch(self, val_accuracy, train_accuracy: float):
        if self.plateau:
            self.scheduler.step(train_accuracy if val_accuracy is None else val_accuracy)
