"""A training run: epochs, validation, checkpoints, resume, clean stops and the final report.

Checkpoints (RUN_DIR/checkpoints/step-<global step>/) hold the full training state through
`accelerator.save_state`: model, optimizer, scheduler, weight average, every rank's RNG state, and
trainer_state.json (epoch, step, accuracies, configuration). `--resume` continues from one in the
same run directory, at the same epoch and step, with the same data order and learning rate.
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .checkpoint import Checkpoints, complete_checkpoints, find_checkpoint, read_state, save_weights
from .config import UsageError, learning_changes
from .engine import TTA_VIEWS, Trainer, accuracy, build_optimizer, build_scheduler, evaluate
from .loaders import check_readable
from .runtime import RunStopped, StopSignals, agree, breakdown, shared_value
from .tracking import Tracker


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def print_accuracy(print_, title: str, confusion: torch.Tensor, classes):
    total = int(confusion.sum())
    print_(f"{title} accuracy {100 * accuracy(confusion):.2f}% ({int(confusion.diagonal().sum())}/{total} images)")
    per_class = confusion.diagonal() / confusion.sum(dim=1).clamp(min=1)
    width = max(len(name) for name in classes)
    for name, value, count in zip(classes, per_class.tolist(), confusion.sum(dim=1).tolist()):
        print_(f"  {name:<{width}}  {100 * value:6.2f}%  ({count} images)")


def new_run_dir(cfg, stamp: str) -> Path:
    if cfg.run_dir is not None:
        if Path(cfg.run_dir).exists():
            raise UsageError(f"--run_dir {cfg.run_dir} already exists: pick a new folder, or continue it with --resume latest")
        return Path(cfg.run_dir)
    base = Path("runs") / f"{stamp}_{cfg.run_name or 'alexnet'}"
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


def apply_optimizer_flags(optimizer, scheduler, cfg, saved: dict):
    """After loading a checkpoint, the flags' optimizer settings hold (they differ only with --allow_config_change):
    a new lr scales the schedule from the resumed step on."""
    ratio = cfg.lr / saved["lr"]
    for group in optimizer.param_groups:
        group.update(momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        group["lr"] = float(group["lr"]) * ratio
        if "initial_lr" in group:
            group["initial_lr"] = float(group["initial_lr"]) * ratio
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.patience = cfg.plateau_patience
    else:
        scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]


def check_resumable(state: dict, cfg, data, path: Path):
    """Refuse a checkpoint of another network, class list or data, or flags that change what is learned."""
    saved = state["config"]
    if saved.get("groups") != cfg.groups or state.get("classes") != data.classes:
        raise UsageError(f"--resume {path} was trained with groups={saved.get('groups')} on {len(state.get('classes') or [])} "
                         f"classes, this run builds groups={cfg.groups} for {len(data.classes)} classes")
    if state.get("num_train") != len(data.train):
        raise UsageError(f"--resume {path} was trained on {state.get('num_train')} training images, this run has "
                         f"{len(data.train)}: not the same data")
    if saved.get("schedule") != cfg.schedule:
        raise UsageError(f"--resume {path} was trained with --schedule {saved.get('schedule')}: the schedule cannot "
                         f"change within a run (this run asks for {cfg.schedule})")
    if (saved.get("ema", 0) > 0) != (cfg.ema > 0):
        raise UsageError(f"--resume {path} was trained {'with' if saved.get('ema', 0) > 0 else 'without'} --ema: "
                         "the weight average cannot be switched on or off within a run")
    changes = learning_changes(saved, cfg)
    if changes and not cfg.allow_config_change:
        raise UsageError(f"--resume {path}: these flags change what is learned ({'; '.join(changes)}); "
                         "pass the run's own flags, or --allow_config_change")


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


def train(cfg, accelerator, data, model, loader, eval_batch: int, graphs: bool):
    """Train `model` as `cfg` says (from a checkpoint with --resume), its steps recorded as CUDA graphs
    if `graphs`; returns the unwrapped model."""
    print_ = accelerator.print
    resume_from = shared_value(accelerator, agree(accelerator, lambda: find_checkpoint(cfg.resume, cfg.run_dir))) \
        if cfg.resume else None
    state = read_state(resume_from) if resume_from else None
    if state:
        agree(accelerator, lambda: check_resumable(state, cfg, data, resume_from))
    stamp = state["stamp"] if state else shared_value(accelerator, time.strftime("%Y%m%d-%H%M%S"))
    run_dir = resume_from.parent.parent if state else shared_value(accelerator, agree(accelerator, lambda: new_run_dir(cfg, stamp)))
    save_path = Path(cfg.save.format(time=stamp))
    agree(accelerator, lambda: check_writable("--save", save_path))
    train_loader = loader(data.train)
    val_loader = loader(data.val) if data.val is not None else None
    optimizer = build_optimizer(model, cfg, accelerator.device, lr_on_device=graphs)
    scheduler = build_scheduler(optimizer, cfg, train_loader.steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, train_loader, log=None, graphs=graphs)
    accelerator.register_for_checkpointing(scheduler, *([trainer.average] if trainer.average else []))
    checkpoints = Checkpoints(accelerator, run_dir / "checkpoints", cfg.keep_checkpoints)
    config = cfg.to_dict()

    start_epoch, start_step, best = 0, 0, None
    if state:
        checkpoints.clean(newer_than=state["global_step"])

        def load():
            try:
                accelerator.load_state(str(resume_from))
            except Exception as error:
                raise UsageError(f"--resume {resume_from} cannot be loaded ({type(error).__name__}): it is damaged; "
                                 f"resume from an older checkpoint in {resume_from.parent}") from None

        agree(accelerator, load)
        accelerator.step = 0  # checkpoints fall between optimizer steps, whatever the accumulation was then
        apply_optimizer_flags(optimizer, scheduler, cfg, state["config"])
        if graphs:  # the loaded learning rate must again be a tensor on the device
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=accelerator.device)
        trainer.global_step, start_epoch, start_step = state["global_step"], state["epoch"], state["step_in_epoch"]
        best = state.get("best_val_accuracy")
        if accelerator.is_main_process:
            _truncate_metrics(run_dir / "metrics.jsonl", trainer.global_step)
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tracker = Tracker(accelerator, cfg, run_dir, {**config, "num_processes": accelerator.num_processes,
                                                   "precision": accelerator.mixed_precision, "version": __version__,
                                                   "device_name": device_name(accelerator.device)}, resume=bool(state))
    trainer.log = tracker.log  # the tracker starts once a resumed state is loaded    print_("configuration: " + " ".join(f"{name}={value}" for name, value in config.items()))
    print_(f"{breakdown(cfg.batch_size, accelerator.num_processes, cfg.grad_accum_steps)}; "
           f"{device_name(accelerator.device)}, precision {accelerator.mixed_precision}"
           f"{', CUDA graphs' if graphs else ''}{', compiled' if cfg.compile != 'false' else ''}; "
           f"{len(data.train)} training / {len(data.val) if data.val else 0} validation images, "
           f"{train_loader.steps_per_epoch} steps per epoch; run directory {run_dir}")
    if state:
        print_(f"resumed from {resume_from}: epoch {start_epoch + 1}, step {start_step} of it, "
               f"optimizer step {trainer.global_step}")

    def checkpoint_state(epoch, step_in_epoch, val_accuracy=None):
        return {"global_step": trainer.global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "val_accuracy": val_accuracy, "best_val_accuracy": best, "config": config, "classes": data.classes,
                "num_train": len(data.train), "stamp": stamp}

    def stop_if_nonfinite():
        first_bad, _ = trainer.nonfinite()
        if first_bad is not None and not cfg.skip_nonfinite:
            saved = complete_checkpoints(checkpoints.folder)
            raise RunStopped(f"the loss became non-finite at optimizer step {first_bad} (epoch "
                             f"{(first_bad - 1) // train_loader.steps_per_epoch + 1}); stopped without saving; the last "
                             f"good checkpoint is {saved[-1] if saved else 'none (no checkpoint yet)'} "
                             "(--skip_nonfinite skips such steps instead)", 1)

    def save_checkpoint(epoch, step_in_epoch, val_accuracy=None) -> Path:
        stop_if_nonfinite()
        return checkpoints.save(checkpoint_state(epoch, step_in_epoch, val_accuracy))

    stop = StopSignals(accelerator)

    def after_step(epoch, step_in_epoch) -> bool:
        """Mid-epoch checkpoints and stops; at an epoch's last step the epoch ends normally first."""
        if step_in_epoch == train_loader.steps_per_epoch:
            return False
        if cfg.checkpoint_steps and trainer.global_step % cfg.checkpoint_steps == 0:
            save_checkpoint(epoch, step_in_epoch)
        if trainer.global_step % cfg.log_freq == 0 and not cfg.skip_nonfinite and trainer.nonfinite()[0] is not None:
            return True  # the next save (stopped_at below) names the step and stops
        return stop.requested(trainer.global_step)

    def stopped(path: Path):
        command = shlex.join([sys.argv[0], *_without_resume(sys.argv[1:]), "--resume", str(path)])
        return RunStopped(f"stopped by {stop.name()} after optimizer step {trainer.global_step}; checkpoint "
                          f"{path}; continue with the same launcher and: {command}", 128 + int(stop.received))

    evaluator = Evaluator(accelerator, model, len(data.classes), eval_batch, trainer.average)
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.num_epochs):
            stats = trainer.train_epoch(epoch, start_step if epoch == start_epoch else 0, after_step)
            check_readable(accelerator, train_loader)
            stop_if_nonfinite()
            if stats["stopped_at"] is not None:
                raise stopped(save_checkpoint(epoch, stats["stopped_at"]))
            values = {"Accuracy/Train": stats["train_accuracy"], "Loss/Epoch": stats["train_loss"],
                      "images_per_second": stats["images_per_second"], "epoch_seconds": stats["epoch_seconds"],
                      "epoch": epoch + 1, "lr": trainer.lr}
            if val_loader is not None:
                for (weights, _), confusion in evaluator(val_loader, (cfg.tta,)).items():
                    values["Accuracy/Validation" + ("_EMA" if weights == "ema" else "")] = accuracy(confusion)
                check_readable(accelerator, val_loader)
            val_accuracy = values.get("Accuracy/Validation")
            if val_accuracy is not None and (best is None or val_accuracy > best):
                best = val_accuracy
            trainer.end_of_epoch(val_accuracy, stats["train_accuracy"])
            _, nonfinite = trainer.nonfinite()
            if nonfinite:
                values["nonfinite_losses"] = nonfinite
            tracker.log(values, step=trainer.global_step)
            tracker.epoch_done(last=epoch + 1 == cfg.num_epochs)
            validation = "".join(f", {name.split('/')[1].replace('_', ' ').lower()} accuracy {100 * value:.2f}%"
                                 for name, value in values.items() if name.startswith("Accuracy/Validation"))
            skipped = f", {nonfinite} non-finite losses skipped so far" if nonfinite and cfg.skip_nonfinite else ""
            print_(f"epoch {epoch + 1}/{cfg.num_epochs}: loss {stats['train_loss']:.4f}, train accuracy "
                   f"{100 * stats['train_accuracy']:.2f}%{validation}, {stats['images_per_second']:,.0f} images/s, "
                   f"{stats['epoch_seconds']:.1f} s{skipped}")
            path = save_checkpoint(epoch + 1, 0, val_accuracy)
            if epoch + 1 < cfg.num_epochs and stop.agreed():
                raise stopped(path)
    finally:
        stop.restore()
    train_seconds = time.perf_counter() - started
    print_(f"trained {cfg.num_epochs - start_epoch} epochs in {train_seconds:.1f} s")
    return _final_report(cfg, accelerator, data, model, loader, val_loader, trainer, evaluator, tracker, save_path,
                         train_seconds, config)


def _final_report(cfg, accelerator, data, model, loader, val_loader, trainer, evaluator, tracker, save_path,
                  train_seconds, config):
    """Save the final weights; validation accuracy in every test-time mode; test accuracy; end the tracker."""
    print_ = accelerator.print
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_weights(save_path, unwrapped, config, data.classes)
    print_(f"saved the final weights to {save_path}")
    summary = {"train_seconds": train_seconds}
    if trainer.average is not None:
        average_path = save_path.with_name(f"{save_path.stem}_ema{save_path.suffix}")
        with trainer.average.swapped_in():
            if accelerator.is_main_process:
                save_weights(average_path, unwrapped, config, data.classes)
        print_(f"saved the averaged weights to {average_path}")
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
        test_loader = loader(data.test)
        for (weights, _), confusion in evaluator(test_loader, (cfg.tta,)).items():
            label = "test" if weights == "model" else "test, averaged weights,"
            print_accuracy(print_, f"{label} (tta {cfg.tta})", confusion, data.classes)
            summary["Accuracy/Test" + ("_EMA" if weights == "ema" else "")] = accuracy(confusion)
            test_confusion = confusion if weights == "model" else test_confusion
        check_readable(accelerator, test_loader)
    tracker.log(summary, step=trainer.global_step)
    tracker.finish(test_confusion, data.classes, save_path, trainer.global_step)
    return unwrapped


def _without_resume(argv: list) -> list:
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--resume":
            skip = True
        elif not argument.startswith("--resume="):
            kept.append(argument)
    return kept


def _truncate_metrics(path: Path, global_step: int):
    """Drop what an interrupted run logged after its checkpoint: those steps are trained again."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= global_step]
        temporary = path.with_suffix(".tmp")
        temporary.write_text("".join(line + "\n" for line in lines))
        temporary.replace(path)


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past the checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def check_writable(flag: str, path: Path):
    """Fail now, not after training, when `path` cannot be written: its nearest existing folder must be one."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file path such as {path}/model.pth")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path} cannot be written ({parent} is not a writable folder)")
