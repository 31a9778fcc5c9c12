"""--parallel columns: the paper's two GPUs, literally. Each process of a pair holds one column of the two-column
AlexNet (--groups 2), and the pair talks only where Krizhevsky et al.'s GPUs did.

    torchrun --nproc_per_node 2 launch/train.py --parallel columns --groups 2

The paper put half the kernels of every layer, and half the neurons of every fully connected layer, on each GPU.
Four exchanges of activations join the columns, and nothing else passes between them:
  - conv3 reads both columns' pooled conv2 maps;
  - fc1 reads both columns' conv5 outputs: their maps travel (128 values an image and column at crops up to 94), and
    each column pools them to fc1's input and drops the other column's half with the mask that column's seed draws,
    so the pair agrees on one mask per pooled copy without the 36 copies travelling (sharded.Sharded.fc1_input);
  - fc2 reads both halves of fc1;
  - the logits are the sum of both halves' contributions (fc3 split by its inputs).
conv1, conv2, conv4 and conv5 read only their own column. With 2k processes the k pairs train data-parallel: each
column's gradients are all-reduced among the k processes that hold that column (never between columns).

The rest of the code sees an ordinary network: each process's column is cut out of the whole two-column model (so
both layouts start from the same weights), and the column's and its optimizer's state_dicts are the whole network's
(gathered from the pair on save, split again on load: sharded.py). Checkpoints and weights files therefore move
between `--parallel columns` and one process with `--groups 2` in both directions.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from .config import UsageError
from .model import AlexNet, Classifier, ColumnNorm, column_stages, layer_name
from .sharded import FIRST, TRAFFIC, Sharded, Shards, SplitLayout, gather_batch, own_layer

COLUMNS = 2
LOGITS_BIAS = f"{layer_name('fc3')}.bias"


class Columns(SplitLayout):
    """--parallel columns: a pair of processes per copy of the network, one column each; the pairs data-parallel."""

    unit = "pair(s) of column processes"

    def __init__(self, num_processes: int):
        if num_processes % COLUMNS:
            raise UsageError(
                f"--parallel columns puts the two columns on a pair of processes: launch an even number of processes, "
                f"got {num_processes}"
            )
        self.replicas = num_processes // COLUMNS

    @staticmethod
    def check_flags(cfg):
        if cfg.groups != COLUMNS:
            raise UsageError("--parallel columns splits the paper's two-column network over a pair of processes: "
                             "add --groups 2")

    def shard(self, process_index: int) -> tuple:
        """Both processes of a pair take the same images; only column 0's predictions are counted, so each image is
        counted once. Ranks are laid out as the device mesh lays them: rank = pair * 2 + column."""
        return process_index // COLUMNS, self.replicas, process_index % COLUMNS == 0

    def note(self, micro_batch: int) -> str:
        return ""

    def split(self, model: AlexNet, device_type: str) -> tuple:
        """This process's column; with several pairs, DDP all-reduces each column's gradients among the processes
        that hold that column (never between columns)."""
        world = dist.get_world_size()
        mesh = init_device_mesh(device_type, (world // COLUMNS, COLUMNS), mesh_dim_names=("data", "column"))
        shards = Shards(mesh.get_local_rank("column"), COLUMNS, mesh.get_group("column"), cut_by_columns)
        return Column(model, shards), mesh.get_group("data"), ()


def cut_by_columns(name: str):
    """Every parameter is cut into columns along its outputs, except fc3's: its weight along its inputs (each column
    holds the weights that read its half of fc2), and its bias is held by column 0 alone, so that the logits add it
    once (column 1 keeps a frozen zero of its shape, so that both columns have the same parameters, in the whole
    network's order, and no gradient reaches it)."""
    if name == LOGITS_BIAS:
        return FIRST
    return 1 if name == f"{layer_name('fc3')}.weight" else 0


def gather(part: torch.Tensor, group) -> torch.Tensor:
    """Both columns' `part`, column 0's first, along the channels: what the next layer reads. Backward, each column
    gets the sum of both processes' gradients for its part (sharded.gather_batch)."""
    return torch.cat(gather_batch(part, group).chunk(COLUMNS), dim=1)


class SumOverPair(torch.autograd.Function):
    """The logits, the sum of both columns' parts. Backward passes the loss's gradient on as it is: every process
    of the pair computes the same loss from the same logits, so that gradient is already each part's. (An autograd
    all_reduce would add the pair's two equal gradients: twice the true one.)"""

    @staticmethod
    def forward(ctx, part, group):
        total = part.clone()
        dist.all_reduce(total, group=group)
        TRAFFIC.add(part, COLUMNS - 1)
        return total

    @staticmethod
    def backward(ctx, gradient):
        return gradient, None


def _column_part(layer: nn.Module, name: str, shards: Shards) -> nn.Module:
    if isinstance(layer, ColumnNorm):
        return ColumnNorm(1, layer.alpha)  # within the column, as in the whole network
    return own_layer(layer, name, shards)


class Column(Sharded):
    """One column of the two-column AlexNet; the pair's other process holds the other."""

    joins = 1  # the columns' channels

    def __init__(self, whole: AlexNet, shards: Shards):
        super().__init__(whole, shards, _column_part)

    def join(self, part: torch.Tensor) -> torch.Tensor:
        return gather(part, self.shards.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.shards.group
        own_maps, shared_maps = column_stages(self.features)
        x = own_maps(x)  # conv1 and conv2, normalised and pooled: this column's maps
        x = gather(x, group)  # conv3 reads both columns' maps
        x = shared_maps(x)  # conv3 (this column's half of its kernels), conv4, conv5, pooled
        head = Classifier(*self.classifier)
        x = self.first_linear(x)  # fc1 reads both columns (sharded.py): this column's half of its neurons
        x = head.fc2(gather(head.dropout2(head.relu1(x)), group))  # fc2 reads both halves of fc1
        return SumOverPair.apply(head.fc3(head.relu2(x)), group)  # the logits: both halves' contributions
