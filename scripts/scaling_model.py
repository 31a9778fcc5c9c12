"""A scaling model: AlexNet's optimizer step on N = 1 to 64 devices, three layouts, four links, predicted from
per-layer times measured here and bytes counted from the network's own tensors.

    python scripts/scaling_model.py                                   # this CPU's layer times; the table
    python scripts/scaling_model.py --json_path scaling.json --plot_path docs/images/scaling_model.png
    python scripts/scaling_model.py --device cuda --json_path scaling_gpu.json   # a GPU's layer times
    python scripts/scaling_model.py --check parallel.json             # against scripts/parallel_bench.py's figures

Layouts, at the default training shape (crop 64, global batch 256, dropout 0.5, 10 classes):
  data     (--groups 1) every device the whole network on 256/N images, then a ring all-reduce of all its
           gradients in fp32 (`data_bf16`: DDP's bf16 hook, half the bytes; its conversions are not modelled);
  columns  (--groups 2, the 2012 paper) a pair of devices per copy of the network, one column each (half of every
           layer's kernels and neurons) on 256/(N/2) images: the four exchanges of alexnet_dist/columns.py within
           the pair (all-gathers of conv2's pooled maps, conv5's maps and fc2's inputs forward, their
           reduce-scatters backward, the columns' dropout seeds; an all-reduce of the logits forward), and with
           N/2 > 1 pairs an all-reduce of each column's gradients among the N/2 devices holding it. N = 1: the
           two-column network on one device;
  hybrid   (--groups 1, Krizhevsky 2014, arXiv 1404.5997) conv1-conv5 data-parallel on 256/N images; fc1 split by
           output neurons and fc2 by input features over all N, each device computing its slice for all 256 images;
           an all-gather of fc1's input before fc1 and a reduce-scatter of fc2's partial sums (256 x 4096) after
           it, their transposes backward; an all-reduce of the gradients of the convolutions, fc3 and fc2's bias.
           Before fc1 both split layouts send what alexnet_dist/sharded.py sends: conv5's maps (256 values an image
           at crop 64), which every device pools to fc1's input and drops alike with masks drawn from each device's
           seed, the seeds gathered first (8 bytes a device; latency, in effect).
Bytes are counted, not assumed: a forward of alexnet_dist.model.AlexNet (training mode, under the precision's
autocast) with hooks gives the shapes and dtypes of the activations that cross devices, and the parameters the
all-reduces carry are counted from the network. In fp32, per image: conv2's pooled maps 256 x 3 x 3 values, conv5's
maps 256, fc2's input 4,096, the logits 10; per step at 2 devices each column sends its half of each gathered
activation forward and the peer's half of its gradient backward, and its 10 logits: 26,664 bytes an image, 6.83 MB
for 256 images with its 8-byte seed (6,825,992 bytes; under bf16 autocast on a CPU, where the normalised conv2 maps
stay fp32, 17,940 bytes an image, 4,592,648 a step). DDP all-reduces 57,044,810 fp32
gradients (--groups 1; 56,909,194 with --groups 2: the 227,636,776 bytes parallel_bench counted). The hybrid's
all-reduce carries 2,514,762 (groups 1) parameters; its gathers move 256 x 256 and 256 x 4,096 values a step.

Compute: each stage (conv1 with its ReLU, normalisation and pooling; conv2 likewise; conv3; conv4; conv5 with its
pooling; fc1 with the 6x6 pooling, dropout and ReLU; fc2 with dropout; fc3 with fc2's ReLU; the loss) is timed forward
and backward at every batch size a layout gives one device (every pass once a round, or until the round spent 20 ms
on it, its fastest kept; --repeats rounds after a warm-up round; their median, or with --statistic min the least
disturbed round), as the layers that device runs: the whole network's, a column's (its own layers, built with half
of each layer's kernels and neurons, reading what columns.py lets it read: conv3, fc1 and fc2 the gathered input), or
the hybrid's fc slices (nn.Linear of the slice's shape at batch 256). Small per-device batches are measured, not
divided, so their lower efficiency is in the figures. The optimizer step (the training's fused SGD) is timed on the
parameters that device updates.

Communication, on a link of bandwidth B per direction per device and latency L per hop (a ring):
  all-reduce of S bytes over n devices:               2(n-1)/n x S / B + 2(n-1) x L, once per DDP bucket
  all-gather / reduce-scatter of S bytes in total:    (n-1)/n x S / B + (n-1) x L
  link      B GB/s   L us   B from                                           L from
  nvlink4    450      3.4   H100 SXM datasheet: NVLink 900 GB/s, both ways   NCCL's tuning model, NVLink
  pcie5       64      5.7   PCIe 5.0 x16: 32 GT/s x 16 lanes x 128/130 bits  NCCL's tuning model, PCI
                            (H100 PCIe datasheet: 128 GB/s, both ways)
  ib100       12.5   14.0   InfiniBand EDR/HDR100, 100 Gb/s a port           NCCL's tuning model, network
                            (NVIDIA ConnectX-6), one port a device
  ib400       50     14.0   InfiniBand NDR, 400 Gb/s a port (NVIDIA          NCCL's tuning model, network
                            ConnectX-7; DGX H100: one a GPU)
NCCL's tuning model: the per-hop latencies of its ring with the Simple protocol (what large messages take), hwLat in
src/graph/tuning.cc of NVIDIA/nccl, which costs a ring collective as base + steps x hop latency, as here.
Each line puts every device's traffic on that link (nvlink4 at 64 devices: an NVLink switch domain of 64 GPUs).

What it ignores: NCCL's base latency per collective (8.4 us, Ring/Simple) and its choice of the lower-latency LL
protocol for small messages; links that peak below their rated speed; the bf16 hook's conversions; kernel overlap of
exchanges with compute. The step is reported twice: nothing overlapped (forward, backward, every collective, the
update, one after the other), and a bound with the gradient all-reduces wholly hidden behind the backward pass
(forward + max(backward, all-reduces) + the rest + update); the activation exchanges are on the critical path in
both. Speed-up: one device's step (the same network, no communication) over N devices' step.

--check PARALLEL_JSON reads what `scripts/parallel_bench.py --json_path` wrote on this machine (2 processes on its
CPU, gloo, --groups 2, each process with the threads it reports) and prints the model's steps/s and bytes beside the
measured ones; the link is gloo on loopback, measured here by a 2-process all-reduce of a few sizes (or --cpu_link).
"""

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alexnet_dist.config import Config, UsageError  # noqa: E402
from alexnet_dist.engine import build_optimizer  # noqa: E402
from alexnet_dist.files import check_writable, write_text  # noqa: E402
from alexnet_dist.model import AlexNet, ColumnNorm  # noqa: E402
from alexnet_dist.runtime import resolve_precision  # noqa: E402

GLOBAL_BATCH, CROP, HIDDEN = 256, 64, 4096
COUNTS = (1, 2, 4, 8, 16, 64)
FIRST_BUCKET, BUCKET = 1 << 20, 25 << 20  # DDP's bucket caps: torch.distributed's defaults
SEED_BYTES = 8  # a device's seed for fc1's dropout masks (alexnet_dist/hybrid.py), int64
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT = 0.02  # seconds: a layer pass shorter than this is taken again within its round


@dataclass(frozen=True)
class Link:
    name: str
    gigabytes_per_s: float  # per direction per device
    latency_us: float  # per ring hop


LINKS = (Link("nvlink4", 450.0, 3.4), Link("pcie5", 64.0, 5.7), Link("ib100", 12.5, 14.0), Link("ib400", 50.0, 14.0))


# ---------------------------------------------------------------- communication


def all_reduce_seconds(size: float, devices: int, link: Link, buckets: int = 1) -> float:
    """A ring all-reduce of `size` bytes, in `buckets` collectives."""
    hops = 2 * (devices - 1)
    return hops / devices * size / (link.gigabytes_per_s * 1e9) + buckets * hops * link.latency_us * 1e-6


def gather_seconds(size: float, devices: int, link: Link) -> float:
    """A ring all-gather or reduce-scatter of `size` bytes in all (each device holds size / devices of it)."""
    hops = devices - 1
    return hops / devices * size / (link.gigabytes_per_s * 1e9) + hops * link.latency_us * 1e-6


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce, all_gather, reduce_scatter
    size: float  # bytes in all
    devices: int
    buckets: int = 1
    hidden: bool = False  # a gradient all-reduce, which may run during the backward pass

    def seconds(self, link: Link) -> float:
        if self.kind == "all_reduce":
            return all_reduce_seconds(self.size, self.devices, link, self.buckets)
        return gather_seconds(self.size, self.devices, link)

    def bytes_sent(self) -> float:
        """What one device sends."""
        share = (self.devices - 1) / self.devices
        return (2 * share if self.kind == "all_reduce" else share) * self.size


def buckets(parameters: list) -> int:
    """How many all-reduces DDP makes of these gradients: it fills buckets in reverse order, the first up to 1 MiB,
    the others up to 25 MiB (a tensor larger than the cap fills one alone)."""
    count, filled, cap = 0, 0, FIRST_BUCKET
    for parameter in reversed(parameters):
        filled += parameter.numel() * 4
        if filled >= cap:
            count, filled, cap = count + 1, 0, BUCKET
    return count + (filled > 0)


# ---------------------------------------------------------------- the network: what crosses, what each device runs


def crossing(model: AlexNet, dtype) -> dict:
    """Bytes an image of each activation that crosses devices in some layout, from a forward with hooks (training
    mode, the default dropout: fc1 reads the 36 pooled copies)."""
    convs = [layer for layer in model.features if isinstance(layer, nn.Conv2d)]
    fc1, fc2, fc3 = [layer for layer in model.classifier if isinstance(layer, nn.Linear)]
    grouped = any(conv.groups > 1 for conv in convs)
    meet = next((conv for conv in convs[1:] if conv.groups == 1), None) if grouped else None  # conv3: both columns
    seen = {}

    def record(name, inputs):
        def hook(module, args, output):
            seen[name] = (args if inputs else (output,))[0]
        return hook

    points = [(model.features, "conv5_output", False), (fc1, "fc1_input", True), (fc2, "fc2_input", True),
              (fc2, "fc2_output", False), (fc3, "logits", False)] + ([(meet, "conv3_input", True)] if meet else [])
    handles = [module.register_forward_hook(record(name, inputs)) for module, name, inputs in points]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        model.train()(torch.randn(2, 3, CROP, CROP))
    for handle in handles:
        handle.remove()
    return {name: tensor[0].numel() * tensor.element_size() for name, tensor in seen.items()}


class Loss(nn.Module):
    def forward(self, logits):
        return nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


@dataclass
class Stage:
    name: str
    layers: nn.Sequential
    shape: tuple  # of one image's input

    def key(self) -> str:
        return f"{self.layers}|{self.shape}"


def whole_stages(model: AlexNet) -> list:
    """The network as the stages a device runs: each convolution with what follows it up to the next, then fc1 with
    the 6x6 pooling and dropout before it, fc2 with its dropout, fc3 with fc2's ReLU (under `hybrid` that ReLU acts
    after the reduce-scatter, on each device's own images), the loss."""
    convs = []
    for layer in model.features:
        if isinstance(layer, nn.Conv2d):
            convs.append([])
        convs[-1].append(layer)
    dropout, fc1, relu, dropout_second, fc2, _, fc3 = model.classifier
    parts = convs + [[model.avgpool, nn.Flatten(), dropout, fc1, relu], [dropout_second, fc2], [nn.ReLU(), fc3],
                     [Loss()]]
    names = [f"conv{index + 1}" for index in range(len(convs))] + ["fc1", "fc2", "fc3", "loss"]
    stages, x = [], torch.zeros(1, 3, CROP, CROP)
    with torch.no_grad():
        for name, layers in zip(names, parts):
            stages.append(Stage(name, nn.Sequential(*layers), tuple(x.shape[1:])))
            x = stages[-1].layers(x) if name != "loss" else x
    return stages


def cut_linear(layer: nn.Linear, parts: int, by_inputs: bool = False) -> nn.Linear:
    if by_inputs:
        return nn.Linear(layer.in_features // parts, layer.out_features)
    return nn.Linear(layer.in_features, layer.out_features // parts)


def column_stages(two_columns: AlexNet) -> list:
    """One column's stages of the two-column network, as alexnet_dist/columns.py lays it out: half the kernels of
    each convolution (reading its own column's maps, or both where the network's convolution is not grouped: conv3),
    half the neurons of fc1 and fc2 (which read the gathered input), half the inputs of fc3; normalisation within
    the column."""
    last = two_columns.classifier[-1]
    stages = []
    for stage in whole_stages(two_columns):
        layers, own_half = [], False
        for layer in stage.layers:
            if isinstance(layer, nn.Conv2d):
                own_half = own_half or (not layers and layer.groups > 1)
                layer = nn.Conv2d(layer.weight.shape[1], layer.out_channels // 2, layer.kernel_size, layer.stride,
                                  layer.padding)
            elif isinstance(layer, ColumnNorm):
                layer = ColumnNorm(1, layer.alpha)
            elif isinstance(layer, nn.Linear):
                own_half = own_half or layer is last
                layer = cut_linear(layer, 2, by_inputs=layer is last)
            layers.append(layer)
        shape = (stage.shape[0] // 2, *stage.shape[1:]) if own_half else stage.shape
        stages.append(Stage(stage.name, nn.Sequential(*layers), shape))
    return stages


def hybrid_stages(stages: list, devices: int) -> tuple:
    """(stages on 256/N images, stages on all 256): the convolutions, fc3 and the loss as in the whole network;
    fc1 cut by output neurons and fc2 by input features into `devices` slices."""
    by_name = {stage.name: stage for stage in stages}
    fc1, fc2 = by_name["fc1"], by_name["fc2"]
    *before, linear, relu = fc1.layers
    sliced = [Stage("fc1", nn.Sequential(*before, cut_linear(linear, devices), relu), fc1.shape),
              Stage("fc2", nn.Sequential(fc2.layers[0], cut_linear(fc2.layers[1], devices, by_inputs=True)),
                    (fc2.shape[0] // devices,))]
    return [stage for stage in stages if stage.name not in ("fc1", "fc2")], sliced


def parameters(stages: list) -> list:
    return [parameter for stage in stages for parameter in stage.layers.parameters()]


# ---------------------------------------------------------------- measuring


class Clock:
    """Per-layer and update times on one device and precision. A first pass of the plans asks for the passes it needs
    (and gets zeros); `measure` then times them all in rounds, every pass once a round after a warm-up round, so that
    a machine whose speed drifts (other work on its cores) slows them alike; each figure is the median over the
    rounds, or their minimum (on a machine shared with other work, the least disturbed round)."""

    def __init__(self, device: str, dtype, repeats: int, statistic: str = "median"):
        self.device, self.dtype, self.repeats = torch.device(device), dtype, repeats
        self.statistic = {"median": statistics.median, "min": min}[statistic]
        self.wanted, self.times = {}, {}
        self.config = Config.from_flags({"logger": "none"})  # the training's optimizer settings

    def stage(self, stage: Stage, batch: int) -> tuple:
        """(forward, backward) seconds of `stage` on `batch` images."""
        key = (stage.key(), batch)
        self.wanted.setdefault(key, (stage, batch))
        return self.times.get(key, (0.0, 0.0))

    def update(self, stages: list) -> float:
        """Seconds of one optimizer step (the training's fused SGD with momentum) over the stages' parameters."""
        key = ("update", tuple(tuple(p.shape) for p in parameters(stages)))
        self.wanted.setdefault(key, (stages, None))
        return self.times.get(key, (0.0,))[0]

    def elapsed(self, action) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            action()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    def passes(self, layers: nn.Module, x: torch.Tensor):
        """A forward and a backward pass of `layers` on `x`, timed apart; passes shorter than SHORT are taken again
        within the round until it has spent SHORT on them, the fastest kept (a pass of a few milliseconds is otherwise
        at the mercy of one time slice of the other work on the machine)."""
        out = {}

        def forward():
            with torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
                out["y"] = layers(x)

        def once() -> tuple:
            seconds = self.elapsed(forward), self.elapsed(lambda: out["y"].backward(torch.ones_like(out["y"])))
            layers.zero_grad(set_to_none=True)
            x.grad = None
            return seconds

        def run() -> tuple:
            taken = [once()]
            while sum(map(sum, taken)) < SHORT:
                taken.append(once())
            return tuple(map(min, zip(*taken)))

        return run

    def step(self, stages: list):
        holder = nn.ModuleList(copy.deepcopy(stage.layers) for stage in stages).to(self.device)
        for parameter in holder.parameters():
            parameter.grad = torch.randn_like(parameter)
        optimizer = build_optimizer(holder, self.config)
        return lambda: (self.elapsed(optimizer.step),)

    def measure(self):
        layers = {}  # one copy of each stage on the device, whatever the batch
        runs = {}
        for key, (stages, batch) in self.wanted.items():
            if batch is None:
                runs[key] = self.step(stages)
            else:
                if stages.key() not in layers:
                    layers[stages.key()] = copy.deepcopy(stages.layers).to(self.device).train()
                x = torch.randn(batch, *stages.shape, device=self.device, requires_grad=stages.name != "conv1")
                runs[key] = self.passes(layers[stages.key()], x)
        samples = {key: [] for key in runs}
        for round_ in range(self.repeats + 1):
            for key, run in runs.items():
                seconds = run()
                if round_:  # the first round warms up
                    samples[key].append(seconds)
        self.times = {key: tuple(map(self.statistic, zip(*values))) for key, values in samples.items()}

    def figures(self) -> dict:
        return {f"{key[1]} images: {key[0]}": value for key, value in self.times.items() if key[0] != "update"}


class Estimate:
    """A GPU's layer times assumed, not measured: each stage pass (forward or backward) takes its FLOPs (counted by
    torch.utils.flop_counter on the meta device) at an achieved throughput, and at least a floor (its kernels'
    launches); the update moves 20 bytes a parameter through memory (fused SGD with momentum reads the weight, its
    gradient and momentum and writes two of them)."""

    def __init__(self, tflops: float, floor_us: float, terabytes_per_s: float):
        self.rate, self.floor, self.memory = tflops * 1e12, floor_us * 1e-6, terabytes_per_s * 1e12
        self.cache = {}

    def stage(self, stage: Stage, batch: int) -> tuple:
        from torch.utils.flop_counter import FlopCounterMode

        key = (stage.key(), batch)
        if key not in self.cache:
            layers = copy.deepcopy(stage.layers).to("meta").train()
            x = torch.randn(batch, *stage.shape, device="meta", requires_grad=stage.name != "conv1")
            with FlopCounterMode(display=False) as forward:
                y = layers(x)
            with FlopCounterMode(display=False) as backward:
                y.backward(torch.ones_like(y))
            self.cache[key] = tuple(max(counter.get_total_flops() / self.rate, self.floor)
                                    for counter in (forward, backward))
        return self.cache[key]

    def update(self, stages: list) -> float:
        return self.floor + 20 * sum(p.numel() for p in parameters(stages)) / self.memory


# ---------------------------------------------------------------- the model


@dataclass
class Plan:
    """One device's step under a layout: its compute, and the collectives it takes part in."""
    forward: float
    backward: float
    update: float
    collectives: list = field(default_factory=list)

    def step(self, link: Link) -> dict:
        hidden = sum(c.seconds(link) for c in self.collectives if c.hidden)
        exposed = sum(c.seconds(link) for c in self.collectives if not c.hidden)
        serial = self.forward + self.backward + self.update + hidden + exposed
        overlapped = self.forward + max(self.backward, hidden) + self.update + exposed
        return {"step_s": serial, "overlapped_step_s": overlapped, "communication_s": hidden + exposed}

    def bytes_sent(self) -> float:
        return sum(c.bytes_sent() for c in self.collectives)


def compute(clock: Clock, runs: list) -> tuple:
    """(forward, backward) seconds of [(stages, batch), ...]."""
    times = [clock.stage(stage, batch) for stages, batch in runs for stage in stages]
    return sum(t[0] for t in times), sum(t[1] for t in times)


class Network:
    """The counts of one network (--groups 1 or 2): its stages, the bytes that cross, the gradients to reduce."""

    def __init__(self, groups: int, dtype):
        self.model = AlexNet(groups=groups)
        self.stages = whole_stages(self.model)
        self.crossing = crossing(self.model, dtype)
        self.parameters = list(self.model.parameters())

    def whole(self, clock: Clock) -> Plan:
        return Plan(*compute(clock, [(self.stages, GLOBAL_BATCH)]), clock.update(self.stages))


def data_plan(net: Network, clock: Clock, devices: int, gradient_bytes: int = 4) -> Plan:
    if devices == 1:
        return net.whole(clock)
    plan = Plan(*compute(clock, [(net.stages, GLOBAL_BATCH // devices)]), clock.update(net.stages))
    size = sum(p.numel() for p in net.parameters) * gradient_bytes
    plan.collectives.append(Collective("all_reduce", size, devices, buckets(net.parameters), hidden=True))
    return plan


def before_fc1(net: Network) -> int:
    """Bytes an image that cross devices before fc1 (alexnet_dist/sharded.py, both split layouts): conv5's maps, which
    every device pools to fc1's input, or the pooled values where those are fewer."""
    return min(net.crossing["conv5_output"], net.crossing["fc1_input"])


def columns_plan(net: Network, clock: Clock, devices: int) -> Plan | None:
    """The two-column network (net: --groups 2); None where the devices do not pair up."""
    if devices == 1:
        return net.whole(clock)
    if devices % 2:
        return None
    column, batch = column_stages(net.model), 2 * GLOBAL_BATCH // devices
    plan = Plan(*compute(clock, [(column, batch)]), clock.update(column))
    exchanged = (net.crossing["conv3_input"], before_fc1(net), net.crossing["fc2_input"])
    for size in exchanged:  # gathered forward, reduce-scattered backward
        plan.collectives += [Collective(kind, batch * size, 2) for kind in ("all_gather", "reduce_scatter")]
    plan.collectives.append(Collective("all_gather", SEED_BYTES * 2, 2))  # fc1's dropout seeds
    plan.collectives.append(Collective("all_reduce", batch * net.crossing["logits"], 2))
    if devices > 2:  # each column's gradients, among the devices holding that column (column 0 holds fc3's bias)
        own = [p for stage in column for p in stage.layers.parameters()]
        size = sum(p.numel() for p in own) * 4
        plan.collectives.append(Collective("all_reduce", size, devices // 2, buckets(own), hidden=True))
    return plan


def hybrid_plan(net: Network, clock: Clock, devices: int) -> Plan:
    if devices == 1:
        return net.whole(clock)
    own, sliced = hybrid_stages(net.stages, devices)
    plan = Plan(*compute(clock, [(own, GLOBAL_BATCH // devices), (sliced, GLOBAL_BATCH)]),
                clock.update(own + sliced))
    for size in (before_fc1(net), net.crossing["fc2_output"]):  # gathered / reduce-scattered forward, transposed back
        plan.collectives += [Collective(kind, GLOBAL_BATCH * size, devices)
                             for kind in ("all_gather", "reduce_scatter")]
    plan.collectives.append(Collective("all_gather", SEED_BYTES * devices, devices))  # fc1's dropout seeds
    fc2_bias = [layer for layer in net.model.classifier if isinstance(layer, nn.Linear)][1].bias
    reduced = [*net.model.features.parameters(), fc2_bias, *net.model.classifier[-1].parameters()]
    size = sum(p.numel() for p in reduced) * 4
    plan.collectives.append(Collective("all_reduce", size, devices, buckets(reduced), hidden=True))
    return plan


def measured(clock: Clock, make):
    """make(clock) twice: once to learn which passes it needs, once with their times."""
    make(clock)
    clock.measure()
    return make(clock)


def plans(one_column: Network, two_columns: Network, clock, counts) -> dict:
    """{layout: {devices: Plan}} (columns only where the devices pair up)."""
    made = {
        "data": {n: data_plan(one_column, clock, n) for n in counts},
        "data_bf16": {n: data_plan(one_column, clock, n, gradient_bytes=2) for n in counts},
        "columns": {n: columns_plan(two_columns, clock, n) for n in counts},
        "hybrid": {n: hybrid_plan(one_column, clock, n) for n in counts},
    }
    return {layout: {n: plan for n, plan in by_count.items() if plan} for layout, by_count in made.items()}


def predict(layouts: dict, links) -> dict:
    """{layout: {devices: {figures, links: {link: step and speed-up}}}}."""
    table = {}
    for layout, by_count in layouts.items():
        one = by_count[1]
        table[layout] = {}
        for devices, plan in by_count.items():
            entry = {"forward_s": plan.forward, "backward_s": plan.backward, "update_s": plan.update,
                     "bytes_sent_per_device": plan.bytes_sent(), "collectives": len(plan.collectives), "links": {}}
            for link in links:
                figures = plan.step(link)
                alone = one.step(link)
                figures["speedup"] = alone["step_s"] / figures["step_s"]
                figures["overlapped_speedup"] = alone["overlapped_step_s"] / figures["overlapped_step_s"]
                entry["links"][link.name] = figures
            table[layout][devices] = entry
    return table


# ---------------------------------------------------------------- the check against parallel_bench.py


def ping_worker(rank: int, port: int, sizes: list, repeats: int, out: str):
    """One of two processes: all-reduces of each size over gloo on loopback, one thread, as parallel_bench runs."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    medians = []
    for size in sizes:
        tensor, times = torch.ones(size // 4), []
        for _ in range(repeats + 1):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times[1:]))
    if rank == 0:
        Path(out).write_text(json.dumps(medians))
    dist.destroy_process_group()


def measure_gloo(repeats: int) -> Link:
    """Gloo on loopback as a link, from 2-process all-reduces (at 2 devices S bytes cost S / B + 2 L): L is half the
    time of a 4 KB all-reduce, B the slope between 1 MB and 32 MB."""
    import tempfile

    import torch.multiprocessing as mp

    sizes = [4 << 10, 1 << 20, 8 << 20, 32 << 20]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "ping.json")
        mp.spawn(ping_worker, args=(port, sizes, max(repeats, 5), out), nprocs=2)
        seconds = json.loads(Path(out).read_text())
    bandwidth = (sizes[-1] - sizes[1]) / (seconds[-1] - seconds[1])
    return Link("gloo", bandwidth / 1e9, seconds[0] / 2 * 1e6)


# the layouts parallel_bench.py measures, as plans of the model for 2 processes (`one`: 1)
BENCH_LAYOUTS = {
    "one": lambda net, clock: net.whole(clock),
    "data": lambda net, clock: data_plan(net, clock, 2),
    "data_bf16": lambda net, clock: data_plan(net, clock, 2, gradient_bytes=2),
    "columns": lambda net, clock: columns_plan(net, clock, 2),
    "hybrid": lambda net, clock: hybrid_plan(net, clock, 2),
}


def check(bench: dict, link: Link, dtype, repeats: int, statistic: str) -> dict:
    """The model's steps/s and bytes for parallel_bench's layouts, with the CPU times of this machine at the threads
    each process had, beside the measured figures."""
    groups = bench.get("groups", 2)  # parallel_bench trains the two-column network in every layout
    net = Network(groups, dtype)
    layouts = {name: figures for name, figures in bench["layouts"].items() if name in BENCH_LAYOUTS}
    rows = {}
    for threads in sorted({figures["threads_per_process"] for figures in layouts.values()}):
        torch.set_num_threads(threads)
        names = [name for name, figures in layouts.items() if figures["threads_per_process"] == threads]
        made = measured(Clock("cpu", dtype, repeats, statistic),
                        lambda clock: {name: BENCH_LAYOUTS[name](net, clock) for name in names})
        for name, plan in made.items():
            figures, predicted = layouts[name], plan.step(link)
            measured_rate = statistics.median(figures["steps_per_second"])
            rows[name] = {"processes": figures["processes"], "threads": threads,
                          "predicted_steps_per_s": 1 / predicted["step_s"],
                          "overlapped_steps_per_s": 1 / predicted["overlapped_step_s"],
                          "measured_steps_per_s": measured_rate,
                          "predicted_over_measured": 1 / predicted["step_s"] / measured_rate,
                          "predicted_bytes": plan.bytes_sent(), "measured_bytes": figures["bytes_per_step"],
                          "compute_s": plan.forward + plan.backward, "update_s": plan.update,
                          "communication_s": predicted["communication_s"]}
    return {"groups": groups, "link": vars(link), "layouts": {name: rows[name] for name in layouts}}


def print_check(result: dict, link_source: str):
    link = result["link"]
    print(f"\nCPU check against parallel_bench (--groups {result['groups']}, gloo on loopback {link_source}: "
          f"{link['gigabytes_per_s']:.2f} GB/s, {link['latency_us']:.0f} us a hop)")
    print(f"{'layout':<10} {'proc':>4} {'thr':>3} {'compute s':>9} {'update s':>8} {'comm s':>7} "
          f"{'model steps/s':>13} {'(overlap)':>9} {'measured':>9} {'ratio':>6} {'model MB':>9} {'measured MB':>11}")
    for name, row in result["layouts"].items():
        print(f"{name:<10} {row['processes']:>4} {row['threads']:>3} {row['compute_s']:>9.3f} {row['update_s']:>8.3f} "
              f"{row['communication_s']:>7.3f} {row['predicted_steps_per_s']:>13.3f} "
              f"{row['overlapped_steps_per_s']:>9.3f} {row['measured_steps_per_s']:>9.3f} "
              f"{row['predicted_over_measured']:>6.2f} {row['predicted_bytes'] / 1e6:>9.2f} "
              f"{row['measured_bytes'] / 1e6:>11.2f}")


# ---------------------------------------------------------------- output


def print_table(table: dict, heading: str):
    print(heading)
    counts = sorted({n for by_count in table.values() for n in by_count})
    print(f"{'layout':<10} {'link':<8} " + " ".join(f"{f'N={n}':>16}" for n in counts) + "   (step ms, speed-up)")
    for layout, by_count in table.items():
        compute = " ".join(f"{(e['forward_s'] + e['backward_s'] + e['update_s']) * 1e3:>9.1f} ms     "
                           if (e := by_count.get(n)) else f"{'-':>16}" for n in counts)
        print(f"{layout:<10} {'compute':<8} {compute}")
        for link in LINKS:
            cells = " ".join(f"{e['links'][link.name]['step_s'] * 1e3:>9.1f} {e['links'][link.name]['speedup']:>5.2f}x"
                             if (e := by_count.get(n)) else f"{'-':>16}" for n in counts)
            print(f"{'':<10} {link.name:<8} {cells}")


def plot(panels: list, path: str):
    """One panel per (table, title): speed-up against N, a line per layout (colour) and link (line style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"data": "tab:blue", "data_bf16": "tab:cyan", "columns": "tab:orange", "hybrid": "tab:green"}
    styles = {"nvlink4": "-", "pcie5": "--", "ib400": "-.", "ib100": ":"}
    figure, all_axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    for axes, (table, title) in zip(all_axes[0], panels):
        counts = sorted({n for by_count in table.values() for n in by_count})
        ideal = axes.plot(counts, counts, color="lightgrey", linewidth=4)[0]
        for layout, by_count in table.items():
            for link in LINKS:
                ns = sorted(by_count)
                axes.plot(ns, [by_count[n]["links"][link.name]["speedup"] for n in ns], styles[link.name],
                          color=colours[layout], marker="o", markersize=3)
        layouts = [plt.Line2D([], [], color=colour) for colour in colours.values()]
        links = [plt.Line2D([], [], color="black", linestyle=styles[link.name]) for link in LINKS]
        axes.add_artist(axes.legend([ideal, *layouts], ["ideal: N", *colours], fontsize=8, loc="upper left"))
        axes.legend(links, [link.name for link in LINKS], fontsize=8, loc="upper left", bbox_to_anchor=(0.2, 1),
                    title="link", title_fontsize=8)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log", base=2)
        axes.set_xticks(counts, [str(n) for n in counts])
        axes.set_xlabel("devices N")
        axes.set_ylabel("predicted speed-up over 1 device (nothing overlapped)")
        axes.set_title(title, fontsize=9)
        axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_flags(argv: list) -> argparse.Namespace:
    parser = Parser(prog="scripts/scaling_model.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the layers are timed")
    parser.add_argument("--threads", type=int, help="CPU threads for the layer times (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of every layer pass, after a warm-up")
    parser.add_argument("--statistic", default="median", choices=("median", "min"),
                        help="of the rounds (min: the least disturbed, on a machine shared with other work)")
    parser.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                        help="autocast of the layer times and the exchanged activations (auto: as training picks)")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="the device counts N, comma-separated")
    parser.add_argument("--json_path", help="write every figure to this JSON file")
    parser.add_argument("--plot_path", help="draw the speed-ups into this PNG")
    parser.add_argument("--check", metavar="PARALLEL_JSON", help="instead of the table: the model beside the "
                        "figures scripts/parallel_bench.py wrote on this machine")
    parser.add_argument("--cpu_link", metavar="GBPS,US", help="gloo's bandwidth and latency for --check (default: "
                        "measured)")
    parser.add_argument("--assume_gpu", metavar="TFLOPS,US,TBPS", help="also a GPU estimate, assumed: layers at "
                        "TFLOPS achieved, at least US a pass; updates at TBPS of memory bandwidth")
    opts = parser.parse_args(argv)
    if opts.threads is not None and opts.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {opts.threads}")
    if opts.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {opts.repeats}")
    try:
        opts.counts = sorted({int(n) for n in opts.counts.split(",")})
    except ValueError:
        raise UsageError(f"--counts must be integers separated by commas, got {opts.counts!r}") from None
    bad = [n for n in opts.counts if n < 1 or GLOBAL_BATCH % n or HIDDEN % n]
    if bad or 1 not in opts.counts:
        raise UsageError(f"--counts must include 1 and divide the batch of {GLOBAL_BATCH} and the {HIDDEN} hidden "
                         f"neurons, got {','.join(map(str, opts.counts))}")
    if opts.mixed_precision == "fp16" and opts.device == "cpu":
        raise UsageError("--mixed_precision fp16 needs a GPU; on the CPU use bf16 or no")
    if opts.cpu_link is not None:
        try:
            bandwidth, latency = (float(part) for part in opts.cpu_link.split(","))
            assert bandwidth > 0 and latency >= 0
        except (ValueError, AssertionError):
            raise UsageError(f"--cpu_link must be GBPS,US with GBPS > 0 and US >= 0, got {opts.cpu_link!r}") from None
        opts.cpu_link = Link("gloo", bandwidth, latency)
    if opts.assume_gpu is not None:
        try:
            figures = [float(part) for part in opts.assume_gpu.split(",")]
            assert len(figures) == 3 and figures[0] > 0 and figures[1] >= 0 and figures[2] > 0
        except (ValueError, AssertionError):
            raise UsageError(f"--assume_gpu must be TFLOPS,US,TBPS with TFLOPS > 0, US >= 0, TBPS > 0, got "
                             f"{opts.assume_gpu!r}") from None
        opts.assume_gpu = figures
    if opts.check is not None:
        try:
            opts.bench = json.loads(Path(opts.check).read_text())
            assert all("steps_per_second" in row for row in opts.bench["layouts"].values())
        except (OSError, ValueError, KeyError, AttributeError, TypeError, AssertionError):
            raise UsageError(f"--check {opts.check} is not a JSON file written by scripts/parallel_bench.py "
                             "--json_path") from None
        if opts.bench.get("device", "CPU") != "CPU":
            raise UsageError(f"--check {opts.check}: its figures are from {opts.bench['device']}; the check is for "
                             "the CPU")
    for flag, path in (("--json_path", opts.json_path), ("--plot_path", opts.plot_path)):
        if path:
            check_writable(flag, path)
    return opts


def main(opts: argparse.Namespace):
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU is visible to PyTorch here; use --device cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.device == "cuda":
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = True  # as training runs
    precision = resolve_precision(opts.mixed_precision, on_cpu=opts.device == "cpu")
    dtype = AUTOCAST[precision]
    if opts.check:  # the check alone
        link = opts.cpu_link or measure_gloo(opts.repeats)
        result = check(opts.bench, link, dtype, opts.repeats, opts.statistic)
        print_check(result, "as given (--cpu_link)" if opts.cpu_link else "measured")
        if opts.json_path:
            write_text(opts.json_path, json.dumps({"precision": precision, "repeats": opts.repeats,
                                                   "statistic": opts.statistic, **result}, indent=1) + "\n")
        return
    device = torch.cuda.get_device_name() if opts.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    clock = Clock(opts.device, dtype, opts.repeats, opts.statistic)
    one_column, two_columns = Network(1, dtype), Network(2, dtype)
    table = predict(measured(clock, lambda clock: plans(one_column, two_columns, clock, opts.counts)), LINKS)
    heading = (f"{device}, torch {torch.__version__}, precision {precision}, batch {GLOBAL_BATCH}, crop {CROP}; "
               f"layer times: {opts.statistic} of {opts.repeats} rounds; data, hybrid --groups 1; columns --groups 2")
    print_table(table, heading)
    result = {"device": device, "torch": torch.__version__, "precision": precision, "repeats": opts.repeats,
              "statistic": opts.statistic,
              "threads": torch.get_num_threads(), "links": [vars(link) for link in LINKS],
              "crossing_bytes_per_image": {"groups1": one_column.crossing, "groups2": two_columns.crossing},
              "layer_times_s": clock.figures(), "layouts": table}
    panels = [(table, f"layer times measured on {device}, mixed precision: {precision}")]
    if opts.assume_gpu:
        tflops, floor_us, terabytes_per_s = opts.assume_gpu
        estimate = predict(plans(Network(1, torch.bfloat16), Network(2, torch.bfloat16),
                                 Estimate(tflops, floor_us, terabytes_per_s), opts.counts), LINKS)
        title = (f"ASSUMED GPU layer times: FLOPs at {tflops:g} TFLOP/s, at least {floor_us:g} us a pass; "
                 f"update at {terabytes_per_s:g} TB/s; bf16 activations")
        print_table(estimate, "\n" + title)
        result["gpu_estimate"] = {"tflops": tflops, "floor_us": floor_us, "terabytes_per_s": terabytes_per_s,
                                  "layouts": estimate}
        panels.append((estimate, title.replace("; update", ";\nupdate")))
    if opts.plot_path:
        plot(panels, opts.plot_path)
    if opts.json_path:
        write_text(opts.json_path, json.dumps(result, indent=1) + "\n")


def cli():
    try:
        main(parse_flags(sys.argv[1:]))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
