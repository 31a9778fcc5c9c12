"""Building the trainer (one place, for the CLI, the benchmark and the graph check) and the run's loop.

    for epoch in run.epochs():
        for step_in_epoch in trainer.steps(epoch, run.first_step(epoch)):
            run.after_step(epoch, step_in_epoch)
        run.end_epoch(epoch)
    run.finish()
"""

import contextlib

import torch
from accelerate.utils import set_seed

from .checkpoint import load_weights
from .clock import clock
from .data import pixel_sample
from .engine import Trainer, build_optimizer, build_scheduler, evaluate
from .loaders import make_loader
from .model import alexnet
from .run import Run, print_accuracy
from .step import GraphedStep, Step
from .transforms import Augmentation, colour_pca


def build_model(cfg, accelerator, num_classes: int, weights: dict | None = None):
    """AlexNet with the seed's initial weights (the same on every rank) or `weights`; then each rank's own
    dropout stream (seeded from seed and rank; the data plan has its own generator)."""
    set_seed(cfg.seed)
    model = alexnet(num_classes=num_classes, groups=cfg.groups, dropout=cfg.dropout, init=cfg.init)
    if weights is not None:
        load_weights(model, cfg.load_model_path, weights)
        accelerator.print(f"loaded weights from {cfg.load_model_path}"
                          + ("" if cfg.train else f" (groups {cfg.groups}, resize {cfg.resize}, crop {cfg.random_crop}, "
                                                  f"mean {cfg.mean}, std {cfg.std}, as trained)"))
    torch.manual_seed(cfg.seed * 65_536 + accelerator.process_index + 1)
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def loader_factory(cfg, accelerator, micro_batch: int, train_set=None):
    """imageset -> this rank's loader, all with the same preprocessing (PCA colour basis from `train_set`)."""
    basis = colour_pca(pixel_sample(train_set, cfg.resize)) if cfg.pca_color and train_set is not None else None
    on_gpu = accelerator.device.type == "cuda"
    augmentation = Augmentation(cfg.random_crop, cfg.mean, cfg.std, accelerator.device, basis, cfg.cutout,
                                channels_last=on_gpu)
    return lambda imageset: make_loader(imageset, augmentation, accelerator.device, cfg, micro_batch,
                                        accelerator.process_index, accelerator.num_processes)


def build_trainer(cfg, accelerator, train_set, num_classes: int, micro_batch: int, graphs: bool = False,
                  weights: dict | None = None) -> Trainer:
    """Model, loader, optimizer, schedule and step, prepared: what training, the benchmark and the graph check run."""
    with clock.part("data"):
        make = loader_factory(cfg, accelerator, micro_batch, train_set)
        loader = make(train_set)
    model = build_model(cfg, accelerator, num_classes, weights)
    optimizer = build_optimizer(model, cfg, accelerator.device, lr_on_device=graphs)
    scheduler = build_scheduler(optimizer, cfg, loader.steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step = (GraphedStep if graphs else Step)(accelerator, model, optimizer, criterion, cfg.skip_nonfinite)
    return Trainer(cfg, accelerator, model, optimizer, scheduler, loader, step, make)


def train(plan, accelerator):
    """Train as the plan says (from its checkpoint if resuming); returns the unwrapped model."""
    trainer = build_trainer(plan.cfg, accelerator, plan.data.train, len(plan.data.classes), plan.micro_batch,
                            plan.graphs, plan.weights)
    with Run(plan, accelerator, trainer) as run:
        clock.begin("other")  # the start-up ends here
        for epoch in run.epochs():
            with contextlib.closing(trainer.steps(epoch, run.first_step(epoch))) as steps:  # closed on a stop too
                for step_in_epoch in steps:
                    run.after_step(epoch, step_in_epoch)
            run.end_epoch(epoch)
        return run.finish()


def evaluate_saved(plan, accelerator):
    """--train=False: the saved weights on the test split (validation if there is none), overall and per class."""
    cfg, data = plan.cfg, plan.data
    model = accelerator.prepare(build_model(cfg, accelerator, len(data.classes), plan.weights))
    split_name, imageset = ("test", data.test) if data.test is not None else ("validation", data.val)
    if data.test is None:
        accelerator.print(f"{data.test_note.split(':')[0]}: evaluating on the validation split instead")
    loader = loader_factory(cfg, accelerator, plan.micro_batch)(imageset)
    confusion = evaluate(model, loader, accelerator, len(data.classes), 2 * plan.micro_batch, (cfg.tta,))[cfg.tta]
    print_accuracy(accelerator.print, f"{split_name} (tta {cfg.tta})", confusion, data.classes)
    return accelerator.unwrap_model(model)
