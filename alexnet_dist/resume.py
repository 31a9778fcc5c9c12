"""Continuing a run: which checkpoint, whether it fits this run, and putting its state back.

Checkpoints (RUN_DIR/checkpoints/step-<global step>/) hold the full training state through
`accelerator.save_state`: model, optimizer, scheduler, weight average, every rank's RNG state, and
trainer_state.json (epoch, step, accuracies, configuration). `--resume` continues from one in the
same run directory, at the same epoch and step, with the same data order and learning rate.
"""

import json
import shlex
from pathlib import Path

import torch

from .checkpoint import STATE_FILE, complete_checkpoints, read_state
from .config import UsageError, learning_changes
from .files import write_text
from .runtime import stop_together


def choose(cfg, data) -> tuple:
    """(checkpoint folder, its trainer state) that --resume names, checked against this run; main process."""
    path = find_checkpoint(cfg.resume, cfg.run_dir)
    state = read_state(path)
    check_resumable(state, cfg, data, path)
    return path, state


def find_checkpoint(resume: str, run_dir: str | None) -> Path:
    """The checkpoint that --resume names: a checkpoint folder, a run directory, or latest."""
    if resume == "latest":
        if run_dir is not None:
            base = Path(run_dir)
        else:
            runs = (
                [p for p in Path("runs").glob("*") if complete_checkpoints(p / "checkpoints")]
                if Path("runs").is_dir()
                else []
            )
            if not runs:
                raise UsageError("--resume latest: no run under runs/ has a checkpoint (give --run_dir or a path)")
            base = max(runs, key=lambda p: complete_checkpoints(p / "checkpoints")[-1].stat().st_mtime)
    else:
        base = Path(resume)
        if not base.exists():
            raise UsageError(f"--resume {resume} does not exist")
        if (base / STATE_FILE).is_file() or base.name.startswith("step-"):
            read_state(base)
            return base
    folder = base if base.name == "checkpoints" else base / "checkpoints"
    saved = complete_checkpoints(folder)
    if not saved:
        raise UsageError(f"--resume {resume}: {folder} holds no complete checkpoint")
    read_state(saved[-1])
    return saved[-1]


def check_resumable(state: dict, cfg, data, path: Path):
    """Refuse a checkpoint of another network, class list or data, or flags that change what is learned."""
    saved = state["config"]
    if saved.get("groups") != cfg.groups or state.get("classes") != data.classes:
        raise UsageError(
            f"--resume {path} was trained with groups={saved.get('groups')} on {len(state.get('classes') or [])} "
            f"classes, this run builds groups={cfg.groups} for {len(data.classes)} classes"
        )
    if state.get("num_train") != len(data.train):
        raise UsageError(
            f"--resume {path} was trained on {state.get('num_train')} training images, this run has "
            f"{len(data.train)}: not the same data"
        )
    if saved.get("schedule") != cfg.schedule:
        raise UsageError(
            f"--resume {path} was trained with --schedule {saved.get('schedule')}: the schedule cannot "
            f"change within a run (this run asks for {cfg.schedule})"
        )
    if (saved.get("ema", 0) > 0) != (cfg.ema > 0):
        raise UsageError(
            f"--resume {path} was trained {'with' if saved.get('ema', 0) > 0 else 'without'} --ema: "
            "the weight average cannot be switched on or off within a run"
        )
    changes = learning_changes(saved, cfg)
    if changes and not cfg.allow_config_change:
        raise UsageError(
            f"--resume {path}: these flags change what is learned ({'; '.join(changes)}); "
            "pass the run's own flags, or --allow_config_change"
        )


def restore(accelerator, trainer, path: Path, state: dict, cfg):
    """Load the checkpoint into the prepared objects and carry on from its optimizer step; every rank."""
    error = None
    try:
        accelerator.load_state(str(path))
    except Exception as failure:
        error = (f"--resume {path} cannot be loaded ({type(failure).__name__}): it is damaged; "
                 f"resume from an older checkpoint in {path.parent}")
    stop_together(accelerator, error)  # a file only one rank reads (its RNG state) must stop the others too
    accelerator.step = 0  # checkpoints fall between optimizer steps, whatever the accumulation was then
    apply_optimizer_flags(trainer.optimizer, trainer.scheduler, cfg, state["config"])
    trainer.global_step = state["global_step"]


def apply_optimizer_flags(optimizer, scheduler, cfg, saved: dict):
    """After loading a checkpoint, the flags' optimizer settings hold (they differ only with --allow_config_change):
    a new lr scales the schedule from the resumed step on."""
    ratio = cfg.lr / saved["lr"]
    for group in optimizer.param_groups:
        group.update(momentum=cfg.momentum, weight_decay=cfg.weight_decay * group.get("decay_scale", 1.0),
                     nesterov=cfg.nesterov)
        group["lr"] = float(group["lr"]) * ratio
        if "initial_lr" in group:
            group["initial_lr"] = float(group["initial_lr"]) * ratio
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.patience = cfg.plateau_patience
    else:
        scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]


def truncate_metrics(path: Path, global_step: int):
    """Drop what an interrupted run logged after its checkpoint: those steps are trained again."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= global_step]
        write_text(path, "".join(line + "\n" for line in lines))


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past the checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def resume_command(argv: list, path: Path) -> str:
    """The command line that continues from `path`: this one, with its --resume replaced."""
    kept, skip = [], False
    for argument in argv[1:]:
        if skip:
            skip = False
        elif argument == "--resume":
            skip = True
        elif not argument.startswith("--resume="):
            kept.append(argument)
    return shlex.join([argv[0], *kept, "--resume", str(path)])
