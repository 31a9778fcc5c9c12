"""Command line of alexnet-dist: flags -> Config -> training, or evaluation of saved weights.

    accelerate launch launch/train.py --num_epochs 25       # any Accelerate setup, or none
    python launch/train.py --dataset fake --num_epochs 1 --logger none
    python launch/train.py --train=False --load_model_path checkpoints/model_X.pth
    alexnet-dist-train --help                                 # every flag with its meaning
"""

import dataclasses
import os
import sys

import fire
import torch
from accelerate.utils import set_seed

from .checkpoint import load_weights, read_weights
from .config import FIELDS, Config, UsageError, help_text, load_recipe
from .data import load_data, pixel_sample
from .engine import evaluate, use_cuda_graphs
from .loaders import make_loader, streams
from .model import alexnet
from .predict import predict
from .runtime import RunStopped, agree, build_accelerator, micro_batch_size
from .tracking import check_logger
from .training import print_accuracy, train
from .transforms import Augmentation, colour_pca


def parse_flags(argv: list) -> Config:
    """Flags as Fire reads them (`--resize 70,70`, `--resize=[70,70]`, `--resize 70`, `--noflip`) -> a validated Config."""
    if "--help" in argv or "-h" in argv:
        print(help_text(), end="")
        sys.exit(0)
    given = {}

    def train(*arguments, **flags):
        if arguments:
            raise UsageError(f"unexpected argument {arguments[0]} (flags look like --name value; run with --help for the list)")
        given.update(flags)

    fire.Fire(train, command=argv, name="train.py")
    for name in list(given):  # Fire reads a bare --noflip as noflip=True
        if name.startswith("no") and name[2:] in FIELDS and given[name] is True:
            given[name[2:]] = False
            del given[name]
    recipe = load_recipe(given["recipe"]) if given.get("recipe") else None
    return Config.from_flags(given, base=recipe)


def _colour_basis(cfg, data):
    if cfg.pca_color == 0:
        return None
    return colour_pca(pixel_sample(data.train, cfg.resize))


def seed_dropout(seed: int, rank: int):
    """Every rank drew the same initial weights from `seed`; from here on each rank draws its own dropout
    masks (a stream of its own, from seed and rank), while the data plan keeps its own seeded generator."""
    torch.manual_seed(seed * 65_536 + rank + 1)


def with_weights_settings(cfg: Config) -> Config:
    """Evaluation and predictions use the network and preprocessing the weights were trained with."""
    payload = read_weights(cfg.load_model_path)
    trained = {key: payload["config"][key] for key in ("resize", "random_crop", "mean", "std")
               if payload["config"] and key in payload["config"]}
    settings = {key: tuple(value) for key, value in trained.items()}
    return dataclasses.replace(cfg, groups=payload["architecture"]["groups"], **settings)


def run(cfg: Config):
    """Train (or only evaluate, or predict) as `cfg` says; returns the unwrapped model, on every rank."""
    if not cfg.train or cfg.predict:
        cfg = with_weights_settings(cfg)
    if cfg.predict:
        accelerator = build_accelerator(cfg)
        return agree(accelerator, lambda: predict(cfg, accelerator))
    if cfg.train:
        check_logger(cfg.logger)
    accelerator = build_accelerator(cfg, log_with=None if cfg.logger == "none" or not cfg.train else cfg.logger,
                                    project_dir="runs")
    micro_batch = micro_batch_size(cfg.batch_size, accelerator.num_processes, cfg.grad_accum_steps)
    set_seed(cfg.seed)
    data = load_data(cfg, accelerator)
    graphs = cfg.train and use_cuda_graphs(cfg, accelerator, streaming=streams(data.train, cfg))
    model = alexnet(num_classes=len(data.classes), groups=cfg.groups, dropout=cfg.dropout, init=cfg.init)
    seed_dropout(cfg.seed, accelerator.process_index)
    if cfg.load_model_path:
        agree(accelerator, lambda: load_weights(model, cfg.load_model_path))
        accelerator.print(f"loaded weights from {cfg.load_model_path}"
                          + ("" if cfg.train else f" (groups {cfg.groups}, resize {cfg.resize}, crop {cfg.random_crop}, "
                                                  f"mean {cfg.mean}, std {cfg.std}, as trained)"))
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    augmentation = Augmentation(cfg.random_crop, cfg.mean, cfg.std, accelerator.device, _colour_basis(cfg, data),
                                cfg.cutout, channels_last=on_gpu)
    loader = lambda imageset: make_loader(imageset, augmentation, accelerator.device, cfg, micro_batch,
                                          accelerator.process_index, accelerator.num_processes)
    eval_batch = 2 * micro_batch
    if cfg.train:
        return train(cfg, accelerator, data, model, loader, eval_batch, graphs)

    model = accelerator.prepare(model)
    split_name, imageset = ("test", data.test) if data.test is not None else ("validation", data.val)
    if imageset is None:
        raise UsageError(f"{cfg.data_dir} has no test split and --val_size 0 leaves nothing to evaluate on")
    if data.test is None:
        accelerator.print(f"{data.test_note.split(':')[0]}: evaluating on the validation split instead")
    confusion = evaluate(model, loader(imageset), accelerator, len(data.classes), eval_batch, (cfg.tta,))[cfg.tta]
    print_accuracy(accelerator.print, f"{split_name} (tta {cfg.tta})", confusion, data.classes)
    return accelerator.unwrap_model(model)


def main(argv: list | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(parse_flags(argv))
    except UsageError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(stopped, file=sys.stderr)
        sys.exit(stopped.code)


if __name__ == "__main__":
    main()
