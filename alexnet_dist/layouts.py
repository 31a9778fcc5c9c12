"""How the network is spread over a launch's processes: one object, chosen here, that the rest of the code asks,
never the flag's string (docs/distributed.md).

    layout = choose_layout(cfg, num_processes)  # data, columns or hybrid; UsageError if the launch does not fit
    layout.replicas, layout.unit                # the copies of the network that train side by side on other images
    layout.shard(process_index)                 # (this process's share of a batch, of how many, does its evaluation
                                                #  count)
    model, optimizer = layout.place(model, cfg, accelerator)  # prepared for the launch, --ddp_comm_hook included
    layout.whole_model(model)                   # the ordinary network, for weights files (a collective where cut)
    layout.traffic.bytes                        # what its exchanges of activations sent (the benchmark reads it)
    layout.note(micro_batch)                    # what the batch breakdown's line adds

Weights files and checkpoints are the ordinary network's under every layout, so they cross between them. A new
layout is one file with such a class and one entry in LAYOUTS.
"""

from typing import Protocol

from .columns import Columns
from .config import UsageError
from .engine import build_optimizer
from .hybrid import Hybrid
from .sharded import Traffic


class Layout(Protocol):
    replicas: int   # copies of the network that train on different images (a process, a pair of columns)
    unit: str       # what one copy is, in the batch breakdown and its error
    predicts: bool  # whether --predict (the whole network on the main process alone) may run under it
    traffic: Traffic

    @staticmethod
    def check_flags(cfg) -> None: ...  # UsageError for flags it cannot run with, whatever the launch

    def shard(self, process_index: int) -> tuple: ...

    def place(self, model, cfg, accelerator, optimizer: bool = True) -> tuple: ...

    def whole_model(self, model): ...

    def note(self, micro_batch: int) -> str: ...


class Data:
    """--parallel data: every process trains a whole copy on its share of the batch, and Accelerate's DDP all-reduces
    the gradients (--ddp_comm_hook: Accelerate registers the hook)."""

    unit = "process(es)"
    predicts = True
    traffic = Traffic()  # no activations are exchanged

    def __init__(self, num_processes: int):
        self.replicas = num_processes

    @staticmethod
    def check_flags(cfg):
        """Every flag runs data-parallel."""

    def shard(self, process_index: int) -> tuple:
        return process_index, self.replicas, True

    def place(self, model, cfg, accelerator, optimizer: bool = True) -> tuple:
        if not optimizer:
            return accelerator.prepare(model), None
        return accelerator.prepare(model, build_optimizer(model, cfg))

    def whole_model(self, model):
        return model

    def note(self, micro_batch: int) -> str:
        return ""


LAYOUTS = {"data": Data, "columns": Columns, "hybrid": Hybrid}


def check_flags(cfg):
    """The chosen layout's checks of the flags alone (Config.check_combinations runs them)."""
    layout = LAYOUTS[cfg.parallel]
    if cfg.predict and not layout.predicts:  # one image at a time keeps no second process busy
        raise UsageError(f"--predict runs the whole network on the main process: drop --parallel {cfg.parallel} "
                         "(weights trained with any layout predict the same)")
    layout.check_flags(cfg)


def choose_layout(cfg, num_processes: int) -> Layout:
    """The layout of `cfg` on a launch of `num_processes` (UsageError where it cannot use them)."""
    return LAYOUTS[cfg.parallel](num_processes)
