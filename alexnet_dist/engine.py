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

from .config import UsageError


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


TTA_VIEWS = {"none": 1, "flip": 2, "ten": 10}  # how many of Augmentation.views each mode averages


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


class Step:
    """Forward, loss, backward and (on the last micro-step of an optimizer step) the update.

    Returns the detached loss and logits. This is the canonical Accelerate step; `GraphedStep`
    records the same calls once as a CUDA graph.
    """

    def __init__(self, accelerator, model, optimizer, criterion, skip_nonfinite: bool = False):
        self.accelerator, self.model, self.optimizer, self.criterion = accelerator, model, optimizer, criterion
        self.found_inf = None
        if skip_nonfinite and accelerator.mixed_precision != "fp16":  # fp16's loss scaler skips such steps itself
            # fused SGD skips its update on the device where found_inf is 1: no host synchronisation
            self.found_inf = torch.zeros((), device=accelerator.device)
            optimizer.optimizer.found_inf = self.found_inf
            # a skipped first step would leave fused SGD's momentum buffers allocated but never written:
            # zeros make the first real step set buf = grad, exactly as SGD's own first step does
            for group in optimizer.optimizer.param_groups:
                for parameter in group["params"] if group["momentum"] else []:
                    optimizer.optimizer.state[parameter].setdefault("momentum_buffer", torch.zeros_like(parameter))

    def __call__(self, images, labels):
        with self.accelerator.accumulate(self.model):
            logits, loss = self._forward_backward_update(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    def _forward_backward_update(self, images, labels):
        logits = self.model(images)
        loss = self.criterion(logits, labels)
        if self.found_inf is not None:
            torch.maximum(self.found_inf, (~torch.isfinite(loss)).float(), out=self.found_inf)
        self.accelerator.backward(loss)
        if self.found_inf is not None and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            # DDP averaged one rank's non-finite gradients into every rank's: all of them must skip
            torch.distributed.all_reduce(self.found_inf, op=torch.distributed.ReduceOp.MAX)
        self.optimizer.step()
        if self.found_inf is not None and self.accelerator.sync_gradients:
            self.found_inf.zero_()
        return logits, loss


class GraphedStep(Step):
    """The step as one CUDA graph: a single launch per optimizer step instead of about a hundred.

    One CUDA process without accumulation. The first `warmup` steps run eagerly on a side stream
    (they are real training steps, and create the momentum buffers); the next one is recorded,
    then every step copies its batch into the graph's input buffers and replays. The learning rate
    is a device tensor (see build_optimizer) that the scheduler fills in place, so the graph sees it
    change. Dropout stays random: CUDA graphs advance the RNG offset on every replay.

    Graphs only make the run faster, so they must never end it: if recording or the first replay
    raises, one line says why and every later step runs eagerly.
    """

    warmup = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph, self.calls, self.eager, self.replays = None, 0, False, 0

    def __call__(self, images, labels):
        if self.eager:
            return super().__call__(images, labels)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = super().__call__(images, labels)
            torch.cuda.current_stream().wait_stream(side)
            return result
        try:
            if self.graph is None:
                self._record(images, labels)
            self._keep_recorded_lr()
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graph.replay()
            if self.replays == 0:
                torch.cuda.synchronize()  # an error of the first replay shows here, while it can still fall back
            self.replays += 1
        except Exception as error:
            if self.replays:
                raise  # later replays run the graph that already worked: this is not the graph's doing
            self._fall_back(error)
            return super().__call__(images, labels)
        return self.static_loss, self.static_logits

    def _record(self, images, labels):
        self.static_images, self.static_labels = images.clone(), labels.clone()
        self.recorded_lr = [group["lr"] for group in self.optimizer.param_groups]
        if not all(isinstance(lr, torch.Tensor) for lr in self.recorded_lr):
            raise RuntimeError("the learning rate is not a device tensor (build_optimizer(lr_on_device=True))")
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes, not adds, the gradients
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a pin-memory thread, say) cannot break the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            logits, loss = self._forward_backward_update(self.static_images, self.static_labels)
        self.static_logits, self.static_loss = logits.detach(), loss.detach()

    def _keep_recorded_lr(self):
        """The graph reads the learning rate from the tensors it was recorded with: if a scheduler put
        another value (or tensor) in a parameter group, copy it into the recorded tensor and put that back."""
        for group, recorded in zip(self.optimizer.param_groups, self.recorded_lr):
            if group["lr"] is not recorded:
                recorded.fill_(float(group["lr"]))
                group["lr"] = recorded

    def _fall_back(self, error: Exception):
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self.accelerator.print(f"CUDA graphs off for this run ({type(error).__name__}: {reason[:200]}); "
                               "training continues eagerly")
        self.graph, self.eager = None, True
        self.optimizer.zero_grad(set_to_none=True)  # drop gradients a failed capture may have left


def use_cuda_graphs(cfg, accelerator, streaming: bool = False) -> bool:
    """auto: on one CUDA process without accumulation or fp16's loss scaling, and not with the stream
    loader (its pin-memory thread works on the device while a step would be recorded)."""
    possible = (accelerator.device.type == "cuda" and accelerator.num_processes == 1 and cfg.grad_accum_steps == 1
                and accelerator.mixed_precision != "fp16")
    if cfg.cuda_graphs == "auto":
        return possible and not streaming
    if cfg.cuda_graphs == "true" and not possible:
        raise UsageError("--cuda_graphs True needs one CUDA process, grad_accum_steps 1 and no fp16; use auto or False")
    return cfg.cuda_graphs == "true"


class Trainer:
    """Holds the prepared model, optimizer and scheduler, and the count of optimizer steps."""

    def __init__(self, cfg, accelerator, model, optimizer, scheduler, train_loader, log, graphs: bool = False):
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
        self.optimizer, self.scheduler, self.loader, self.log = optimizer, scheduler, train_loader, log
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.step = (GraphedStep if graphs else Step)(accelerator, model, optimizer, criterion, cfg.skip_nonfinite)
        self.global_step = 0
        # the first optimizer step whose loss was not finite (-1: none), kept on the device until asked
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=accelerator.device)
        self.nonfinite_count = torch.zeros((), dtype=torch.int64, device=accelerator.device)

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

    def train_epoch(self, epoch: int, start_step: int = 0, after_step=None) -> dict:
        """One epoch from optimizer step `start_step`; returns its mean loss, accuracy and speed.

        `after_step(epoch, steps done in the epoch)` runs after every optimizer step, on every rank;
        when it returns True the epoch stops there ("stopped_at" in the result).
        """
        accelerator, cfg, device = self.accelerator, self.cfg, self.accelerator.device
        self.model.train()
        steps = self.loader.steps_per_epoch - start_step
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", leave=False, dynamic_ncols=True,
                   disable=not (accelerator.is_main_process and sys.stderr.isatty()))
        totals = torch.zeros(2, device=device)  # loss sum, correct predictions: of the epoch
        window = torch.zeros(2, device=device)  # the same since the last log
        seen, window_micro, window_images, started = 0, 0, 0, time.perf_counter()
        stopped_at, step_in_epoch, micro_done = None, start_step, 0
        for images, labels in self.loader.train_epoch(epoch, start_step):
            loss, logits = self.step(images, labels)
            bad = ~torch.isfinite(loss)
            self.first_nonfinite = torch.where((self.first_nonfinite < 0) & bad, self.global_step + 1, self.first_nonfinite)
            self.nonfinite_count += bad
            micro_done += 1
            both = torch.stack([loss.float(), (logits.argmax(dim=1) == labels).sum().float()])
            totals += both
            window += both
            window_micro += 1
            window_images += len(labels)
            seen += len(labels)
            if not accelerator.sync_gradients:
                continue
            self.global_step += 1
            step_in_epoch += 1
            if self.average is not None:
                self.average.update()
            if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step()
            bar.update(1)
            if self.global_step % cfg.log_freq == 0:
                loss_sum, correct_sum = accelerator.reduce(window, reduction="sum").tolist()
                train_loss = loss_sum / (window_micro * accelerator.num_processes)
                images_sum = window_images * accelerator.num_processes
                rate = seen * accelerator.num_processes / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{correct_sum / images_sum:.3f}", img_s=f"{rate:,.0f}")
                if accelerator.is_main_process:
                    bar.write(f"step {self.global_step}: training loss {train_loss:.4f}, lr {self.lr:.4g}, {rate:,.0f} images/s")
                self.log({"Loss/Train": train_loss, "lr": self.lr}, step=self.global_step)
                window.zero_()
                window_micro = window_images = 0
            if after_step is not None and after_step(epoch, step_in_epoch):
                stopped_at = step_in_epoch
                break
        bar.close()
        loss_sum, correct_sum = accelerator.reduce(totals, reduction="sum").tolist()
        seconds = time.perf_counter() - started
        images_seen = seen * accelerator.num_processes
        return {
            "train_loss": loss_sum / max(1, micro_done * accelerator.num_processes),
            "train_accuracy": correct_sum / max(1, images_seen),
            "images_per_second": images_seen / seconds,
            "epoch_seconds": seconds,
            "stopped_at": stopped_at,
        }

    def end_of_epoch(self, val_accuracy, train_accuracy: float):
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(train_accuracy if val_accuracy is None else val_accuracy)
