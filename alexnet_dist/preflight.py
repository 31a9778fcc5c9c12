"""Everything that can fail before training, decided once: the run's plan, the same on every rank.

The main process goes first: it reads the weights to start from, lists the data (downloading
CIFAR-10), checks the weights against it, chooses and checks the checkpoint to resume and checks
that `--save` can be written; only then does it decode and cache a folder's images and create the
run folder. Its decisions reach every rank in one broadcast; then each rank loads its own copy of the
data (from the cache the main process wrote). A bad input anywhere stops every rank with one line,
before anything is written. After `preflight` the code is rank-agnostic.
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import check_architecture, read_weights
from .config import Config, UsageError
from .data import Data, load_data
from .files import check_writable
from .layouts import choose_layout
from .loaders import streams
from .predict import image_paths
from .resume import choose
from .runtime import agreed, micro_batch_size, resolve_precision
from .speedups import use_cuda_graphs
from .tracking import check_logger


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a run does, held by every rank."""
    cfg: Config                     # the flags (for evaluation: the network and preprocessing of the weights)
    weights: dict | None            # the payload of --load_model_path, read by this rank
    data: Data | None = None        # this rank's copy of the splits (None when predicting)
    micro_batch: int = 0            # images per process and micro-step
    graphs: bool = False            # training steps recorded as CUDA graphs
    stamp: str = ""                 # the run's start time, also after a resume
    run_dir: Path | None = None     # the run folder (training only)
    save_path: Path | None = None   # where the final weights go (training only)
    resume_from: Path | None = None  # the checkpoint to continue from
    state: dict | None = None       # its trainer_state.json
    predict_paths: tuple = ()       # the image files to classify


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The main process's choices, broadcast to the other ranks (small and picklable: no tensors)."""
    cfg: Config
    asked: Config               # the main process's flags as given, which every rank must share
    stream: bool = False
    stamp: str = ""
    run_dir: Path | None = None
    save_path: Path | None = None
    resume_from: Path | None = None
    state: dict | None = None
    predict_paths: tuple = ()


def preflight(cfg: Config, state) -> Plan:
    """The plan on every rank, or a UsageError on every rank. `state`: Accelerate's PartialState (the processes,
    their device), built before the Accelerator so that the Accelerator can get the run folder when it is made."""
    precision = resolve_precision(cfg.mixed_precision, state.device.type == "cpu")

    def on_every_rank(decision: Decision, kept: tuple | None) -> Plan:
        """`kept`: on the main process, the weights and data it already read (None elsewhere)."""
        check_same_flags(cfg, decision.asked, state.process_index)
        run_cfg = decision.cfg
        weights, data = kept or (read_weights(run_cfg.load_model_path) if run_cfg.load_model_path else None, None)
        if run_cfg.predict:
            return Plan(cfg=run_cfg, weights=weights, predict_paths=decision.predict_paths)
        data = data or load_data(run_cfg, state.device, writer=False, stream=decision.stream)
        return Plan(cfg=run_cfg, weights=weights, data=data,
                    micro_batch=batch_share(run_cfg, state.num_processes),
                    graphs=run_cfg.train and use_cuda_graphs(run_cfg, state, precision, streaming=decision.stream),
                    stamp=decision.stamp, run_dir=decision.run_dir, save_path=decision.save_path,
                    resume_from=decision.resume_from, state=decision.state)

    return agreed(state, lambda: decide(cfg, state, precision), on_every_rank, undo=release)


def batch_share(cfg: Config, num_processes: int) -> int:
    """Images per micro-batch of each replica; UsageError if the layout cannot use the processes, or the batch does
    not split."""
    layout = choose_layout(cfg, num_processes)
    return micro_batch_size(cfg.batch_size, layout.replicas, cfg.grad_accum_steps, layout.unit)


def decide(cfg: Config, state, precision: str) -> tuple:
    """The main process's part: (its Decision for every rank, (the weights it read, the data it loaded))."""
    weights = read_weights(cfg.load_model_path) if cfg.load_model_path else None
    decided = with_weights_settings(cfg, weights) if (cfg.predict or not cfg.train) else cfg
    if decided.predict:
        if decided.predict_json:
            check_writable("--predict_json", Path(decided.predict_json))
        return Decision(cfg=decided, asked=cfg, predict_paths=tuple(image_paths(decided.predict))), (weights, None)
    if decided.train:
        check_logger(decided.logger, decided.project, decided.tags)
    batch_share(decided, state.num_processes)
    # the checks need only the classes and the splits' sizes: a folder's files are listed here, and decoded (and
    # cached, minutes for 50,000 JPEGs) once every check has passed
    listed = load_data(decided, state.device, writer=True, stream=True)
    if weights is not None:
        check_architecture(
            weights, {"groups": decided.groups, "num_classes": len(listed.classes)}, decided.load_model_path
        )
    if not decided.train and listed.test is None and listed.val is None:
        raise UsageError(f"{decided.data_dir} has no test split and --val_size 0 leaves nothing to evaluate on")
    paths = training_paths(decided, listed) if decided.train else {}
    data = load_data(decided, state.device, writer=True) if decided.dataset == "folder" else listed
    stream = streams(data.train, decided)  # --loader stream streams images in memory too
    use_cuda_graphs(decided, state, precision, streaming=stream)
    if decided.train:  # the last step, as it creates the folder: the resumed run's, or a new one
        resumed = paths["resume_from"]
        paths["run_dir"] = resumed.parent.parent if resumed else new_run_dir(decided, paths["stamp"])
    return Decision(cfg=decided, asked=cfg, stream=stream, **paths), (weights, data)


def check_same_flags(mine: Config, main: Config, rank: int):
    """Every process must be launched with the same flags (on every node): a mismatch stops them all."""
    differences = [
        f"--{name} {value!r} here, {getattr(main, name)!r} on the main process"
        for name, value in mine.to_dict().items()
        if value != getattr(main, name)
    ]
    if differences:
        raise UsageError(
            f"process {rank} was launched with other flags than the main process ({'; '.join(differences)}): "
            "give every node the same command"
        )


def training_paths(cfg: Config, data: Data) -> dict:
    """The checkpoint to resume (checked against this run) and the weights path; the run folder comes last."""
    resume_from, state = choose(cfg, data) if cfg.resume else (None, None)
    stamp = state["stamp"] if state else time.strftime("%Y%m%d-%H%M%S")
    save_path = Path(cfg.save.format(time=stamp))
    check_writable("--save", save_path)
    return {"stamp": stamp, "save_path": save_path, "resume_from": resume_from, "state": state}


def new_run_dir(cfg: Config, stamp: str) -> Path:
    """The new run's folder, created here (an atomic claim: two runs started in the same second get two folders);
    `release` removes it if another rank then refuses the run."""
    if cfg.run_dir is not None:
        try:
            Path(cfg.run_dir).mkdir(parents=True)
        except FileExistsError:
            raise UsageError(
                f"--run_dir {cfg.run_dir} already exists: pick a new folder, or continue it with --resume latest"
            ) from None
        return Path(cfg.run_dir)
    base = Path("runs") / f"{stamp}_{cfg.run_name or 'alexnet'}"
    candidate, number = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            number += 1
            candidate = base.with_name(f"{base.name}-{number}")


def release(decision: Decision):
    """Undo the main process's claim of a new run folder (and of the default runs/, if that is left empty)."""
    if decision.run_dir is not None and decision.state is None:
        folders = [decision.run_dir] + ([decision.run_dir.parent] if decision.cfg.run_dir is None else [])
        for folder in folders:
            try:
                folder.rmdir()  # only ever an empty folder
            except OSError:
                break


def with_weights_settings(cfg: Config, weights: dict) -> Config:
    """Evaluation and predictions use the network and preprocessing the weights were trained with (weights from
    before --lrn_alpha existed were trained at its default, the paper's)."""
    trained = weights["config"] or {}
    settings = {key: tuple(trained[key]) for key in ("resize", "random_crop", "mean", "std") if key in trained}
    settings["lrn_alpha"] = trained.get("lrn_alpha", Config.lrn_alpha)
    # the same validation split as in training, so that a data set without test/ is not scored on training images
    settings.update({key: trained[key] for key in ("seed", "val_size") if key in trained})
    return dataclasses.replace(cfg, groups=weights["architecture"]["groups"], **settings)
