"""What the layouts that cut the network over processes share (columns.py, hybrid.py): each process's part of the
whole network, whose files are still the whole network's; the exchanges of activations; how a part is prepared.

A `Shards` rule says, for each parameter of the whole network, along which dimension it is cut over the processes,
or that every process holds it whole. A process's part (`Sharded`) keeps the whole network's modules and parameter
names, with its share of each cut layer; its state_dict and its optimizer's are the whole network's, gathered from
the processes on save and split again on load. They are hooks rather than overrides, so that they act wherever the
part sits: in DDP, in the weights' average (--ema). Weights files and checkpoints therefore cross between every
layout and one process.
"""

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .engine import build_optimizer
from .model import AlexNet, Classifier, fold_positions, folds

# torch 2.14 renamed the one-tensor collectives (the old names warn); older versions have only the old names
GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
FIRST = "first"  # a rule's answer: part 0 holds the parameter, the others a frozen zero of its shape (no gradient)


class Traffic:
    """Bytes this process hands to the exchanges of activations (forward) and of their gradients (backward), as a
    ring sends them: N-1 parts of an all-gather or of a reduce-scatter over N processes. The benchmark reads and
    resets it. DDP's all-reduce of gradients is not counted here (the benchmark counts DDP's buckets)."""

    def __init__(self):
        self.bytes = 0

    def add(self, tensor: torch.Tensor, peers: int):
        self.bytes += tensor.numel() * tensor.element_size() * peers


TRAFFIC = Traffic()  # every split layout's exchanges


def all_gather_rows(part: torch.Tensor, group) -> torch.Tensor:
    """Every process's `part`, one after the other along the first dimension (process 0's first); no gradient
    (gather_batch is the one with a gradient)."""
    count = dist.get_world_size(group)
    whole = part.new_empty((count * part.shape[0], *part.shape[1:]))
    GATHER(whole, part.contiguous(), group=group)
    TRAFFIC.add(part, count - 1)
    return whole


def _reduce_scatter(whole: torch.Tensor, group) -> torch.Tensor:
    """This process's share (along the first dimension) of the sum of every process's `whole`."""
    count = dist.get_world_size(group)
    own = whole.new_empty((whole.shape[0] // count, *whole.shape[1:]))
    REDUCE_SCATTER(own, whole.contiguous(), group=group)
    TRAFFIC.add(own, count - 1)
    return own


class Exchange(torch.autograd.Function):
    """A collective whose backward is its adjoint: an all-gather's gradient is reduce-scattered, a reduce-scatter's
    all-gathered."""

    @staticmethod
    def forward(ctx, tensor, group, collective, adjoint):
        ctx.group, ctx.adjoint = group, adjoint
        return collective(tensor, group)

    @staticmethod
    def backward(ctx, gradient):
        return ctx.adjoint(gradient, ctx.group), None, None, None


def gather_batch(part: torch.Tensor, group) -> torch.Tensor:
    """Every process's `part` of a batch, process 0's first: what a layer that computes for every process's images
    reads. Backward, each process gets the sum of every process's gradient for its part (a reduce-scatter): each
    process's layer computes other outputs from the same gathered input, so those gradients are parts of one.
    (torch.distributed.nn's all_gather does the same, but on gloo its backward takes group ranks for global ones and
    fails in every group but the first.)"""
    return Exchange.apply(part, group, all_gather_rows, _reduce_scatter)


def sum_scatter(whole: torch.Tensor, group) -> torch.Tensor:
    """The sum of every process's `whole` (partial results for the same images, in the same order), of which each
    process keeps its share of the images (a reduce-scatter). Backward, each process's partial results entered the
    sum of every image: its gradient is every process's gradient of its own images, gathered."""
    return Exchange.apply(whole, group, _reduce_scatter, all_gather_rows)


def drop_alike(x: torch.Tensor, p: float, group, dim: int) -> torch.Tensor:
    """Dropout of probability `p` on `x`, every process's part joined along `dim` (process 0's first), the same
    features dropped on every process: each process's part gets the mask that a seed from that process's own random
    stream draws (the stream is in the checkpoints), and the seeds are gathered (8 bytes a process). Every process
    draws every part's mask: N times the random numbers, for the 36 pooled copies of a value not travelling."""
    if p == 0:
        return x
    seeds = all_gather_rows(torch.randint(2**62, (1,)).to(x.device), group)
    keep = 1.0 - p
    masks = [torch.empty(part.shape, device=x.device, dtype=x.dtype)
             .bernoulli_(keep, generator=torch.Generator(x.device).manual_seed(seed))
             for part, seed in zip(x.chunk(len(seeds), dim), seeds.tolist())]
    return x * torch.cat(masks, dim).div_(keep)  # as nn.functional.dropout scales what it keeps


@dataclass(frozen=True)
class Shards:
    """How the whole network's parameters are cut over `count` processes, and this process's `index` among them.
    `rule(name)`: the dimension a parameter is cut along, None (every process holds it whole) or FIRST."""
    index: int
    count: int
    group: object  # the processes that hold the parts: the gathers' group
    rule: object   # parameter name -> int | None | FIRST

    def __deepcopy__(self, memo):  # process groups are handles, not values
        return self

    def split(self, whole: dict) -> dict:
        """This process's share of the whole network's entries."""
        def own(name, tensor):
            how = self.rule(name)
            if how is None:
                return tensor
            if how == FIRST:
                return tensor if self.index == 0 else torch.zeros_like(tensor)
            return tensor.chunk(self.count, dim=how)[self.index].clone()

        return {name: own(name, tensor) for name, tensor in whole.items()}

    def gather(self, own: dict) -> dict:
        """The whole network's entries from every process's (a collective of the group, for the cut ones)."""
        whole = {}
        for name, tensor in own.items():
            how = self.rule(name)
            if how is None:
                whole[name] = tensor
                continue
            parts = [torch.empty_like(tensor) for _ in range(self.count)]
            dist.all_gather(parts, tensor.contiguous(), group=self.group)
            whole[name] = parts[0] if how == FIRST else torch.cat(parts, dim=how)
        return whole


def own_layer(layer: nn.Module, name: str, shards: Shards) -> nn.Module:
    """This process's part of the whole network's layer `name`, its weights copied (a layer with nothing cut, or
    with no weights, is copied whole)."""
    entries = {f"{name}.{key}": tensor.detach() for key, tensor in layer.state_dict().items()}
    if all(shards.rule(entry) is None for entry in entries):
        return copy.deepcopy(layer)
    own = {key.rsplit(".", 1)[1]: tensor for key, tensor in shards.split(entries).items()}
    outputs, inputs = own["weight"].shape[:2]  # a grouped conv's weight is already (outputs, own inputs, ...)
    if isinstance(layer, nn.Conv2d):
        part = nn.Conv2d(inputs, outputs, layer.kernel_size, layer.stride, layer.padding)
    else:
        part = nn.Linear(inputs, outputs)
    part.load_state_dict(own)
    for key, parameter in part.named_parameters():
        if shards.rule(f"{name}.{key}") == FIRST and shards.index != 0:
            parameter.requires_grad_(False)
    return part


class Sharded(nn.Module):
    """A process's part of AlexNet: the whole network's modules and parameter names, each layer replaced by
    `part(layer, name, shards)`. state_dict / load_state_dict speak the whole network's state (collectives of the
    group: every process saves and loads)."""

    joins = 0  # the dimension along which the processes' parts of fc1's input join: 0 images, 1 channels

    def __init__(self, whole: AlexNet, shards: Shards, part=own_layer):
        super().__init__()
        self.shards, self.settings = shards, whole.settings
        self.first_linear_once = whole.settings["first_linear_once"]
        self.features = nn.Sequential(*(part(layer, f"features.{index}", shards)
                                        for index, layer in enumerate(whole.features)))
        self.avgpool = copy.deepcopy(whole.avgpool)
        self.classifier = nn.Sequential(*(part(layer, f"classifier.{index}", shards)
                                          for index, layer in enumerate(whole.classifier)))
        self.entries = list(super().state_dict().keys())
        self.register_state_dict_post_hook(_gather_on_save)
        self.register_load_state_dict_pre_hook(_split_on_load)

    def join(self, part: torch.Tensor) -> torch.Tensor:
        """Every process's `part` of an activation, joined along `joins` (an exchange with a gradient)."""
        raise NotImplementedError

    def first_linear(self, maps: torch.Tensor) -> torch.Tensor:
        """fc1's output (this process's share of it) from this process's part of conv5's `maps`."""
        fc1 = Classifier(*self.classifier).fc1
        x, folded = self.fc1_input(maps)
        return nn.functional.linear(x, fold_positions(fc1.weight, x.shape[1]) if folded else fc1.weight, fc1.bias)

    def fc1_input(self, maps: torch.Tensor) -> tuple:
        """(fc1's input, joined from every process's part of conv5's `maps` and dropped alike on every process;
        whether fc1 folds its 36 pooled copies, model.folds). What travels is the maps, 1x1 at crops up to 94, which
        every process pools itself (maps larger than 6x6 are pooled first instead: whichever is smaller); their 36
        pooled copies are then dropped one by one (drop_alike), as the whole network drops them. Where fc1 folds the
        copies (--first_linear_once: one mask per feature) each process drops its own part before the exchange."""
        dropout = Classifier(*self.classifier).dropout1
        if folds(maps, self.training, self.first_linear_once, dropout.p):
            return self.join(dropout(torch.flatten(maps, 1))), True
        smaller = maps if maps.shape[-2] * maps.shape[-1] <= 36 else self.avgpool(maps)  # 36x fewer at 1x1 maps
        pooled = torch.flatten(self.avgpool(self.join(smaller)), 1)  # pooling 6x6 maps again: the same
        return drop_alike(pooled, dropout.p if self.training else 0.0, self.shards.group, self.joins), False

    def whole(self) -> AlexNet:
        """The ordinary network with these weights (a collective of the group: every process calls it)."""
        with torch.random.fork_rng(devices=[]):  # building it draws initial weights; the run's stream stays
            model = AlexNet(**self.settings)
        model.load_state_dict(self.state_dict())
        return model.to(next(self.parameters()).device)


def _gather_on_save(part: Sharded, state_dict: dict, prefix: str, _metadata) -> None:
    """The whole network's entries in place of the part's."""
    whole = part.shards.gather({name: state_dict[prefix + name] for name in part.entries})
    state_dict.update({prefix + name: tensor for name, tensor in whole.items()})


def _split_on_load(part: Sharded, state_dict: dict, prefix: str, *_) -> None:
    """The part's share of the whole network's entries, before they load."""
    own = part.shards.split({name: state_dict[prefix + name] for name in part.entries if prefix + name in state_dict})
    state_dict.update({prefix + name: tensor for name, tensor in own.items()})


def share_optimizer_state(optimizer, part: Sharded):
    """The optimizer's state_dict is the whole network's too: its momentum buffers gathered on save, split on load
    (the part's parameters have the whole network's names, and its optimizer their order in its groups)."""
    name_of = {id(parameter): name for name, parameter in part.named_parameters()}
    names = [name_of[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]

    def each_buffer(state_dict: dict, change) -> dict:
        state = {index: {key: change(value, names[index]) if isinstance(value, torch.Tensor) and value.dim() else value
                         for key, value in entry.items()}
                 for index, entry in state_dict["state"].items()}
        return {**state_dict, "state": state}

    def gathered(_, state_dict):  # a parameter that part 0 holds alone has momentum there alone (no gradient else)
        return each_buffer(state_dict, lambda tensor, name: tensor if part.shards.rule(name) == FIRST
                           else part.shards.gather({name: tensor})[name])

    def split(_, state_dict):
        return each_buffer(state_dict, lambda tensor, name: part.shards.split({name: tensor})[name])

    optimizer.register_state_dict_post_hook(gathered)
    optimizer.register_load_state_dict_pre_hook(split)


def prepare(part: Sharded, accelerator, comm_hook: str, group, ignored=()) -> nn.Module:
    """The part on its device, under the Accelerator's autocast and in its checkpoints, but not wrapped by
    Accelerate: DDP averages its gradients over `group` (optionally rounded to 16 bits, --ddp_comm_hook), leaving
    out the parameters named in `ignored` (each process's own share, which no other process holds)."""
    part = accelerator.prepare_model(part, evaluation_mode=True)
    if dist.get_world_size(group) == 1:
        return part
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(part, list(ignored))
    replicated = nn.parallel.DistributedDataParallel(part, process_group=group)
    if comm_hook != "none":
        hook = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}[comm_hook]
        replicated.register_comm_hook(group, hook)
    return replicated


class SplitLayout:
    """What the layouts that cut the network share (layouts.py describes a layout). A subclass says how it cuts:
    `split(model, device_type)` -> (this process's part, the group DDP averages over, the parameters it leaves
    out)."""

    predicts = False  # --predict runs the whole network on the main process alone
    traffic = TRAFFIC

    def place(self, model: AlexNet, cfg, accelerator, optimizer: bool = True) -> tuple:
        with torch.random.fork_rng(devices=[]):  # building the cut layers draws initial weights: the dropout stream
            part, group, ignored = self.split(model, accelerator.device.type)  # stays where build_model seeded it
        sgd = build_optimizer(part, cfg) if optimizer else None
        if sgd is not None:
            share_optimizer_state(sgd, part)
            sgd = accelerator.prepare(sgd)
        return prepare(part, accelerator, cfg.ddp_comm_hook, group, ignored), sgd

    def whole_model(self, model: Sharded) -> AlexNet:
        """The ordinary network behind a part (a collective: every process calls it)."""
        return model.whole()
