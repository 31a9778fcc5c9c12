"""The training loop, and the one place that builds what it runs (for the CLI, the benchmark and the graph check).

    trainer = build_trainer(cfg, accelerator, train_set, num_classes, micro_batch)
    with Run(plan, accelerator, trainer) as run:     # run.py: run folder, tracker, checkpoints, stops
        train(trainer, run)
        model = run.finish()
"""

from dataclasses import dataclass, field

import torch
from accelerate.utils import set_seed

from .checkpoint import load_weights
from .clock import clock
from .data import pixel_sample, resize_images
from .engine import Meter, NonfiniteGuard, build_average, build_scheduler, evaluate
from .layouts import Data, choose_layout
from .loaders import make_loader
from .model import alexnet, convolutions
from .run import print_accuracy
from .speedups import Speedups
from .transforms import Augmentation, colour_pca, patch_filters

CONV1_SAMPLE = 2000  # training images whose patches start conv1 (--conv1_from_data)


@dataclass
class Trainer:
    """What the loop runs, prepared by Accelerate, and the count of optimizer steps taken."""
    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object               # stepped per optimizer step, or (plateau) per epoch
    criterion: torch.nn.Module
    loader: object                  # this rank's training micro-batches (loaders.py)
    make_loader: object             # another split -> its evaluation loader, with the same preprocessing
    average: object                 # the weights' moving average (--ema), or None
    meter: Meter                    # loss and accuracy, kept on the device
    guard: NonfiniteGuard           # --skip_nonfinite
    speedups: Speedups              # CUDA graphs, compilation's first steps
    graphs: bool = False
    global_step: int = 0
    layout: object = field(default_factory=lambda: Data(1))  # how the network is spread (layouts.py)

    @property
    def plateau(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def whole_model(self) -> torch.nn.Module:
        """The ordinary network that was trained (gathered from the processes where the layout cuts it: every rank
        calls it)."""
        return self.layout.whole_model(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))


def build_model(cfg, accelerator, num_classes: int, weights: dict | None = None, train_set=None):
    """AlexNet with the seed's initial weights (the same on every rank; conv1's from `train_set` with
    --conv1_from_data) or `weights`; then each rank's own dropout stream (seeded from seed and rank; the data plan
    has its own generator)."""
    set_seed(cfg.seed)
    model = alexnet(num_classes=num_classes, groups=cfg.groups, dropout=cfg.dropout, init=cfg.init,
                    first_linear_once=cfg.first_linear_once, lrn_alpha=cfg.lrn_alpha)
    if cfg.conv1_from_data and weights is None and train_set is not None:
        conv1 = convolutions(model.features)[0]
        sample = resize_images(pixel_sample(train_set, cfg.resize)[:CONV1_SAMPLE], cfg.resize)
        with torch.no_grad():
            conv1.weight.copy_(patch_filters(sample, cfg.mean, cfg.std, conv1.out_channels))
            conv1.bias.zero_()
    if weights is not None:
        load_weights(model, cfg.load_model_path, weights)
        accelerator.print(
            f"loaded weights from {cfg.load_model_path}"
            + (
                ""
                if cfg.train
                else f" (groups {cfg.groups}, resize {cfg.resize}, crop {cfg.random_crop}, "
                f"mean {cfg.mean}, std {cfg.std}, as trained)"
            )
        )
    torch.manual_seed(cfg.seed * 65_536 + accelerator.process_index + 1)
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def loader_factory(cfg, accelerator, micro_batch: int, train_set=None, layout=None):
    """imageset -> this rank's loader, all with the same preprocessing (PCA colour basis from `train_set`), taking
    the share of the images the layout gives this process (default: the one `cfg` chooses)."""
    basis = colour_pca(pixel_sample(train_set, cfg.resize)) if cfg.pca_color and train_set is not None else None
    on_gpu = accelerator.device.type == "cuda"
    augmentation = Augmentation(
        cfg.random_crop, cfg.mean, cfg.std, accelerator.device, basis, cfg.cutout, channels_last=on_gpu
    )
    layout = layout or choose_layout(cfg, accelerator.num_processes)
    shard, shares, counts = layout.shard(accelerator.process_index)
    return lambda imageset: make_loader(imageset, augmentation, accelerator.device, cfg, micro_batch, shard, shares,
                                        counts)


def build_trainer(
    cfg, accelerator, train_set, num_classes: int, micro_batch: int, graphs: bool = False, weights: dict | None = None
) -> Trainer:
    """Model, loader, optimizer, schedule, loss, average and speed-ups, prepared for the launch's layout: what
    `train` runs."""
    layout = choose_layout(cfg, accelerator.num_processes)
    with clock.part("data"):
        make = loader_factory(cfg, accelerator, micro_batch, train_set, layout)
        loader = make(train_set)
    model, optimizer = layout.place(build_model(cfg, accelerator, num_classes, weights, train_set), cfg, accelerator)
    scheduler = build_scheduler(optimizer.optimizer, cfg, loader.steps_per_epoch)  # ours: once per optimizer step
    return Trainer(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        loader=loader,
        make_loader=make,
        average=build_average(accelerator.unwrap_model(model, keep_torch_compile=False), cfg.ema),
        meter=Meter(accelerator, layout.replicas),
        guard=NonfiniteGuard(accelerator, cfg.skip_nonfinite),
        speedups=Speedups(accelerator, optimizer, graphs, compiled=cfg.compile != "false"),
        graphs=graphs,
        layout=layout,
    )


def train(t: Trainer, run) -> None:
    """The training loop, top to bottom. `run` (run.py) logs, saves checkpoints, validates and watches for stop
    signals, and says when to stop; the benchmark and the graph check pass lighter ones. Returns at the end of the
    epochs, or after a stop (then `run.stopped` says why)."""
    accelerator, model, optimizer, criterion = t.accelerator, t.model, t.optimizer, t.criterion

    def step(images, labels):
        with accelerator.accumulate(model):  # DDP all-reduces the gradients on the last micro-step only
            logits = model(images)
            loss = criterion(logits, labels)
            accelerator.backward(loss)
            if t.guard.allows(loss):  # always, unless --skip_nonfinite meets a non-finite loss (it synchronises)
                optimizer.step()  # Accelerate makes it a no-op before the last micro-step
            optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    step = t.speedups.wrap(step)  # the same function, or its CUDA-graph replay (speedups.py)
    for epoch in run.epochs():
        model.train()
        t.meter.start_epoch()
        first_step = run.begin_epoch(epoch)  # 0, or where the resumed run left off
        with clock.part("training"):
            for images, labels in t.loader.train_epoch(epoch, first_step):
                loss, logits = step(images, labels)
                t.meter.add(loss, logits, labels, t.global_step + 1)  # on the device: no synchronisation
                if not accelerator.sync_gradients:
                    continue  # the optimizer step takes more micro-batches
                t.global_step += 1
                if t.average is not None:
                    t.average.update_parameters(model)
                if not t.plateau:
                    t.scheduler.step()  # plateau steps once per epoch, on the validation accuracy
                if run.after_step():  # log point, checkpoint when due; True after a stop signal or non-finite loss
                    break
        if run.stopped or run.end_epoch(epoch):  # validation, curves, checkpoint; True after a stop signal
            break


class Steps:
    """The lightest `run` for `train`: the given epochs, no run folder, logging, checkpoints or stops; `each_step`
    is called after every optimizer step (the benchmark and the graph check)."""

    stopped = None

    def __init__(self, epochs, each_step=None):
        self._epochs, self.each_step = list(epochs), each_step

    def epochs(self):
        return self._epochs

    def begin_epoch(self, epoch: int) -> int:
        return 0

    def after_step(self) -> bool:
        if self.each_step is not None:
            self.each_step()
        return False

    def end_epoch(self, epoch: int) -> bool:
        return False


class GivenBatches:
    """A training loader of given device micro-batches, the same every epoch (the benchmark's ceiling: no data
    work at all; the graph check's chosen batches)."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.steps_per_epoch = len(self.batches)

    def train_epoch(self, epoch: int, start_step: int = 0):
        return iter(self.batches)


def evaluate_saved(plan, accelerator):
    """--train=False: the saved weights on the test split (validation if there is none), overall and per class."""
    cfg, data = plan.cfg, plan.data
    layout = choose_layout(cfg, accelerator.num_processes)
    model, _ = layout.place(build_model(cfg, accelerator, len(data.classes), plan.weights), cfg, accelerator,
                            optimizer=False)
    split_name, imageset = ("test", data.test) if data.test is not None else ("validation", data.val)
    if data.test is None:
        accelerator.print(f"{data.test_note.split(':')[0]}: evaluating on the validation split instead")
    loader = loader_factory(cfg, accelerator, plan.micro_batch, layout=layout)(imageset)
    confusion = evaluate(model, loader, accelerator, len(data.classes), 2 * plan.micro_batch, (cfg.tta,))[cfg.tta]
    print_accuracy(accelerator.print, f"{split_name} (tta {cfg.tta})", confusion, data.classes)
    return layout.whole_model(accelerator.unwrap_model(model))
