"""Every flag of alexnet-dist, described once: default, one-line meaning, check, and whether it
changes what is learned.

`Config` is the single source of truth: the CLI builds it from the command line (over a recipe
file, if one is named); `--help`, the flag tables (docs/flags.md, README.md), the checks and the set
of flags that a resumed run must keep are all read off its fields. The tracker and every checkpoint store
`Config.to_dict()`. Bad values raise `UsageError` with one line naming the flag and what is allowed.
"""

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .model import MAX_SINGLE_POSITION, MIN_INPUT


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with status 2."""


# ---------------------------------------------------------------- checks: (flag name, raw value) -> value


def _size(pair) -> str:
    return f"{pair[0]},{pair[1]}"


def _bool(name, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise UsageError(f"--{name} must be True or False, got {value!r}")


def _flip(name, value):
    if str(value).strip().lower() == "alternate":
        return "alternate"
    try:
        return _bool(name, value)
    except UsageError:
        raise UsageError(f"--{name} must be True, False or alternate, got {value!r}") from None


def _number(name, value, kind, low=None, high=None, low_open=False, high_open=False):
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinity, e.g. --batch_size 1e999
        raise UsageError(f"--{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise UsageError(f"--{name} must be a finite number, got {value!r}")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        if high is None:
            allowed = f"{'greater than' if low_open else 'at least'} {low}"
        else:
            allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise UsageError(f"--{name} must be {allowed}, got {value!r}")
    return number


@dataclass(frozen=True)
class Number:
    """The check of a numeric flag, holding its bounds so that the bounds tests can be derived from them."""
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None passes: the run chooses the value (e.g. --cpu_threads)

    def __call__(self, name, value):
        if self.optional and value is None:
            return None
        return _number(name, value, self.kind, self.low, self.high, self.low_open, self.high_open)


def number(kind, low=None, high=None, low_open=False, high_open=False) -> Number:
    return Number(kind, low, high, low_open, high_open)


def optional_number(kind, low=None) -> Number:
    return Number(kind, low, optional=True)


def choice(*allowed, lower=False):
    def check(name, value):
        text = str(value).lower() if lower else str(value)
        if text not in allowed:
            raise UsageError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        return text
    return check


def _items(value) -> list:
    """Fire hands lists over as list/tuple (`[70,70]`, `70,70`), a number (`70`) or a string."""
    if isinstance(value, str):
        value = [part.strip() for part in value.strip("[]() ").split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return list(value)


def _pair(name, value):
    items = _items(value.replace("x", ",") if isinstance(value, str) else value)
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:
        raise UsageError(f"--{name} must be one size or two (H,W), e.g. --{name} 64 or --{name} 64,64; got {value!r}")
    pair = tuple(_number(name, item, int, low=1) for item in items)
    if name == "random_crop" and min(pair) < MIN_INPUT:
        raise UsageError(
            f"--random_crop must be at least {MIN_INPUT}x{MIN_INPUT}, AlexNet's smallest input; got {_size(pair)}"
        )
    return pair


def _triple(name, value):
    items = _items(value)
    if len(items) != 3:
        raise UsageError(
            f"--{name} must be three numbers, one per RGB channel (e.g. --{name} 0.5,0.5,0.5); got {value!r}"
        )
    low_open = name == "std"
    return tuple(float(_number(name, item, float, low=0.0, low_open=low_open)) for item in items)


def _optional_path(name, value):
    if value is None or value == "":
        return None
    return str(value)


def _text(name, value):
    if isinstance(value, int) and not isinstance(value, bool):  # Fire reads --data_dir 2024 as a number
        return str(value)
    if not isinstance(value, str):  # e.g. 1e3, which Fire reads as 1000.0: the text is lost
        raise UsageError(f"--{name} must be a text, got {value!r}; quote a name Fire reads as a value: "
                         f"--{name} \"'1e3'\"")
    if not value:
        raise UsageError(f"--{name} must be a non-empty text, got ''")
    return value


def _texts(name, value):
    if value in (None, ""):
        return ()
    return tuple(str(item).strip() for item in _items(value) if str(item).strip())


def _paths(name, value):
    """Fire hands `[a.jpg,b.png]` or `a.jpg,b.png` over as one string (names with dots are not literals to it):
    split it, as other lists, unless the whole text names an existing file or folder (a name with a comma)."""
    if value in (None, ""):
        return ()
    if isinstance(value, str) and not os.path.exists(value):
        value = _items(value)
    return tuple(str(item) for item in (value if isinstance(value, (list, tuple)) else [value]) if str(item))


def flag(default: Any, help: str, check: Callable, learned: bool = False):
    """A field of Config: `learned` flags change what a run learns, so a resumed run must keep them."""
    return field(default=default, metadata={"help": help, "check": check, "learned": learned})


# ---------------------------------------------------------------- the flags


@dataclass(frozen=True)
class Config:
    recipe: str | None = flag(
        None, "YAML file of flag values (configs/recipes/*.yaml); flags given on the command line win", _optional_path
    )
    # the seed's flags, same names and defaults
    load_model_path: str | None = flag(None, "weights to start from, or to evaluate when train=False", _optional_path)
    save: str = flag(
        "checkpoints/model_{time}.pth", "where the final weights go ({time}: start time; folders created)", _text
    )
    train: bool = flag(True, "False: only evaluate the weights of load_model_path on the test split", _bool)
    resize: tuple = flag(
        (70, 70), "resize images to this H,W before cropping (one number: a square)", _pair, learned=True
    )
    random_crop: tuple = flag(
        (64, 64), "crop fed to the network: random in training, centre in evaluation (>= 63)", _pair, learned=True
    )
    mean: tuple = flag(
        (0.5, 0.5, 0.5), "per-channel mean subtracted after scaling pixels to [0, 1]", _triple, learned=True
    )
    std: tuple = flag(
        (0.5, 0.5, 0.5), "per-channel standard deviation divided by after the mean", _triple, learned=True
    )
    batch_size: int = flag(
        256, "global images per optimizer step, whatever the number of processes", number(int, low=1), learned=True
    )
    val_size: float = flag(
        0.1,
        "fraction of the training images held out for validation, in [0, 1)",
        number(float, low=0.0, high=1.0, high_open=True),
        learned=True,
    )
    num_epochs: int = flag(25, "passes over the training split", number(int, low=0))
    device: str = flag(
        "auto", "auto (GPU if there is one), cpu (forces the CPU) or cuda", choice("auto", "cpu", "cuda")
    )
    cpu_threads: int | None = flag(
        None,
        "PyTorch threads per process on the CPU (default: OMP_NUM_THREADS, else every usable core; under accelerate "
        "launch, which sets OMP_NUM_THREADS=1 itself, the usable cores divided by the processes on the node)",
        optional_number(int, low=1),
    )
    log_freq: int = flag(50, "optimizer steps between logged training losses", number(int, low=1))
    logger: str = flag("wandb", "tracker: wandb, tensorboard or none", choice("wandb", "tensorboard", "none"))
    fraction_of_data: float = flag(
        1.0,
        "fraction of the training split used, drawn without replacement, in (0, 1]",
        number(float, low=0.0, high=1.0, low_open=True),
        learned=True,
    )
    # optimisation
    lr: float = flag(0.05, "peak learning rate of SGD", number(float, low=0.0, low_open=True), learned=True)
    momentum: float = flag(
        0.9, "SGD momentum (the paper's 0.9)", number(float, low=0.0, high=1.0, high_open=True), learned=True
    )
    weight_decay: float = flag(5e-4, "L2 weight decay (the paper's 5e-4)", number(float, low=0.0), learned=True)
    nesterov: bool = flag(True, "Nesterov momentum", _bool, learned=True)
    schedule: str = flag(
        "warmup_linear",
        "learning-rate schedule: warmup_linear, warmup_cosine, plateau or constant",
        choice("warmup_linear", "warmup_cosine", "plateau", "constant"),
        learned=True,
    )
    warmup_epochs: float = flag(
        1.0, "epochs of linear warm-up for the warmup_* schedules", number(float, low=0.0), learned=True
    )
    plateau_patience: int = flag(
        2,
        "plateau: epochs without a better validation accuracy (training accuracy if val_size is 0) before lr /= 10",
        number(int, low=0),
        learned=True,
    )
    label_smoothing: float = flag(
        0.1,
        "label smoothing of the cross-entropy loss, in [0, 1)",
        number(float, low=0.0, high=1.0, high_open=True),
        learned=True,
    )
    ema: float = flag(
        0.0,
        "decay of an exponential moving average of the weights, evaluated alongside (0: off)",
        number(float, low=0.0, high=1.0, high_open=True),
        learned=True,
    )
    dropout: float = flag(
        0.5,
        "dropout probability before the two hidden linear layers (the paper's 0.5)",
        number(float, low=0.0, high=1.0, high_open=True),
        learned=True,
    )
    first_linear_once: bool = flag(
        False,
        "where conv5 leaves a 1x1 map (crops up to 94): the first linear layer once per image in training too, "
        "with one dropout mask per feature instead of one per pooled copy (faster; a candidate recipe)",
        _bool,
        learned=True,
    )
    first_linear_scaled: bool = flag(
        False,
        "fc1 steps as a plain layer over conv5's outputs: its lr divided by, and its weight decay multiplied by, the "
        "number of pooled copies of each conv5 value (36 at crops up to 94), which otherwise multiply its step",
        _bool,
        learned=True,
    )
    conv1_from_data: bool = flag(
        False,
        "start conv1 from the training images: the leading eigenvectors of its 11x11x3 patches' covariance and their "
        "negatives, whitened and scaled to He's output variance (trainable; the other layers as --init says)",
        _bool,
    )  # like --init, only the start: a resumed run takes its weights from the checkpoint
    seed: int = flag(
        0,
        "seed of the split, the initial weights, the data order and the augmentation",
        number(int, low=0, high=2**32 - 1),
        learned=True,
    )
    grad_accum_steps: int = flag(
        1, "micro-batches accumulated per optimizer step (the global batch stays batch_size)", number(int, low=1)
    )
    mixed_precision: str = flag(
        "auto",
        "auto (bf16 on GPUs and CPUs that have it, else fp16 on GPUs, none on CPUs), no, fp16 or bf16",
        choice("auto", "no", "fp16", "bf16"),
    )
    # not "learned": like mixed_precision it only rounds the numbers (here the averaged gradients), so a resume
    # may change it
    ddp_comm_hook: str = flag(
        "none",
        "round gradients to 16 bits for the all-reduce between processes, halving its bytes: none, "
        "fp16 (finer, overflows above 65504) or bf16 (fp32's range); no effect on one process",
        choice("none", "fp16", "bf16", lower=True),
    )
    # data
    dataset: str = flag(
        "cifar10",
        "cifar10 (downloaded into data_dir), folder (data_dir/train/<class>/*) or fake",
        choice("cifar10", "folder", "fake"),
        learned=True,
    )
    data_dir: str = flag("data", "where the data set lives", _text, learned=True)
    cache_dir: str | None = flag(
        None,
        "decoded-image cache of dataset=folder (default: data_dir/.alexnet_dist_cache; none: off)",
        _optional_path,
    )
    flip: bool | str = flag(
        True,
        "horizontal flips in training (the paper's reflections): True (a fresh coin per image each epoch), "
        "alternate (a coin per image once, then that image mirrored every other epoch, as airbench does) or False",
        _flip,
        learned=True,
    )
    translate: int = flag(
        8,
        "extra random shift in pixels beyond the resize-crop margin, borders mirrored",
        number(int, low=0),
        learned=True,
    )
    pca_color: float = flag(
        0.0,
        "std of the paper's PCA colour noise per image (the paper's 0.1; 0: off)",
        number(float, low=0.0),
        learned=True,
    )
    cutout: int = flag(
        0,
        "side of a random square set to the mean colour in each training crop (0: off)",
        number(int, low=0),
        learned=True,
    )
    tta: str = flag(
        "ten",
        "test-time views of the final evaluation, softmax averaged: none (centre crop), flip (centre + "
        "mirror) or ten (the paper's corners and centre, mirrored)",
        choice("none", "flip", "ten"),
    )
    loader: str = flag(
        "auto",
        "auto, device (whole split on the device, augmented there) or stream (DataLoader workers)",
        choice("auto", "device", "stream"),
    )
    num_workers: int | None = flag(
        None,
        "DataLoader workers of the stream loader and of image decoding (default: one per usable core, at most 8)",
        optional_number(int, low=0),
    )
    # checkpoints
    resume: str | None = flag(
        None, "continue a run: latest (newest checkpoint of run_dir, else of the newest run) or a path", _optional_path
    )
    checkpoint_minutes: float = flag(
        10.0,
        "save the full training state when this many minutes passed since the last save "
        "(also at the end and on a stop signal; 0: at every epoch end)",
        number(float, low=0.0),
    )
    checkpoint_steps: int = flag(
        0, "also save a checkpoint every this many optimizer steps (0: off)", number(int, low=0)
    )
    keep_checkpoints: int = flag(
        1, "newest checkpoints kept, besides the best one by validation accuracy", number(int, low=1)
    )
    allow_config_change: bool = flag(
        False,
        "resume although flags that change what is learned differ; still refused: another groups, class list, "
        "number of training images or schedule, and ema switched on or off",
        _bool,
    )
    skip_nonfinite: bool = flag(
        False, "skip optimizer steps whose loss is not finite instead of stopping the run", _bool
    )
    # predictions
    predict: tuple = flag((), "image files or folders to classify with load_model_path (instead of training)", _paths)
    top_k: int = flag(3, "predict: how many classes to list per image", number(int, low=1))
    predict_json: str | None = flag(None, "predict: also write the predictions to this JSON file", _optional_path)
    # model
    groups: int = flag(
        1,
        "1: one column (the seed project's widths); 2: the paper's two-column network",
        lambda name, value: int(choice("1", "2")(name, value)),
        learned=True,
    )
    parallel: str = flag(
        "data",
        "how processes share the work: data (each trains a whole copy, gradients all-reduced: DDP), columns (the "
        "paper's split: each process of a pair holds one column of --groups 2, pairs data-parallel) or hybrid "
        "(Krizhevsky 2014: convolutions data-parallel, fc1 and fc2 cut over every process)",
        choice("data", "columns", "hybrid"),
    )
    lrn_alpha: float = flag(
        1e-4,
        "alpha of the local response normalisation after conv1 and conv2 (the paper's 1e-4, set for 0-255 pixels)",
        number(float, low=0.0),
        learned=True,
    )
    compile: str = flag(
        "false",
        "torch.compile the model: false, true (default mode), max-autotune, or reduce-overhead "
        "(with torch.compile's own CUDA graphs)",
        choice("false", "true", "max-autotune", "reduce-overhead", lower=True),
    )
    cuda_graphs: str = flag(
        "false",
        "record each training step as one CUDA graph: false (until measured on a GPU), true, "
        "or auto (one GPU, no accumulation, not fp16, not streamed)",
        choice("false", "true", "auto", lower=True),
    )
    init: str = flag(
        "kaiming",
        "initial weights: kaiming (He et al. 2015), pytorch (PyTorch's default) or paper (N(0, 0.01), some biases 1)",
        choice("kaiming", "pytorch", "paper"),
    )
    # tracking and outputs
    project: str = flag("alexnet-cifar10", "tracker project (W&B project, TensorBoard folder)", _text)
    run_name: str | None = flag(None, "name of the run (default: the run directory's name)", _optional_path)
    tags: tuple = flag((), "W&B tags, e.g. --tags baseline,bf16", _texts)
    run_dir: str | None = flag(
        None,
        "this run's folder (default: runs/<time>_<run_name or alexnet>); must be new, unless --resume latest "
        "continues the run in it",
        _optional_path,
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_flags(cls, flags: dict, base: dict | None = None) -> "Config":
        """Defaults, overridden by `base` (a recipe), overridden by `flags`; validated."""
        values = {}
        for source in (base or {}, flags):
            unknown = sorted(set(source) - set(FIELDS))
            if unknown:
                close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
                hint = f"did you mean --{close[0]}?" if close else "run with --help for the list of flags"
                raise UsageError(f"unknown flag --{unknown[0]} ({hint})")
            values.update(source)
        config = cls(**{name: FIELDS[name].metadata["check"](name, value) for name, value in values.items()})
        config.check_combinations()
        return config

    def check_combinations(self):
        for axis in range(2):
            if self.random_crop[axis] > self.resize[axis]:
                raise UsageError(
                    f"--random_crop {_size(self.random_crop)} is larger than --resize {_size(self.resize)}: "
                    "the crop must fit inside the resized image"
                )
        if self.train and self.num_epochs < 1:
            raise UsageError(f"--num_epochs must be at least 1 when training, got {self.num_epochs}")
        if self.translate >= min(self.resize):
            raise UsageError(
                f"--translate must be smaller than the resized image ({min(self.resize)}), got {self.translate}"
            )
        if self.first_linear_once and max(self.random_crop) > MAX_SINGLE_POSITION:
            raise UsageError(
                f"--first_linear_once needs crops of at most {MAX_SINGLE_POSITION} pixels (where conv5 leaves a 1x1 "
                f"map), got --random_crop {_size(self.random_crop)}"
            )
        from .layouts import check_flags  # here: the layouts import this module

        check_flags(self)  # what --parallel's layout cannot run with, whatever the launch
        if self.cutout > min(self.random_crop):
            raise UsageError(f"--cutout must be at most the crop ({min(self.random_crop)}), got {self.cutout}")
        try:
            self.save.format(time="x")
        except (KeyError, IndexError, ValueError, AttributeError):  # AttributeError: {time.year}
            raise UsageError(f"--save {self.save!r}: the only placeholder allowed is {{time}}") from None
        if self.nesterov and self.momentum == 0:
            raise UsageError("--nesterov needs a momentum above 0 (--momentum), or pass --nesterov=False")
        if self.predict and self.load_model_path is None:
            raise UsageError("--predict classifies images with saved weights: give them with --load_model_path")
        if not self.train and self.load_model_path is None:
            raise UsageError("--train=False evaluates saved weights: give them with --load_model_path")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
DEFAULTS = {name: f.default for name, f in FIELDS.items()}
# flags that change what a run learns: a resumed run must keep them (or pass --allow_config_change)
WHAT_IS_LEARNED = tuple(name for name, f in FIELDS.items() if f.metadata["learned"])
# and these too under the warmup_* schedules, which decay towards the last epoch
KEPT_UNDER_WARMUP = ("num_epochs",)


def help_text() -> str:
    """--help: every flag with its default and meaning, what is learned first."""
    return (
        "Train AlexNet on CIFAR-10 (or an image folder) with Accelerate.\n"
        "usage: accelerate launch launch/train.py [--flag value ...]   (or python / torchrun)\n\n" + flag_lines()
    )


def flag_lines() -> str:
    """Every flag with its default and meaning, in two groups: what a resumed run must keep, then the rest."""

    def line(name):
        default = DEFAULTS[name]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) and default else default
        return f"  --{name} (default {shown}): {FIELDS[name].metadata['help']}"

    how = [name for name in FIELDS if name not in WHAT_IS_LEARNED]
    return "\n".join(
        [
            "What is learned (a resumed run keeps these):",
            *map(line, WHAT_IS_LEARNED),
            "",
            "How the run executes, evaluates and reports:",
            *map(line, how),
        ]
    ) + "\n"


def load_recipe(path) -> dict:
    """Flag values from a recipe file (YAML mapping of flag names to values)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"--recipe {path} cannot be read ({error.strerror})") from None
    except yaml.YAMLError:
        raise UsageError(f"--recipe {path} is not valid YAML") from None
    if not isinstance(values, dict):
        raise UsageError(f"--recipe {path} must map flag names to values")
    unknown = sorted(set(values) - set(FIELDS) - {"recipe"})
    if unknown:
        raise UsageError(f"--recipe {path} sets an unknown flag: {unknown[0]}")
    return {**values, "recipe": str(path)}


def from_fire(given: dict, **fixed) -> Config:
    """The Config of the keyword arguments Fire parsed (it reads a bare --noflip as noflip=True) over the values of
    their --recipe file; `fixed`: values that override both (the benchmark's)."""
    given = dict(given)
    for name in list(given):
        if name.startswith("no") and name[2:] in FIELDS and given[name] is True:
            given[name[2:]] = False
            del given[name]
    recipe = load_recipe(given["recipe"]) if given.get("recipe") else None
    return Config.from_flags({**given, **fixed}, base=recipe)


def learning_changes(saved: dict, cfg: Config) -> list:
    """'name: old -> new' for every flag of WHAT_IS_LEARNED that differs from a saved configuration (a flag newer
    than the checkpoint counts as its default: new flags default to what the code did before them)."""
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    names = list(WHAT_IS_LEARNED) + (list(KEPT_UNDER_WARMUP) if cfg.schedule.startswith("warmup") else [])
    saved = {**DEFAULTS, **saved}
    return [
        f"{name}: {plain(saved[name])!r} -> {plain(getattr(cfg, name))!r}"
        for name in names
        if plain(saved[name]) != plain(getattr(cfg, name))
    ]
