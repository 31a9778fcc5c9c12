"""--parallel columns: the paper's two GPUs, literally. Each process of a pair holds one column of the two-column
AlexNet (--groups 2), and the pair talks only where Krizhevsky et al.'s GPUs did.

    torchrun --nproc_per_node 2 launch/train.py --parallel columns --groups 2

The paper put half the kernels of every layer, and half the neurons of every fully connected layer, on each GPU.
Four exchanges of activations join the columns, and nothing else passes between them:
  - conv3 reads both columns' pooled conv2 maps;
  - fc1 reads both columns' conv5 outputs;
  - fc2 reads both halves of fc1;
  - the logits are the sum of both halves' contributions (fc3 split by its inputs).
conv1, conv2, conv4 and conv5 read only their own column. With 2k processes the k pairs train data-parallel: each
column's gradients are all-reduced among the k processes that hold that column (never between columns).

The rest of the code sees an ordinary network: `split` cuts a process's column out of the whole two-column model
(so both layouts start from the same weights), and the column's and its optimizer's state_dicts are the whole
network's (gathered from the pair on save, split again on load). Checkpoints and weights files therefore move
between `--parallel columns` and one process with `--groups 2` in both directions.
"""

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.device_mesh import init_device_mesh

from .config import UsageError
from .model import AlexNet, Classifier, ColumnNorm, column_stages, fold_positions, folds, layer_name

COLUMNS = 2
# torch 2.14 renamed the one-tensor collectives (the old names warn); older versions have only the old names
GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
# held by column 0 alone, so that the logits add it once; column 1 keeps a frozen zero of its shape, so that both
# columns have the same parameters (in the whole network's order) and no gradient reaches it
LOGITS_BIAS = f"{layer_name('fc3')}.bias"


def replicas(parallel: str, num_processes: int) -> int:
    """How many copies of the network train side by side: every process (data), or every pair (columns)."""
    if parallel == "data":
        return num_processes
    if num_processes % COLUMNS:
        raise UsageError(
            f"--parallel columns puts the two columns on a pair of processes: launch an even number of processes, "
            f"got {num_processes}"
        )
    return num_processes // COLUMNS


def data_shard(parallel: str, process_index: int, num_processes: int) -> tuple:
    """(which share of each batch this process takes, how many shares, whether its evaluation counts). Both
    processes of a pair take the same images; only column 0's predictions are counted, so each image is counted
    once. Ranks are laid out as the device mesh lays them: rank = pair * 2 + column."""
    if parallel == "data":
        return process_index, num_processes, True
    return process_index // COLUMNS, replicas(parallel, num_processes), process_index % COLUMNS == 0


@dataclass(frozen=True)
class Pair:
    """This process's place: its column, and the process groups of its pair and of its column's replicas."""
    column: int
    pair_group: object       # the two processes of this pair: the activations' exchanges
    replica_group: object    # the processes holding the same column: the gradients' all-reduce

    def __deepcopy__(self, memo):  # process groups are handles, not values
        return self


def pair_up(device_type: str) -> Pair:
    """The device mesh (pairs x columns) of this launch; every process calls it once."""
    world = dist.get_world_size()
    mesh = init_device_mesh(device_type, (world // COLUMNS, COLUMNS), mesh_dim_names=("data", "column"))
    return Pair(mesh.get_local_rank("column"), mesh.get_group("column"), mesh.get_group("data"))


class Traffic:
    """Bytes this process hands to the pair's exchanges: its part of each gathered activation (forward), the peer's
    part of that activation's gradient (backward), its part of the logits. The benchmark reads and resets it."""

    bytes = 0

    @classmethod
    def add(cls, tensor: torch.Tensor):
        cls.bytes += tensor.numel() * tensor.element_size()


class GatherColumns(torch.autograd.Function):
    """Both columns' `part`, column 0's first, along the channels: what the next layer reads. Backward, each column
    gets the sum of both processes' gradients for its part (a reduce-scatter): each process's next layer computes
    different outputs (its own column's) from the same gathered input, so the two gradients are parts of one.
    (torch.distributed.nn's all_gather does the same, but on gloo its backward takes group ranks for global ones
    and fails in every pair but the first.)"""

    @staticmethod
    def forward(ctx, part, group):
        ctx.group = group
        parts = part.new_empty((COLUMNS * part.shape[0], *part.shape[1:]))  # the columns one after the other
        GATHER(parts, part.contiguous(), group=group)
        Traffic.add(part)
        return torch.cat(parts.chunk(COLUMNS), dim=1)

    @staticmethod
    def backward(ctx, gradient):
        by_column = torch.cat(gradient.chunk(COLUMNS, dim=1))  # column 0's part of each image, then column 1's
        own = by_column.new_empty((by_column.shape[0] // COLUMNS, *by_column.shape[1:]))
        REDUCE_SCATTER(own, by_column, group=ctx.group)
        Traffic.add(own)  # the peer's part, as much as this process receives
        return own, None


def gather(part: torch.Tensor, group) -> torch.Tensor:
    return GatherColumns.apply(part, group)


class SumOverPair(torch.autograd.Function):
    """The logits, the sum of both columns' parts. Backward passes the loss's gradient on as it is: every process
    of the pair computes the same loss from the same logits, so that gradient is already each part's. (An autograd
    all_reduce would add the pair's two equal gradients: twice the true one.)"""

    @staticmethod
    def forward(ctx, part, group):
        total = part.clone()
        dist.all_reduce(total, group=group)
        Traffic.add(part)
        return total

    @staticmethod
    def backward(ctx, gradient):
        return gradient, None


def split_dim(name: str) -> int:
    """The dimension along which a parameter of the whole network is cut into columns: the outputs, except for
    fc3, which is cut along its inputs (each column holds the weights that read its half of fc2)."""
    return 1 if name == f"{layer_name('fc3')}.weight" else 0


def split_state(whole: dict, column: int) -> dict:
    """A column's share of the whole network's state_dict."""
    return {
        name: (tensor if column == 0 else torch.zeros_like(tensor)) if name == LOGITS_BIAS
        else tensor.chunk(COLUMNS, dim=split_dim(name))[column].clone()
        for name, tensor in whole.items()
    }


def gather_state(own: dict, group) -> dict:
    """The whole network's state_dict from both columns' (a collective of the pair: both call it)."""
    whole = {}
    for name, tensor in own.items():
        parts = [torch.empty_like(tensor) for _ in range(COLUMNS)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        whole[name] = parts[0] if name == LOGITS_BIAS else torch.cat(parts, dim=split_dim(name))
    return whole


def _own_part(layer: nn.Module, column: int, name: str) -> nn.Module:
    """The column's share of the whole network's layer `name` (its weights copied)."""
    if isinstance(layer, (nn.Conv2d, nn.Linear)):
        whole = {f"{name}.{key}": tensor.detach() for key, tensor in layer.state_dict().items()}
        own = {key.rsplit(".", 1)[1]: tensor for key, tensor in split_state(whole, column).items()}
        outputs, inputs = own["weight"].shape[:2]  # a grouped conv's weight is already (outputs, own inputs, ...)
        if isinstance(layer, nn.Conv2d):
            part = nn.Conv2d(inputs, outputs, layer.kernel_size, layer.stride, layer.padding)
        else:
            part = nn.Linear(inputs, outputs)
        part.load_state_dict(own)
        if f"{name}.bias" == LOGITS_BIAS and column != 0:
            part.bias.requires_grad_(False)
        return part
    if isinstance(layer, ColumnNorm):
        return ColumnNorm(1, layer.alpha)  # within the column, as in the whole network
    return copy.deepcopy(layer)


class Column(nn.Module):
    """One column of the two-column AlexNet; the pair's other process holds the other. Parameter names are the
    whole network's, and state_dict / load_state_dict speak the whole network's state (collectives of the pair)."""

    def __init__(self, whole: AlexNet, pair: Pair):
        super().__init__()
        self.pair, self.first_linear_once = pair, whole.first_linear_once
        self.features = nn.Sequential(*(_own_part(layer, pair.column, f"features.{index}")
                                        for index, layer in enumerate(whole.features)))
        self.avgpool = copy.deepcopy(whole.avgpool)
        self.classifier = nn.Sequential(*(_own_part(layer, pair.column, f"classifier.{index}")
                                          for index, layer in enumerate(whole.classifier)))
        self.whole_shape = whole.settings
        # hooks rather than overrides, so that they act wherever the column sits: in DDP, in the weights' average
        self.entries = list(super().state_dict().keys())
        self.register_state_dict_post_hook(_gather_on_save)
        self.register_load_state_dict_pre_hook(_split_on_load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.pair.pair_group
        own_maps, shared_maps = column_stages(self.features)
        x = own_maps(x)  # conv1 and conv2, normalised and pooled: this column's maps
        x = gather(x, group)  # conv3 reads both columns' maps
        x = shared_maps(x)  # conv3 (this column's half of its kernels), conv4, conv5, pooled
        head = Classifier(*self.classifier)
        if folds(x, self.training, self.first_linear_once, head.dropout1.p):
            # the 36 pooled copies folded into fc1's weights (model.py): conv5's outputs travel once, not 36 times
            x = gather(head.dropout1(torch.flatten(x, 1)), group)
            x = nn.functional.linear(x, fold_positions(head.fc1.weight, x.shape[1]), head.fc1.bias)
        else:
            x = head.fc1(gather(head.dropout1(torch.flatten(self.avgpool(x), 1)), group))  # fc1 reads both columns
        x = head.fc2(gather(head.dropout2(head.relu1(x)), group))  # fc2 reads both halves of fc1
        return SumOverPair.apply(head.fc3(head.relu2(x)), group)  # the logits: both halves' contributions

    def whole(self) -> AlexNet:
        """The ordinary two-column network with these weights (a collective of the pair: both call it)."""
        with torch.random.fork_rng(devices=[]):  # building it draws initial weights; the run's stream stays
            model = AlexNet(**self.whole_shape)
        model.load_state_dict(self.state_dict())
        return model.to(next(self.parameters()).device)


def _gather_on_save(column: Column, state_dict: dict, prefix: str, _metadata) -> None:
    """The whole network's entries in place of the column's (a collective of the pair: both save)."""
    whole = gather_state({name: state_dict[prefix + name] for name in column.entries}, column.pair.pair_group)
    state_dict.update({prefix + name: tensor for name, tensor in whole.items()})


def _split_on_load(column: Column, state_dict: dict, prefix: str, *_) -> None:
    """The column's share of the whole network's entries, before they load."""
    own = split_state({name: state_dict[prefix + name] for name in column.entries if prefix + name in state_dict},
                      column.pair.column)
    state_dict.update({prefix + name: tensor for name, tensor in own.items()})


def share_optimizer_state(optimizer, column: Column):
    """The optimizer's state_dict is the whole network's too: its momentum buffers gathered on save, split on load
    (the column's parameters have the whole network's names, and its optimizer their order in its groups)."""
    name_of = {id(parameter): name for name, parameter in column.named_parameters()}
    names = [name_of[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]

    def each_buffer(state_dict: dict, change) -> dict:
        state = {index: {key: change(value, names[index]) if isinstance(value, torch.Tensor) and value.dim() else value
                         for key, value in entry.items()}
                 for index, entry in state_dict["state"].items()}
        return {**state_dict, "state": state}

    def gathered(_, state_dict):  # column 1 has no momentum for the logits' bias (it has no gradient)
        group = column.pair.pair_group
        return each_buffer(state_dict, lambda tensor, name: tensor if name == LOGITS_BIAS
                           else gather_state({name: tensor}, group)[name])

    def split(_, state_dict):
        return each_buffer(state_dict, lambda tensor, name: split_state({name: tensor}, column.pair.column)[name])

    optimizer.register_state_dict_post_hook(gathered)
    optimizer.register_load_state_dict_pre_hook(split)


def prepare(column: Column, accelerator, comm_hook: str) -> nn.Module:
    """The column on its device, under the Accelerator's autocast and in its checkpoints, but not wrapped for data
    parallelism over every process: with several pairs, DDP all-reduces each column's gradients among the processes
    that hold that column (optionally rounded to 16 bits, --ddp_comm_hook)."""
    column = accelerator.prepare_model(column, evaluation_mode=True)
    if dist.get_world_size(column.pair.replica_group) == 1:
        return column
    replicated = nn.parallel.DistributedDataParallel(column, process_group=column.pair.replica_group)
    if comm_hook != "none":
        hook = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}[comm_hook]
        replicated.register_comm_hook(column.pair.replica_group, hook)
    return replicated


def whole_model(model: nn.Module) -> nn.Module:
    """The ordinary network behind a prepared model: gathered from the pair under --parallel columns (every rank
    must call it then), else the model itself."""
    return model.whole() if isinstance(model, Column) else model
