"""Trackers through Accelerate (W&B, TensorBoard, or none), on the main process only.

W&B never prompts: it runs online when credentials exist (WANDB_API_KEY or a `wandb login`),
offline otherwise (saying where the run is and how to upload it), and WANDB_MODE wins over both.
"""

import netrc
import os
from pathlib import Path

from .config import UsageError


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
    """Start the tracker run, log to it, end it; a no-op where logger is none."""

    def __init__(self, accelerator, cfg, run_dir: Path, config: dict):
        self.accelerator, self.offline_note = accelerator, ""
        init_kwargs = {}
        if cfg.logger == "wandb" and accelerator.is_main_process:
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")
            os.environ["WANDB_MODE"] = mode
            if mode == "offline":
                self.offline_note = (f"W&B ran offline (no credentials found); upload the run with: "
                                     f"wandb sync {run_dir / 'wandb'}/offline-run-*")
            init_kwargs["wandb"] = {"name": run_dir.name if cfg.run_name is None else cfg.run_name,
                                    "tags": list(cfg.tags), "dir": str(run_dir)}
        if cfg.logger != "none":
            accelerator.project_configuration.set_directories(str(run_dir))
            accelerator.init_trackers(cfg.project, config=config, init_kwargs=init_kwargs)

    def log(self, values: dict, step: int):
        self.accelerator.log(values, step=step)

    def finish(self):
        self.accelerator.end_training()
        if self.offline_note:
            self.accelerator.print(self.offline_note)
