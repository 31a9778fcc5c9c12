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
from .plot import draw_confusion, draw_curves


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def check_logger(logger: str):
    """Fail before anything is written when the chosen tracker's package is missing."""
    packages = {"wandb": ("wandb", "pip install wandb"), "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard")}
    if logger not in packages:
        return
    module, fix = packages[logger]
    try:
        __import__(module)
    except ImportError:
        raise UsageError(f"--logger {logger} needs the {logger} package: {fix}, or pass --logger none") from None


class Tracker:
    """The tracker run (if any) plus, always, the run directory's metrics.jsonl and PNG plots.

    Every method is a no-op on ranks other than the main process (Accelerate's trackers too).
    """

    def __init__(self, accelerator, cfg, run_dir: Path, config: dict, resume: bool = False):
        self.accelerator, self.run_dir, self.logger, self.offline_note = accelerator, Path(run_dir), cfg.logger, ""
        self.main, self.drawn_at = accelerator.is_main_process, time.perf_counter()
        init_kwargs = {}
        if cfg.logger == "wandb" and self.main:
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")
            os.environ["WANDB_MODE"] = mode  # decided here, so wandb never stops to ask for a login
            init_kwargs["wandb"] = {"name": cfg.run_name or self.run_dir.name, "tags": list(cfg.tags)}
            ids = self.run_dir / "tracker.json"
            if resume and ids.is_file():  # a resumed run continues its W&B run, on the same step axis
                init_kwargs["wandb"].update(id=json.loads(ids.read_text())["wandb_id"], resume="allow")
            if not os.environ.get("WANDB_DIR"):
                init_kwargs["wandb"]["dir"] = str(self.run_dir)
        if cfg.logger != "none":
            accelerator.project_configuration.project_dir = str(self.run_dir)
            accelerator.project_configuration.logging_dir = str(self.run_dir)  # TensorBoard writes here
            # TensorBoard's hyper-parameters take numbers, text and booleans only: lists and None become text
            plain = {key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in config.items()}
            accelerator.init_trackers(cfg.project, config=plain, init_kwargs=init_kwargs)
        wandb_run = self._wandb_run()
        if wandb_run is not None:
            (self.run_dir / "tracker.json").write_text(json.dumps({"wandb_id": wandb_run.id}) + "\n")
        if wandb_run is not None and os.environ["WANDB_MODE"] == "offline":
            where = Path(wandb_run.dir).parent
            self.offline_note = f"W&B ran offline (no credentials found, or WANDB_MODE=offline): upload with  wandb sync {where}"

    def log(self, values: dict, step: int):
        self.accelerator.log(values, step=step)
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    def epoch_done(self, last: bool = False):
        """Redraw the PNG curves: after the last epoch, and after others when 30 s have passed (a draw costs ~0.3 s)."""
        if self.main and (last or time.perf_counter() - self.drawn_at > 30):
            draw_curves([self.run_dir], self.run_dir)
            self.drawn_at = time.perf_counter()

    def _wandb_run(self):
        if self.logger != "wandb" or not self.main or os.environ.get("WANDB_MODE") == "disabled":
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True)

    def finish(self, confusion=None, classes=None, weights_path=None, step: int = 0):
        """Confusion matrix (PNG, and a W&B table and image), weights as a W&B artifact when online, end."""
        if self.main and confusion is not None:
            picture = draw_confusion(confusion, classes, self.run_dir / "ConfusionMatrix.png")
            wandb_run = self._wandb_run()
            if wandb_run is not None:
                import wandb

                rows = [[true, predicted, int(confusion[i, j])] for i, true in enumerate(classes)
                        for j, predicted in enumerate(classes)]
                per_class = (confusion.diagonal() / confusion.sum(dim=1).clamp(min=1)).tolist()
                wandb_run.log({"test/confusion_matrix": wandb.Table(columns=["true", "predicted", "count"], data=rows),
                               "test/per_class_accuracy": wandb.Table(columns=["class", "accuracy"],
                                                                      data=[list(r) for r in zip(classes, per_class)]),
                               "test/confusion_matrix_image": wandb.Image(str(picture))}, step=step)
        if self.main and weights_path is not None and self._wandb_run() is not None and os.environ.get("WANDB_MODE") == "online":
            import wandb

            artifact = wandb.Artifact(f"alexnet-{self.run_dir.name}", type="model")
            artifact.add_file(str(weights_path))
            self._wandb_run().log_artifact(artifact)
        self.accelerator.end_training()
        if self.offline_note:
            self.accelerator.print(self.offline_note)
