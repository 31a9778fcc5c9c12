"""Training and evaluation loops on an Accelerator.

One optimizer step = grad_accum_steps micro-batches on each of num_processes ranks, inside
`accelerator.accumulate()`; the learning-rate schedule advances once per optimizer step.
Losses and accuracies stay on the device and are read (a host synchronisation) only every
`log_freq` steps and at the end of an epoch. Evaluation counts a confusion matrix over each rank's
disjoint shard and sums it across ranks, so every image is counted exactly once.
"""

import math
import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm


def build_optimizer(model: nn.Module, cfg, device) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov, fused=device.type in ("cuda", "cpu"),
    )


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
    return float(confusion.diagonal().sum() / confusion.sum().clamp(min=1))


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int, batch_size: int) -> torch.Tensor:
    """Confusion matrix (true class x predicted class) over the whole split, summed across ranks."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=accelerator.device)
    for images, labels, valid in loader.eval_batches(batch_size):
        predictions = model(loader.augmentation.centre(images))[:valid].argmax(dim=1)
        confusion += torch.bincount(labels[:valid] * num_classes + predictions, minlength=num_classes * num_classes)
    return accelerator.reduce(confusion, reduction="sum").view(num_classes, num_classes).cpu()


class Trainer:
    """Holds the prepared model, optimizer and scheduler, and the count of optimizer steps."""

    def __init__(self, cfg, accelerator, model, optimizer, scheduler, train_loader, log):
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.optimizer, self.scheduler, self.loader, self.log = optimizer, scheduler, train_loader, log
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.global_step = 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(self, epoch: int, start_step: int = 0) -> dict:
        """One epoch from optimizer step `start_step`; returns its mean loss, accuracy and speed."""
        accelerator, cfg, device = self.accelerator, self.cfg, self.accelerator.device
        self.model.train()
        steps = self.loader.steps_per_epoch - start_step
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", leave=False, dynamic_ncols=True,
                   disable=not (accelerator.is_main_process and sys.stderr.isatty()))
        loss_sum, window_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, window_micro, started = 0, 0, time.perf_counter()
        for images, labels in self.loader.train_epoch(epoch, start_step):
            with accelerator.accumulate(self.model):
                logits = self.model(images)
                loss = self.criterion(logits, labels)
                accelerator.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            window_loss += loss.detach()
            window_micro += 1
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += len(labels)
            if not accelerator.sync_gradients:
                continue
            self.global_step += 1
            if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step()
            bar.update(1)
            if self.global_step % cfg.log_freq == 0:
                train_loss = accelerator.reduce(window_loss / window_micro, reduction="mean").item()
                rate = seen * accelerator.num_processes / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{train_loss:.3f}", img_s=f"{rate:,.0f}")
                if accelerator.is_main_process:
                    bar.write(f"step {self.global_step}: training loss {train_loss:.4f}, lr {self.lr:.4g}, {rate:,.0f} images/s")
                self.log({"Loss/Train": train_loss, "lr": self.lr}, step=self.global_step)
                window_loss.zero_()
                window_micro = 0
        bar.close()
        totals = accelerator.reduce(torch.stack([loss_sum, correct.to(loss_sum.dtype)]), reduction="sum").tolist()
        seconds = time.perf_counter() - started
        images_seen = seen * accelerator.num_processes
        micro_batches = max(1, steps * cfg.grad_accum_steps * accelerator.num_processes)
        return {
            "train_loss": totals[0] / micro_batches,
            "train_accuracy": totals[1] / max(1, images_seen),
            "images_per_second": images_seen / seconds,
            "epoch_seconds": seconds,
        }

    def end_of_epoch(self, val_accuracy, train_accuracy: float):
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(train_accuracy if val_accuracy is None else val_accuracy)
