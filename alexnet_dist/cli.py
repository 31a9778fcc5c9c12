"""Command line of alexnet-dist: flags -> Config -> training, or evaluation of saved weights.

    accelerate launch launch/train.py --num_epochs 25       # any Accelerate setup, or none
    python launch/train.py --dataset fake --num_epochs 1 --logger none
    python launch/train.py --train=False --load_model_path checkpoints/model_X.pth
    alexnet-dist-train --help                                 # every flag with its meaning
"""

import contextlib
import inspect
import io
import json
import os
import sys
import time
from pathlib import Path

import fire
import torch
from accelerate.utils import set_seed

from .checkpoint import load_weights, save_weights
from .config import DEFAULTS, Config, UsageError
from .data import load_data
from .engine import Trainer, accuracy, build_optimizer, build_scheduler, evaluate
from .loaders import make_loader
from .model import alexnet
from .runtime import agree, breakdown, build_accelerator, micro_batch_size, shared_value
from .tracking import Tracker, check_logger
from .transforms import Augmentation


class Unset:
    """Default of a flag not given on the command line; shows the real default in --help."""

    def __init__(self, default):
        self.default = default

    def __repr__(self):
        return repr(self.default)


def _flag_signature(collected: dict):
    def train(**flags):
        collected.update({name: value for name, value in flags.items() if not isinstance(value, Unset)})

    help_lines = Config().help_lines()
    train.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=Unset(default)) for name, default in DEFAULTS.items()]
    )
    train.__doc__ = "Train AlexNet on CIFAR-10 (or an image folder) with Accelerate.\n\nArgs:\n" + "\n".join(
        f"    {line}" for line in help_lines
    )
    return train


def parse_flags(argv: list) -> Config:
    """Flags as Fire reads them (`--resize 70,70`, `--resize=[70,70]`, `--resize 70`) -> a validated Config."""
    collected = {}
    command = _flag_signature(collected)
    if "--help" in argv or "-h" in argv:
        fire.Fire(command, command=argv, name="train.py")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            fire.Fire(command, command=argv, name="train.py")
    except fire.core.FireExit:
        first = next((line for line in errors.getvalue().splitlines() if line.startswith("ERROR:")), "ERROR: bad flags")
        message = first.removeprefix("ERROR:").strip()
        if message.startswith("Could not consume arg:"):
            argument = message.split(":", 1)[1].strip()
            kind = "unknown flag" if argument.startswith("-") else "unexpected argument"
            message = f"{kind} {argument} (flags look like --name value; run with --help for the list)"
        raise UsageError(message) from None
    return Config.from_flags(collected)


def _print_accuracy(print_, title: str, confusion: torch.Tensor, classes):
    total = int(confusion.sum())
    print_(f"{title} accuracy {100 * accuracy(confusion):.2f}% ({int(confusion.diagonal().sum())}/{total} images)")
    per_class = confusion.diagonal() / confusion.sum(dim=1).clamp(min=1)
    width = max(len(name) for name in classes)
    for name, value, count in zip(classes, per_class.tolist(), confusion.sum(dim=1).tolist()):
        print_(f"  {name:<{width}}  {100 * value:6.2f}%  ({count} images)")


def _new_run_dir(cfg, stamp: str) -> Path:
    if cfg.run_dir is not None:
        if Path(cfg.run_dir).exists():
            raise UsageError(f"--run_dir {cfg.run_dir} already exists: pick a new folder (runs never overwrite each other)")
        return Path(cfg.run_dir)
    base = Path("runs") / f"{stamp}_{cfg.run_name or 'alexnet'}"
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


def run(cfg: Config):
    """Train (or only evaluate) as `cfg` says; returns the unwrapped model, on every rank."""
    if cfg.train:
        check_logger(cfg.logger)
    accelerator = build_accelerator(cfg, log_with=None if cfg.logger == "none" or not cfg.train else cfg.logger,
                                    project_dir="runs")
    print_ = accelerator.print
    micro_batch = micro_batch_size(cfg.batch_size, accelerator.num_processes, cfg.grad_accum_steps)
    set_seed(cfg.seed)
    data = load_data(cfg, accelerator)
    model = alexnet(num_classes=len(data.classes), groups=cfg.groups, dropout=cfg.dropout, init=cfg.init)
    if cfg.load_model_path:
        agree(accelerator, lambda: load_weights(model, cfg.load_model_path))
        print_(f"loaded weights from {cfg.load_model_path}")
    model = model.to(memory_format=torch.channels_last)
    augmentation = Augmentation(cfg.random_crop, cfg.mean, cfg.std, accelerator.device)
    loader = lambda imageset: make_loader(imageset, augmentation, accelerator.device, cfg, micro_batch,
                                          accelerator.process_index, accelerator.num_processes)
    eval_batch = 2 * micro_batch
    num_classes = len(data.classes)

    if not cfg.train:
        model = accelerator.prepare(model)
        split_name, imageset = ("test", data.test) if data.test is not None else ("validation", data.val)
        if imageset is None:
            raise UsageError(f"{cfg.data_dir} has no test split and --val_size 0 leaves nothing to evaluate on")
        if data.test is None:
            print_(f"{data.test_note.split(':')[0]}: evaluating on the validation split instead")
        _print_accuracy(print_, split_name, evaluate(model, loader(imageset), accelerator, num_classes, eval_batch), data.classes)
        return accelerator.unwrap_model(model)

    stamp = shared_value(accelerator, time.strftime("%Y%m%d-%H%M%S"))
    run_dir = agree(accelerator, lambda: _new_run_dir(cfg, stamp))
    run_dir = shared_value(accelerator, run_dir)
    save_path = Path(cfg.save.format(time=stamp))
    if save_path.is_dir():
        raise UsageError(f"--save {save_path} is a folder: give a file path such as {save_path}/model.pth")
    train_loader = loader(data.train)
    if train_loader.steps_per_epoch == 0:
        raise UsageError(f"--batch_size {cfg.batch_size} is larger than the {len(data.train)} training images")
    val_loader = loader(data.val) if data.val is not None else None
    optimizer = build_optimizer(model, cfg, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg, train_loader.steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)

    config = cfg.to_dict()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tracker = Tracker(accelerator, cfg, run_dir, {**config, "num_processes": accelerator.num_processes,
                                                   "precision": accelerator.mixed_precision,
                                                   "device_name": _device_name(accelerator.device)})
    print_("configuration: " + " ".join(f"{name}={value}" for name, value in config.items()))
    print_(f"{breakdown(cfg.batch_size, accelerator.num_processes, cfg.grad_accum_steps)}; "
           f"{_device_name(accelerator.device)}, precision {accelerator.mixed_precision}; "
           f"{len(data.train)} training / {len(data.val) if data.val else 0} validation images, "
           f"{train_loader.steps_per_epoch} steps per epoch; run directory {run_dir}")

    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, train_loader, tracker.log)
    started = time.perf_counter()
    for epoch in range(cfg.num_epochs):
        stats = trainer.train_epoch(epoch)
        val_accuracy = None
        if val_loader is not None:
            val_accuracy = accuracy(evaluate(model, val_loader, accelerator, num_classes, eval_batch))
        trainer.end_of_epoch(val_accuracy, stats["train_accuracy"])
        values = {"Accuracy/Train": stats["train_accuracy"], "Loss/Epoch": stats["train_loss"],
                  "images_per_second": stats["images_per_second"], "epoch_seconds": stats["epoch_seconds"],
                  "epoch": epoch + 1, "lr": trainer.lr}
        if val_accuracy is not None:
            values["Accuracy/Validation"] = val_accuracy
        tracker.log(values, step=trainer.global_step)
        val_text = "" if val_accuracy is None else f", validation accuracy {100 * val_accuracy:.2f}%"
        print_(f"epoch {epoch + 1}/{cfg.num_epochs}: loss {stats['train_loss']:.4f}, train accuracy "
               f"{100 * stats['train_accuracy']:.2f}%{val_text}, {stats['images_per_second']:,.0f} images/s, "
               f"{stats['epoch_seconds']:.1f} s")
    train_seconds = time.perf_counter() - started
    print_(f"trained {cfg.num_epochs} epochs in {train_seconds:.1f} s")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_weights(save_path, accelerator.unwrap_model(model), config, data.classes)
    print_(f"saved the final weights to {save_path}")
    summary = {"train_seconds": train_seconds}
    if data.test is None:
        print_(data.test_note)
    else:
        confusion = evaluate(model, loader(data.test), accelerator, num_classes, eval_batch)
        _print_accuracy(print_, "test", confusion, data.classes)
        summary["Accuracy/Test"] = accuracy(confusion)
    tracker.log(summary, step=trainer.global_step)
    tracker.finish()
    return accelerator.unwrap_model(model)


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv: list | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(parse_flags(argv))
    except UsageError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
