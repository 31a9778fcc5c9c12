"""Command line of alexnet-dist: flags -> Config -> training, or evaluation of saved weights.

    accelerate launch launch/train.py --num_epochs 25       # any Accelerate setup, or none
    python launch/train.py --dataset fake --num_epochs 1 --logger none
    python launch/train.py --train=False --load_model_path checkpoints/model_X.pth
    alexnet-dist-train --help                                 # every flag with its meaning
"""

import os
import sys

import fire
import torch

from .clock import clock
from .config import Config, UsageError, from_fire, help_text
from .predict import predict
from .preflight import preflight
from .run import Run
from .runtime import RunStopped, build_accelerator, start_processes
from .training import build_trainer, evaluate_saved, train


def read_flags(argv: list, name: str, usage: str) -> dict:
    """The flags as Fire reads them (`--resize 70,70`, `--resize=[70,70]`, `--resize 70`, `--noflip`), unchecked;
    --help (anywhere) prints `usage` and exits."""
    if "--help" in argv or "-h" in argv:
        print(usage, end="")
        sys.exit(0)
    given = {}

    def command(*arguments, **flags):
        if arguments:
            raise UsageError(
                f"unexpected argument {arguments[0]} (flags look like --name value; run with --help for the list)"
            )
        given.update(flags)

    fire.Fire(command, command=argv, name=name)
    return given


def parse_flags(argv: list) -> Config:
    """The command line of launch/train.py -> a validated Config."""
    return from_fire(read_flags(argv, "train.py", help_text()))


def run(cfg: Config):
    """Train (or only evaluate, or predict) as `cfg` says; returns the unwrapped model, on every rank."""
    state = start_processes(cfg)
    if state.device.type == "cuda":
        clock.synchronize = torch.cuda.synchronize  # device work is counted in the part that launched it
    with clock.part("data"):
        plan = preflight(cfg, state)
    log_with = None if cfg.logger == "none" or not plan.cfg.train or plan.cfg.predict else cfg.logger
    accelerator = build_accelerator(plan.cfg, log_with=log_with, project_dir=plan.run_dir)
    if plan.cfg.predict:
        result = predict(plan, accelerator)
    elif not plan.cfg.train:
        result = evaluate_saved(plan, accelerator)
    else:
        trainer = build_trainer(
            plan.cfg, accelerator, plan.data.train, len(plan.data.classes), plan.micro_batch, plan.graphs, plan.weights
        )
        with Run(plan, accelerator, trainer) as session:
            clock.begin("other")  # the start-up ends here
            train(trainer, session)
            result = session.finish()  # raises RunStopped after a stop signal or a non-finite loss
    accelerator.end_training()  # the trackers' last writes; the process group goes down on every rank
    return result


def leave(message: str, code: int, agreed: bool):
    """Exit with `code`. The process group is taken down here, not by the interpreter at exit: there gloo's threads
    outlive their owner, and a rank that exits while its peer still holds a connection dies of SIGABRT
    ("terminate called without an active exception") instead of exiting with `code`. After an error every rank
    agreed on, they first meet in a barrier; after one raised by this rank alone, the others learn of it at their
    next collective (the connection is gone) instead of waiting for ever."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    if torch.distributed.is_initialized():
        if agreed:
            torch.distributed.barrier()  # every rank has left its last collective
        torch.distributed.destroy_process_group()
    sys.exit(code)


def main(argv: list | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(parse_flags(argv))
    except UsageError as error:
        leave(f"error: {error}", 2, getattr(error, "agreed", False))
    except RunStopped as stopped:
        leave(str(stopped), stopped.code, stopped.agreed)
    except KeyboardInterrupt:  # a second Ctrl-C, or one during the final report: no step, save or barrier more
        if os.environ.get("RANK", "0") == "0":
            print("stopped at once by Ctrl-C; what was saved before it stays (checkpoints, final weights)",
                  file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # not the interpreter's exit: a peer may be mid-collective, and gloo would abort this rank


if __name__ == "__main__":
    main()
