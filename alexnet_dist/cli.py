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
from .config import DEFAULTS, Config, UsageError, load_recipe
from .data import load_data, pixel_sample
from . import __version__
from .engine import TTA_VIEWS, Trainer, accuracy, build_optimizer, build_scheduler, evaluate, use_cuda_graphs
from .loaders import make_loader
from .model import alexnet
from .predict import predict
from .runtime import agree, breakdown, build_accelerator, micro_batch_size, shared_value
from .tracking import Tracker, check_logger
from .transforms import Augmentation, colour_pca


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
    recipe = load_recipe(collected["recipe"]) if collected.get("recipe") else None
    return Config.from_flags(collected, base=recipe)


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


def _colour_basis(cfg, data):
    if cfg.pca_color == 0:
        return None
    return colour_pca(pixel_sample(data.train, cfg.resize))


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


def run(cfg: Config):
    """Train (or only evaluate, or predict) as `cfg` says; returns the unwrapped model, on every rank."""
    if cfg.predict:
        accelerator = build_accelerator(cfg)
        return agree(accelerator, lambda: predict(cfg, accelerator))
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
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    augmentation = Augmentation(cfg.random_crop, cfg.mean, cfg.std, accelerator.device, _colour_basis(cfg, data),
                                cfg.cutout, channels_last=on_gpu)
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
        confusion = evaluate(model, loader(imageset), accelerator, num_classes, eval_batch, (cfg.tta,))[cfg.tta]
        _print_accuracy(print_, f"{split_name} (tta {cfg.tta})", confusion, data.classes)
        return accelerator.unwrap_model(model)

    stamp = shared_value(accelerator, time.strftime("%Y%m%d-%H%M%S"))
    run_dir = shared_value(accelerator, agree(accelerator, lambda: _new_run_dir(cfg, stamp)))
    save_path = Path(cfg.save.format(time=stamp))
    if save_path.is_dir():
        raise UsageError(f"--save {save_path} is a folder: give a file path such as {save_path}/model.pth")
    train_loader = loader(data.train)
    if train_loader.steps_per_epoch == 0:
        raise UsageError(f"--batch_size {cfg.batch_size} is larger than the {len(data.train)} training images")
    val_loader = loader(data.val) if data.val is not None else None
    graphs = use_cuda_graphs(cfg, accelerator)
    optimizer = build_optimizer(model, cfg, accelerator.device, lr_on_device=graphs)
    scheduler = build_scheduler(optimizer, cfg, train_loader.steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)

    config = cfg.to_dict()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tracker = Tracker(accelerator, cfg, run_dir, {**config, "num_processes": accelerator.num_processes,
                                                   "precision": accelerator.mixed_precision, "version": __version__,
                                                   "device_name": _device_name(accelerator.device)})
    print_("configuration: " + " ".join(f"{name}={value}" for name, value in config.items()))
    print_(f"{breakdown(cfg.batch_size, accelerator.num_processes, cfg.grad_accum_steps)}; "
           f"{_device_name(accelerator.device)}, precision {accelerator.mixed_precision}"
           f"{', CUDA graphs' if graphs else ''}{', compiled' if cfg.compile != 'false' else ''}; "
           f"{len(data.train)} training / {len(data.val) if data.val else 0} validation images, "
           f"{train_loader.steps_per_epoch} steps per epoch; run directory {run_dir}")

    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, train_loader, tracker.log, graphs=graphs)
    evaluator = Evaluator(accelerator, model, num_classes, eval_batch, trainer.average)
    started = time.perf_counter()
    for epoch in range(cfg.num_epochs):
        stats = trainer.train_epoch(epoch)
        values = {"Accuracy/Train": stats["train_accuracy"], "Loss/Epoch": stats["train_loss"],
                  "images_per_second": stats["images_per_second"], "epoch_seconds": stats["epoch_seconds"],
                  "epoch": epoch + 1, "lr": trainer.lr}
        if val_loader is not None:
            for (weights, _), confusion in evaluator(val_loader, (cfg.tta,)).items():
                values["Accuracy/Validation" + ("_EMA" if weights == "ema" else "")] = accuracy(confusion)
        trainer.end_of_epoch(values.get("Accuracy/Validation"), stats["train_accuracy"])
        tracker.log(values, step=trainer.global_step)
        tracker.epoch_done(last=epoch + 1 == cfg.num_epochs)
        validation = "".join(f", {name.split('/')[1].replace('_', ' ').lower()} accuracy {100 * value:.2f}%"
                             for name, value in values.items() if name.startswith("Accuracy/Validation"))
        print_(f"epoch {epoch + 1}/{cfg.num_epochs}: loss {stats['train_loss']:.4f}, train accuracy "
               f"{100 * stats['train_accuracy']:.2f}%{validation}, {stats['images_per_second']:,.0f} images/s, "
               f"{stats['epoch_seconds']:.1f} s")
    train_seconds = time.perf_counter() - started
    print_(f"trained {cfg.num_epochs} epochs in {train_seconds:.1f} s")

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_weights(save_path, unwrapped, config, data.classes)
    print_(f"saved the final weights to {save_path}")
    summary = {"train_seconds": train_seconds}
    if trainer.average is not None:
        ema_path = save_path.with_name(f"{save_path.stem}_ema{save_path.suffix}")
        with trainer.average.swapped_in():
            if accelerator.is_main_process:
                save_weights(ema_path, unwrapped, config, data.classes)
        print_(f"saved the averaged weights to {ema_path}")
    if val_loader is not None:
        for (weights, mode), confusion in evaluator(val_loader, tuple(TTA_VIEWS)).items():
            name = f"Accuracy/Validation_final{'_EMA' if weights == 'ema' else ''}/tta_{mode}"
            summary[name] = accuracy(confusion)
            print_(f"final validation accuracy, {'averaged' if weights == 'ema' else 'final'} weights, "
                   f"tta {mode}: {100 * summary[name]:.2f}%")
    test_confusion = None
    if data.test is None:
        print_(data.test_note)
    else:
        for (weights, _), confusion in evaluator(loader(data.test), (cfg.tta,)).items():
            label = "test" if weights == "model" else "test, averaged weights,"
            _print_accuracy(print_, f"{label} (tta {cfg.tta})", confusion, data.classes)
            summary["Accuracy/Test" + ("_EMA" if weights == "ema" else "")] = accuracy(confusion)
            test_confusion = confusion if weights == "model" else test_confusion
    tracker.log(summary, step=trainer.global_step)
    tracker.finish(test_confusion, data.classes, save_path, trainer.global_step)
    return unwrapped


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
