"""Trackers through Accelerate (W&B, TensorBoard, or none), on the main process only.

W&B never prompts: it runs online when credentials exist (WANDB_API_KEY or a `wandb login`),
offline otherwise (saying where the run is and how to upload it), and WANDB_MODE wins over both.
"""

import json
import netrc
import os
import time
from pathlib import Path

from .config import UsageError
from .engine import per_class_accuracy
from .plot import draw_confusion, draw_curves


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE if set; else online with credentials, offline without (never a login prompt)."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")


# W&B's rules (wandb.Settings): a project name of at most 128 characters, none of these, and tags of 1 to 64
WANDB_PROJECT_FORBIDS, WANDB_MAX_PROJECT, WANDB_MAX_TAG = "/\\#?%:", 128, 64


def check_logger(logger: str, project: str = "", tags: tuple = ()):
    """Fail before anything is written when the chosen tracker's package is missing, or W&B would refuse the
    project or a tag (it raises only once the run has started)."""
    if logger == "wandb":
        found = sorted({char for char in project if char in WANDB_PROJECT_FORBIDS})
        if found or len(project) > WANDB_MAX_PROJECT:
            forbidden = " ".join(WANDB_PROJECT_FORBIDS)
            raise UsageError(
                f"--project {project!r}: W&B takes at most {WANDB_MAX_PROJECT} characters and none of {forbidden} "
                f"(found {' '.join(found) or f'{len(project)} characters'}); the team or user goes in WANDB_ENTITY"
            )
        for tag in tags:
            if len(tag) > WANDB_MAX_TAG:
                raise UsageError(
                    f"--tags {tag!r}: W&B takes tags of at most {WANDB_MAX_TAG} characters, got {len(tag)}"
                )
    packages = {
        "wandb": ("wandb", "pip install wandb"),
        "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
    }
    if logger not in packages:
        return
    module, fix = packages[logger]
    try:
        __import__(module)
    except ImportError:
        raise UsageError(f"--logger {logger} needs the {logger} package: {fix}, or pass --logger none") from None
    if logger == "wandb":
        check_wandb_environment()


def check_wandb_environment():
    """Each WANDB_* variable, read as wandb.init reads it: W&B refuses a bad one (WANDB_MODE=bogus) only once the
    run has started, with a traceback, after the run folder is written."""
    import wandb

    if not hasattr(wandb.Settings, "update_from_env_vars"):  # W&B before 0.19 reads the environment otherwise
        return
    for name, value in sorted(os.environ.items()):
        if not name.startswith("WANDB_"):
            continue
        try:
            wandb.Settings().update_from_env_vars({name: value})
        except (ValueError, wandb.errors.Error) as error:  # pydantic's ValidationError is a ValueError
            reason = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
            raise UsageError(
                f"{name}={value!r} in the environment: W&B refuses it ({reason}); correct or unset it"
            ) from None


class Tracker:
    """The tracker run (if any) plus, always, the run directory's metrics.jsonl and PNG plots.

    Every method is a no-op on ranks other than the main process (Accelerate's trackers too).
    """

    def __init__(self, accelerator, cfg, run_dir: Path, config: dict, resume: bool = False):
        self.accelerator, self.run_dir, self.logger, self.offline_note = accelerator, Path(run_dir), cfg.logger, ""
        self.main, self.drawn_at = accelerator.is_main_process, time.perf_counter()
        init_kwargs = {}
        if cfg.logger == "wandb" and self.main:
            os.environ["WANDB_MODE"] = wandb_mode()  # decided here, so wandb never stops to ask for a login
            init_kwargs["wandb"] = {"name": cfg.run_name or self.run_dir.name, "tags": list(cfg.tags)}
            ids = self.run_dir / "tracker.json"
            if resume and ids.is_file():  # a resumed run continues its W&B run, on the same step axis
                init_kwargs["wandb"].update(id=json.loads(ids.read_text())["wandb_id"], resume="allow")
            if not os.environ.get("WANDB_DIR"):
                init_kwargs["wandb"]["dir"] = str(self.run_dir)
        if cfg.logger != "none":
            # TensorBoard's hyper-parameters take numbers, text and booleans only: lists and None become text
            plain = {
                key: value if isinstance(value, (bool, int, float, str)) else str(value)
                for key, value in config.items()
            }
            accelerator.init_trackers(cfg.project, config=plain, init_kwargs=init_kwargs)
        wandb_run = self._wandb_run()
        if wandb_run is not None:
            (self.run_dir / "tracker.json").write_text(json.dumps({"wandb_id": wandb_run.id}) + "\n")
            # every curve against the optimizer step; the summary keeps the best validation accuracy
            wandb_run.define_metric("optimizer_step")
            wandb_run.define_metric("*", step_metric="optimizer_step")
            for name in ("Accuracy/Validation", "Accuracy/Validation_EMA"):
                wandb_run.define_metric(name, step_metric="optimizer_step", summary="max")
        if wandb_run is not None and os.environ["WANDB_MODE"] == "offline":
            where = Path(wandb_run.dir).parent
            self.offline_note = (
                f"W&B ran offline (no credentials found, or WANDB_MODE=offline): upload with  wandb sync {where}"
            )

    def log(self, values: dict, step: int):
        # one axis, the optimizer step: it is W&B's step, and also logged as `optimizer_step`, the x-axis the
        # curves are defined on (define_metric), so that the charts say what the number is; the same number twice
        self.accelerator.log({**values, "optimizer_step": step} if self._wandb_run() else values, step=step)
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    def epoch_done(self, last: bool = False):
        """Redraw the PNG curves: after the last epoch, and after others when 30 s have passed (a draw: ~0.3 s)."""
        if self.main and (last or time.perf_counter() - self.drawn_at > 30):
            draw_curves([self.run_dir], self.run_dir)
            self.drawn_at = time.perf_counter()

    def _wandb_run(self):
        if self.logger != "wandb" or not self.main or os.environ.get("WANDB_MODE") == "disabled":
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True)

    def finish(self, confusion=None, classes=None, weights_path=None, step: int = 0, gallery=None, split="test"):
        """Confusion matrix and confused pairs (PNGs, W&B and TensorBoard images), the predictions table and the
        tables of the confusion, weights as a W&B artifact when online; then end the tracker."""
        if self.main and confusion is not None:
            pictures = {
                f"{split}/confusion_matrix_image": draw_confusion(
                    confusion, classes, self.run_dir / "ConfusionMatrix.png"
                )
            }
            if gallery is not None and gallery.pairs_png is not None:
                pictures[f"{split}/most_confused_pairs"] = gallery.pairs_png
            self._log_pictures(pictures, confusion, classes, step, gallery, split)
        if (
            self.main
            and weights_path is not None
            and self._wandb_run() is not None
            and os.environ.get("WANDB_MODE") == "online"
        ):
            import wandb

            artifact = wandb.Artifact(f"alexnet-{self.run_dir.name}", type="model")
            artifact.add_file(str(weights_path))
            self._wandb_run().log_artifact(artifact)
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self.offline_note:
            self.accelerator.print(self.offline_note)

    def _log_pictures(self, pictures: dict, confusion, classes, step: int, gallery, split: str):
        if self.logger == "tensorboard":
            import numpy as np
            from PIL import Image

            board = self.accelerator.get_tracker("tensorboard")
            board.log_images(
                {
                    name: np.asarray(Image.open(path).convert("RGB"))[None].transpose(0, 3, 1, 2)
                    for name, path in pictures.items()
                },
                step=step,
            )
        wandb_run = self._wandb_run()
        if wandb_run is None:
            return
        import wandb

        rows = [
            [true, predicted, int(confusion[i, j])]
            for i, true in enumerate(classes)
            for j, predicted in enumerate(classes)
        ]
        values = {
            f"{split}/confusion_matrix": wandb.Table(columns=["true", "predicted", "count"], data=rows),
            f"{split}/per_class_accuracy": wandb.Table(
                columns=["class", "accuracy"], data=[list(r) for r in zip(classes, per_class_accuracy(confusion))]
            ),
            **{name: wandb.Image(str(path)) for name, path in pictures.items()},
        }
        if gallery is not None:
            values[f"{split}/predictions"] = wandb.Table(
                columns=gallery.columns, data=[[wandb.Image(row[0]), *row[1:]] for row in gallery.rows]
            )
        wandb_run.log({**values, "optimizer_step": step}, step=step)
