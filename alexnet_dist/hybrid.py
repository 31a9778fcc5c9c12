"""--parallel hybrid: Krizhevsky's "one weird trick" (2014, arXiv 1404.5997) on N >= 2 processes: the convolutions
data-parallel, the fully connected layers cut over every process.

    torchrun --standalone --nproc_per_node 4 launch/train.py --parallel hybrid

conv1 to conv5 (most of the compute, 4% of the parameters) run data-parallel: each process takes
batch_size / (N x grad_accum_steps) images, and DDP averages their gradients over the N processes (--ddp_comm_hook
rounds them). fc1 and fc2 (96% of the parameters) are cut over all N processes, fc1 by its outputs and fc2 by its
inputs (Megatron's cut, and PyTorch's ColwiseParallel / RowwiseParallel), and each process computes its slice for
every image of the micro-step:
  - before fc1, conv5's maps are all-gathered, and every process pools them to fc1's input: 256 values an image at
    crops up to 94 (1x1 maps, which model.py's 6x6 pooling repeats 36 times), not the 9,216 pooled ones (maps
    larger than 6x6 are pooled before the gather instead, whichever is smaller);
  - after fc2, its partial sums are reduce-scattered: summed over the processes, each keeping its own images;
  - fc2's bias (added after that sum), fc3 and the loss are data-parallel again, their gradients averaged by DDP.
Backward, the all-gather's gradient is reduce-scattered and the reduce-scatter's all-gathered (sharded.py).

Gradient scale. Each process's loss is the mean over its own images, and DDP averages the gradients of what every
process holds whole over the N processes: the gradient of the mean over the global batch, as one process computes
it. A cut parameter has no copies to average with, and its gradient sums what every process's loss sends back
through the reduce-scatter: N losses, N times the gradient of the mean. A hook divides it by N.

Dropout. fc1's input is gathered, so every process must drop the same features of it (sharded.Sharded.fc1_input,
shared with the columns): each process draws a seed from its own random stream (as a data-parallel process draws its
masks from it; it is in the checkpoints), the seeds are gathered, and every process draws each process's images'
masks from that process's seed: the same mask everywhere, and the 36 pooled copies of a value dropped one by one as
the whole network drops them, for 256 values sent an image instead of 9,216 (N times the random numbers on each
process instead). Where fc1 folds the copies (--first_linear_once: one mask per feature) each process drops its own
images' 256 features before the gather.
fc2's input is each process's slice of fc1 for every image: each process draws its slice of that layer's mask from
its own stream. With dropout on, the run therefore depends on N, as the data layout's does (its processes draw
their own masks too): independent of N only if every process drew the whole layer's mask for the whole global batch
from one stream shared by all, and the one-process run drew the same; the layouts agree at --dropout 0.

Why not torch.distributed.tensor.parallel. ColwiseParallel(input_layouts=Shard(0)) on fc1 and
RowwiseParallel(output_layouts=Shard(0)) on fc2 state this exchange, and on gloo and the CPU (torch 2.14.1, two
processes) they compute it: float64 outputs within 3e-17 of the whole network's, fc1's gradients N times the whole
network's (the scale above), and DDP over the rest, the DTensors left out of it, agreed too. But they turn fc1's and
fc2's parameters into DTensors, which the rest of a run cannot hold beside plain tensors: engine.build_optimizer's
fused SGD failed ("aten._fused_sgd_.default got mixed torch.Tensor and DTensor"; with the DTensors in a group of
their own, "Operator aten._fused_sgd_.default does not have a sharding strategy registered"), foreach SGD and the
weights' average (--ema: "aten._foreach_lerp_.Scalar got mixed torch.Tensor and DTensor") failed as mixed, and a
whole network's state_dict does not load into them. So the exchanges are autograd functions of our own, as in
columns.py; the device mesh is PyTorch's.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from .config import UsageError
from .model import HIDDEN, AlexNet, Classifier, layer_name
from .sharded import Sharded, Shards, SplitLayout, gather_batch, sum_scatter

CUT = {f"{layer_name('fc1')}.weight": 0, f"{layer_name('fc1')}.bias": 0,  # fc1 by its outputs
       f"{layer_name('fc2')}.weight": 1}  # fc2 by its inputs; its bias, added after the sum, is whole everywhere


class Hybrid(SplitLayout):
    """--parallel hybrid: every process a copy of the convolutions and its slice of fc1 and fc2."""

    unit = "process(es)"

    def __init__(self, num_processes: int):
        if num_processes < 2:
            raise UsageError(f"--parallel hybrid cuts fc1 and fc2 over several processes: launch 2 or more "
                             f"(one process trains the same network with --parallel data), got {num_processes}")
        if HIDDEN % num_processes:
            raise UsageError(f"--parallel hybrid cuts fc1's and fc2's {HIDDEN} neurons evenly over the processes: "
                             f"launch a number of processes that divides {HIDDEN} (2, 4, 8, ...), got {num_processes}")
        self.replicas = num_processes

    @staticmethod
    def check_flags(cfg):
        """Nothing to refuse: the convolutions of either --groups are whole on every process, and both networks
        have fc1 and fc2 of the same sizes."""

    def shard(self, process_index: int) -> tuple:
        return process_index, self.replicas, True

    def note(self, micro_batch: int) -> str:
        return (f" (convolutions data-parallel; fc1 and fc2 cut {self.replicas} ways, each process computing its "
                f"slice for all {self.replicas * micro_batch} images of a micro-step)")

    def split(self, model: AlexNet, device_type: str) -> tuple:
        mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("hybrid",))
        part = HybridPart(model, Shards(mesh.get_local_rank(), mesh.size(), mesh.get_group(), CUT.get))
        return part, mesh.get_group(), list(CUT)  # DDP averages what every process holds whole, and only that


class HybridPart(Sharded):
    """A process's convolutions, its slices of fc1 and fc2, fc2's bias and fc3."""

    def __init__(self, whole: AlexNet, shards: Shards):
        super().__init__(whole, shards)
        for name, parameter in self.named_parameters():
            if name in CUT:  # its gradient sums every process's loss: the mean's is 1/N of it (module docstring)
                parameter.register_hook(lambda gradient: gradient / shards.count)

    def join(self, part: torch.Tensor) -> torch.Tensor:
        return gather_batch(part, self.shards.group)  # every process's images, process 0's first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, head = self.shards.group, Classifier(*self.classifier)
        x = self.first_linear(self.features(x))  # this process's slice of fc1, every image (sharded.py)
        x = head.dropout2(head.relu1(x))  # its part of the layer's mask
        x = sum_scatter(nn.functional.linear(x, head.fc2.weight), group)  # fc2's partial sums added; own images
        x = x + head.fc2.bias.to(x.dtype)  # once, after the sum (to the autocast dtype, as nn.Linear adds it)
        return head.fc3(head.relu2(x))
