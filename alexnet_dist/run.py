"""A training run around the loop (training.train): run folder, tracker, progress bar, checkpoints, best
accuracy, stop signals, and the final report.

    with Run(plan, accelerator, trainer) as run:
        train(trainer, run)       # calls run.epochs(), begin_epoch(), after_step(), end_epoch()
        model = run.finish()      # raises RunStopped if the run was stopped

`after_step` and `end_epoch` save checkpoints when due and return True (after saving) when a stop
signal arrived or a loss became non-finite; `stopped` then holds the message and exit status. Every
rank calls them at the same points.
"""

import json
import sys
import time

import torch
from tqdm.auto import tqdm

from . import __version__, dashboard
from .checkpoint import Checkpoints, complete_checkpoints, save_weights
from .clock import clock
from .engine import TTA_VIEWS, Evaluator, accuracy, per_class_accuracy
from .loaders import check_readable
from .resume import how_to_continue, restore, truncate_metrics
from .runtime import RunStopped, StopSignals, breakdown, device_name, stop_together
from .tracking import Tracker

FIT_SAMPLE = 5000  # training images on which the final weights' fit is measured


def print_accuracy(print_, title: str, confusion, classes):
    total = int(confusion.sum())
    print_(f"{title} accuracy {100 * accuracy(confusion):.2f}% ({int(confusion.diagonal().sum())}/{total} images)")
    width = max(len(name) for name in classes)
    for name, value, count in zip(classes, per_class_accuracy(confusion), confusion.sum(dim=1).tolist()):
        print_(f"  {name:<{width}}  {100 * value:6.2f}%  ({count} images)")


class Run:
    def __init__(self, plan, accelerator, trainer):
        self.plan, self.cfg, self.accelerator, self.trainer = plan, plan.cfg, accelerator, trainer
        self.print = accelerator.print
        self.config = plan.cfg.to_dict()
        self.data, self.run_dir = plan.data, plan.run_dir
        with clock.part("data"):
            self.val_loader = trainer.make_loader(plan.data.val) if plan.data.val is not None else None
        self.evaluator = Evaluator(accelerator, trainer.model, len(plan.data.classes), 2 * plan.micro_batch,
                                   trainer.average)
        self.bar, self.epoch, self.step_in_epoch, self.stopped = None, 0, 0, None
        self.checkpoints = Checkpoints(accelerator, plan.run_dir / "checkpoints", self.cfg.keep_checkpoints)
        accelerator.register_for_checkpointing(trainer.scheduler, *([trainer.average] if trainer.average else []))
        self.best, self.start_epoch, self.start_step = None, 0, 0
        if plan.state:
            self._resume()
        elif accelerator.is_main_process:  # the preflight created the folder
            (self.run_dir / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        self.tracker = Tracker(accelerator, self.cfg, self.run_dir, {
            **self.config, "num_processes": accelerator.num_processes, "precision": accelerator.mixed_precision,
            "version": __version__, "device_name": device_name(accelerator.device)}, resume=bool(plan.state))
        self._print_start()
        self.stop = StopSignals(accelerator)
        self.started = self.saved_at = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.stop.restore()
        if self.bar is not None:
            self.bar.close()  # after a stop the epoch did not end: the message must not land on the bar's line
        return False

    def _resume(self):
        state = self.plan.state
        restore(self.accelerator, self.trainer, self.plan.resume_from, state, self.cfg)
        self.checkpoints.clean(newer_than=state["global_step"])  # only once the resumed one has loaded
        self.start_epoch, self.start_step = state["epoch"], state["step_in_epoch"]
        self.best = state.get("best_val_accuracy")
        if "meter" in state:  # older checkpoints lack it: figures then count only the steps after it
            self.trainer.meter.restore(state["meter"], epoch=False)
        if self.accelerator.is_main_process:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.trainer.global_step)

    def _print_start(self):
        cfg, accelerator, data = self.cfg, self.accelerator, self.data
        self.print("configuration: " + " ".join(f"{name}={value}" for name, value in self.config.items()))
        self.print(
            f"{breakdown(cfg.batch_size, self.trainer.layout, cfg.grad_accum_steps)}; "
            f"{device_name(accelerator.device)}, precision {accelerator.mixed_precision}"
            f"{', CUDA graphs' if self.trainer.graphs else ''}{', compiled' if cfg.compile != 'false' else ''}; "
            f"{len(data.train)} training / {len(data.val) if data.val else 0} validation images, "
            f"{self.trainer.loader.steps_per_epoch} steps per epoch; run directory {self.run_dir}"
        )
        if self.plan.state:
            self.print(
                f"resumed from {self.plan.resume_from}: epoch {self.start_epoch + 1}, step {self.start_step} "
                f"of it, optimizer step {self.trainer.global_step}"
            )

    def epochs(self) -> range:
        return range(self.start_epoch, self.cfg.num_epochs)

    def begin_epoch(self, epoch: int) -> int:
        """The optimizer step of `epoch` to start from: 0, or where the resumed run left off."""
        self.epoch = epoch
        self.step_in_epoch = self.start_step if epoch == self.start_epoch else 0
        if self.step_in_epoch and "meter" in self.plan.state:  # the epoch's figures count its steps before the stop
            self.trainer.meter.restore(self.plan.state["meter"], epoch=True)
        self.bar = tqdm(
            total=self.trainer.loader.steps_per_epoch - self.step_in_epoch,
            leave=False,
            dynamic_ncols=True,
            desc=f"epoch {epoch + 1}/{self.cfg.num_epochs}",
            disable=not (self.accelerator.is_main_process and sys.stderr.isatty()),
        )
        return self.step_in_epoch

    # ------------------------------------------------------------ during an epoch

    def after_step(self) -> bool:
        """Log points, mid-epoch checkpoints and stops (True: stop now); an epoch's last step is end_epoch's."""
        trainer, cfg = self.trainer, self.cfg
        self.step_in_epoch += 1
        self.bar.update(1)
        if trainer.global_step % cfg.log_freq == 0:
            self.log(self._log_point())
        if self.step_in_epoch == trainer.loader.steps_per_epoch:
            return False
        nonfinite_now = (
            trainer.global_step % cfg.log_freq == 0
            and not cfg.skip_nonfinite
            and trainer.meter.nonfinite()[0] is not None
        )
        stop, due = self.stop.poll(trainer.global_step, self._checkpoint_due())
        if nonfinite_now or stop:
            self._stop(self.save(self.epoch, self.step_in_epoch))  # save() names a non-finite step and stops first
        elif due or cfg.checkpoint_steps and trainer.global_step % cfg.checkpoint_steps == 0:
            self.save(self.epoch, self.step_in_epoch)
        return self.stopped is not None

    def _log_point(self) -> dict:
        """The training loss since the last log point (a synchronisation), on the bar and printed."""
        loss, accuracy_ = self.trainer.meter.log_point()
        rate, lr = self.trainer.meter.images_per_second(), self.trainer.lr
        self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:,.0f}", acc=f"{accuracy_:.3f}")
        if self.accelerator.is_main_process:
            self.bar.write(
                f"step {self.trainer.global_step}: training loss {loss:.4f}, lr {lr:.4g}, {rate:,.0f} images/s"
            )
        return {"Loss/Train": loss, "lr": lr}

    def end_epoch(self, epoch: int) -> bool:
        """Validation, curves, the epoch's line and checkpoint; True when a stop signal or a non-finite loss ends
        the run here."""
        trainer, cfg = self.trainer, self.cfg
        self.bar.close()
        check_readable(self.accelerator, trainer.loader)
        if self._nonfinite_stop():
            return True
        stats = trainer.meter.epoch_stats()
        values = {
            "Accuracy/Train": stats["train_accuracy"],
            "Loss/Epoch": stats["train_loss"],
            "images_per_second": stats["images_per_second"],
            "epoch_seconds": stats["epoch_seconds"],
            "epoch": epoch + 1,
            "lr": trainer.lr,
        }
        values.update(self.validate())
        val_accuracy = values.get("Accuracy/Validation")
        if val_accuracy is not None and (self.best is None or val_accuracy > self.best):
            self.best = val_accuracy
        if trainer.plateau:
            trainer.scheduler.step(stats["train_accuracy"] if val_accuracy is None else val_accuracy)
        _, nonfinite = trainer.meter.nonfinite()
        if nonfinite:
            values["nonfinite_losses"] = nonfinite
        last = epoch + 1 == cfg.num_epochs
        with clock.part("tracking"):
            self.tracker.log(values, step=trainer.global_step)
            self.tracker.epoch_done(last=last)
        self._print_epoch(epoch, stats, values, nonfinite)
        stop, due = self.stop.agree(self._checkpoint_due())
        steps_due = cfg.checkpoint_steps and trainer.global_step % cfg.checkpoint_steps == 0
        if last or stop or due or steps_due or cfg.checkpoint_minutes == 0:
            path = self.save(epoch + 1, 0, val_accuracy)
            if stop and not last:
                self._stop(path)
        return self.stopped is not None

    def validate(self) -> dict:
        """Validation accuracy of the weights (and of their average) with the centre crop, every test-time mode
        being left to the end: {"Accuracy/Validation": ..., "Accuracy/Validation_EMA": ...}; {} without a
        validation split. Every rank calls it. The loop gets it at each epoch's end; to validate every N steps too,
        add `if t.global_step % N == 0: run.log(run.validate())` after `run.after_step()` in training.train."""
        if self.val_loader is None:
            return {}
        with clock.part("validation"):
            values = {
                "Accuracy/Validation" + ("_EMA" if weights == "ema" else ""): accuracy(confusion)
                for (weights, _), confusion in self.evaluator(self.val_loader, ("none",)).items()
            }
        check_readable(self.accelerator, self.val_loader)
        self.trainer.model.train()  # evaluation left it in eval mode, and an epoch may go on
        return values

    def log(self, values: dict):
        """Values for the tracker and metrics.jsonl at the current optimizer step (main process)."""
        with clock.part("tracking"):
            self.tracker.log(values, step=self.trainer.global_step)

    def _print_epoch(self, epoch, stats, values, nonfinite):
        validation = "".join(
            f", {name.split('/')[1].replace('_', ' ').lower()} accuracy {100 * value:.2f}%"
            for name, value in values.items()
            if name.startswith("Accuracy/Validation")
        )
        skipped = f", {nonfinite} non-finite losses skipped so far" if nonfinite and self.cfg.skip_nonfinite else ""
        self.print(
            f"epoch {epoch + 1}/{self.cfg.num_epochs}: loss {stats['train_loss']:.4f}, train accuracy "
            f"{100 * stats['train_accuracy']:.2f}%{validation}, {stats['images_per_second']:,.0f} images/s, "
            f"{stats['epoch_seconds']:.1f} s{skipped}"
        )

    # ------------------------------------------------------------ checkpoints and stops

    def _nonfinite_stop(self) -> bool:
        """True, with `stopped` set, when a loss became non-finite and such steps are not skipped."""
        first_bad, _ = self.trainer.meter.nonfinite()
        if first_bad is not None and not self.cfg.skip_nonfinite and self.stopped is None:
            saved = complete_checkpoints(self.checkpoints.folder)
            epoch = (first_bad - 1) // self.trainer.loader.steps_per_epoch + 1
            self.stopped = RunStopped(
                f"the loss became non-finite at optimizer step {first_bad} (epoch {epoch}); stopped without saving; "
                f"the last good checkpoint is {saved[-1] if saved else 'none (no checkpoint yet)'} "
                "(--skip_nonfinite skips such steps instead)",
                1,
            )
        return self.stopped is not None

    def _checkpoint_due(self) -> bool:
        minutes = self.cfg.checkpoint_minutes
        return minutes > 0 and time.perf_counter() - self.saved_at >= 60 * minutes

    def save(self, epoch: int, step_in_epoch: int, val_accuracy=None):
        """The full training state; none (and a stop) once a loss was non-finite, so that no bad state is kept."""
        if self._nonfinite_stop():
            return None
        with clock.part("checkpoints"):
            path = self.checkpoints.save(
                {
                    "global_step": self.trainer.global_step,
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "val_accuracy": val_accuracy,
                    "best_val_accuracy": self.best,
                    "config": self.config,
                    "classes": self.data.classes,
                    "num_train": len(self.data.train),
                    "stamp": self.plan.stamp,
                    "meter": self.trainer.meter.totals(),  # the log window's and the epoch's sums so far
                }
            )
        self.saved_at = time.perf_counter()
        return path

    def _stop(self, path):
        if self.stopped is None:  # a non-finite loss found while saving keeps its own message
            self.stopped = RunStopped(
                f"stopped by {self.stop.name()} after optimizer step {self.trainer.global_step}; checkpoint {path}; "
                f"{how_to_continue(sys.argv, path)}",
                128 + int(self.stop.received),
            )

    # ------------------------------------------------------------ the end

    def finish(self):
        """Save the final weights; validation accuracy in every test-time mode; test accuracy; end the tracker.
        After a stop: raise RunStopped instead."""
        if self.stopped is not None:
            raise self.stopped
        train_seconds = time.perf_counter() - self.started
        self.print(f"trained {self.cfg.num_epochs - self.start_epoch} epochs in {train_seconds:.1f} s")
        self.accelerator.wait_for_everyone()
        unwrapped = self.trainer.whole_model()
        with clock.part("checkpoints"):
            self._save_weights(unwrapped)
        self.stop.restore()  # from here Ctrl-C stops the final report at once (the weights are saved)
        summary = {"train_seconds": train_seconds}
        with clock.part("final"):
            final = self._final_validation(summary)
            self._fit(summary)
            test_loader, test_confusion = self._test(summary)
            split, loader, confusion = (
                ("test", test_loader, test_confusion)
                if test_confusion is not None
                else ("validation", self.val_loader, final.get(("model", self.cfg.tta)))
            )
            gallery = None
            if self.accelerator.is_main_process and self.cfg.logger != "none" and confusion is not None:
                gallery = dashboard.gallery(
                    unwrapped,
                    loader,
                    self.accelerator,
                    self.data.classes,
                    self.cfg.tta,
                    confusion,
                    self.run_dir,
                    self.cfg.seed,
                )
        with clock.part("tracking"):
            times, table = clock.report()
            self.print(table)
            self.tracker.log({**summary, **times}, step=self.trainer.global_step)
            self.tracker.finish(
                confusion, self.data.classes, self.plan.save_path, self.trainer.global_step, gallery, split
            )
        return unwrapped

    def _final_validation(self, summary: dict) -> dict:
        """Validation accuracy in every test-time mode, into `summary` and printed: {(weights, mode): confusion}."""
        final = self.evaluator(self.val_loader, tuple(TTA_VIEWS)) if self.val_loader is not None else {}
        for (weights, mode), confusion in final.items():
            name = f"Accuracy/Validation_final{'_EMA' if weights == 'ema' else ''}/tta_{mode}"
            summary[name] = accuracy(confusion)
            self.print(
                f"final validation accuracy, {'averaged' if weights == 'ema' else 'final'} weights, "
                f"tta {mode}: {100 * summary[name]:.2f}%"
            )
        return final

    def _fit(self, summary: dict):
        """How well the final weights fit the images they trained on: accuracy on a fixed sample of the training
        split, centre crop, dropout off (the training accuracy of the epochs is measured on augmented images with
        dropout on, so it cannot tell under-fitting from over-fitting)."""
        order = torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(0))
        with clock.part("data"):
            loader = self.trainer.make_loader(self.data.train.subset(order[:FIT_SAMPLE].sort().values))
        for (weights, _), confusion in self.evaluator(loader, ("none",)).items():
            name = "Accuracy/Train_fit" + ("_EMA" if weights == "ema" else "")
            summary[name] = accuracy(confusion)
            self.print(f"fit: {'averaged' if weights == 'ema' else 'final'} weights on {int(confusion.sum())} "
                       f"training images (centre crop, no dropout): {100 * summary[name]:.2f}%")

    def _save_weights(self, unwrapped):
        """The final weights (and the average's), by the main process; if that fails, every rank stops."""
        save_path = self.plan.save_path
        files = [(save_path, unwrapped, "final")]
        if self.trainer.average is not None:
            files.append((save_path.with_name(f"{save_path.stem}_ema{save_path.suffix}"),
                          self.trainer.layout.whole_model(self.trainer.average.module), "averaged"))  # all ranks
        error = None
        if self.accelerator.is_main_process:
            try:
                for path, model, _ in files:
                    save_weights(path, model, self.config, self.data.classes)
            except Exception as failure:
                error = f"could not write the weights {path} ({type(failure).__name__}: {failure}); the run stopped"
        stop_together(self.accelerator, error, code=1)
        for path, _, which in files:
            self.print(f"saved the {which} weights to {path}")

    def _test(self, summary: dict) -> tuple:
        """Test accuracy (and of the average) in the chosen test-time mode: (loader, the model's confusion matrix)."""
        if self.data.test is None:
            self.print(self.data.test_note)
            return None, None
        with clock.part("data"):
            test_loader, test_confusion = self.trainer.make_loader(self.data.test), None
        for (weights, _), confusion in self.evaluator(test_loader, (self.cfg.tta,)).items():
            label = "test" if weights == "model" else "test, averaged weights,"
            print_accuracy(self.print, f"{label} (tta {self.cfg.tta})", confusion, self.data.classes)
            summary["Accuracy/Test" + ("_EMA" if weights == "ema" else "")] = accuracy(confusion)
            test_confusion = confusion if weights == "model" else test_confusion
        check_readable(self.accelerator, test_loader)
        return test_loader, test_confusion
