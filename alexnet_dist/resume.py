"""Continuing a run: which checkpoint, whether it fits this run, and putting its state back.

Checkpoints (RUN_DIR/checkpoints/step-<global step>/) hold the full training state through
`accelerator.save_state`: model, optimizer, scheduler, weight average, every rank's RNG state, and
trainer_state.json (epoch, step, accuracies, configuration). `--resume` continues from one in the
same run directory, at the same epoch and step, with the same data order and learning rate.
"""

import json
import os
import shlex
import shutil
import sys
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


def how_to_continue(argv: list, path: Path, parent: list | None = None) -> str:
    """'continue with: COMMAND', a command to paste that continues from `path`: this one, its --resume replaced,
    after the launcher that started it when that is known. `parent`: the parent process's command line (read from
    /proc when not given)."""
    arguments, skip = [], False
    for argument in argv[1:]:
        if skip:
            skip = False
        elif argument == "--resume":
            skip = True
        elif not argument.startswith("--resume="):
            arguments.append(argument)
    arguments += ["--resume", str(path)]
    prefix = launch_prefix(argv, parent_command_line() if parent is None else parent)
    if prefix is None:
        return f"continue with the same launcher (on every node) and: {shlex.join([argv[0], *arguments])}"
    return f"continue with: {shlex.join([*prefix, *arguments])}"


# set by `accelerate launch` and by torchrun (also when accelerate launch starts several processes through it)
LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")


def launch_prefix(argv: list, parent: list | None) -> list | None:
    """What came before this process's arguments in the command the user typed: `python launch/train.py` (or the
    console script) without a launcher; with one, the launcher's own command line, which ends with these arguments
    (its options, such as --config_file, kept); None when that is not known, or every node runs a command of its own
    (several nodes, SLURM)."""
    if not any(name in os.environ for name in LAUNCHER_VARIABLES):
        return [typed(sys.executable), argv[0]] if argv[0].endswith(".py") else [typed(argv[0])]
    if "SLURM_JOB_ID" in os.environ or os.environ.get("WORLD_SIZE") != os.environ.get("LOCAL_WORLD_SIZE"):
        return None
    arguments = argv[1:]
    if parent is None or len(parent) <= len(arguments) or parent[len(parent) - len(arguments):] != arguments:
        return None
    command = parent[: len(parent) - len(arguments)]  # the launcher, its options and the script
    # a console script runs as `python /path/bin/accelerate launch ...`; typed, it is `accelerate launch ...`
    if Path(command[0]).name.startswith("python") and len(command) > 2 and not command[1].startswith("-") and \
            not command[1].endswith(".py"):
        command = command[1:]
    return [typed(command[0]), *command[1:]]


def typed(program: str) -> str:
    """`program` by its name when PATH finds that same file, else as it was started."""
    found = shutil.which(Path(program).name)
    try:
        return Path(program).name if found and os.path.samefile(found, program) else program
    except OSError:  # started by a name PATH no longer finds, or a path relative to another folder
        return program


def parent_command_line() -> list | None:
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (OSError, UnicodeDecodeError):
        return None
