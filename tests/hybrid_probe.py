"""Test helper: each process's part of --parallel hybrid, placed as a run places it (DDP over what every process holds
whole, the cut parameters' gradient hooks), against the whole network computed on every process, in float64. Saves
what it measured as OUT/hybrid<R>.json.

    torchrun --nproc_per_node 2 tests/hybrid_probe.py OUT

exchange, for a network (--groups) and a crop: the largest difference between the logits of this process's images and
  the whole network's, and between the whole network's gradients of the mean loss over every process's images and
  the parts' gradients, gathered; each relative to the largest value of what it is compared with. Crop 64 folds
  fc1's 36 pooled copies (dropout 0), crop 96 gathers the pooled values.
dropout (0.5, training; the hybrid, and a pair of columns of the two-column network; fc1 folded with
  --first_linear_once or not): whether every process read the same input of fc1, whether this process's part of it
  (its images under the hybrid, its column's channels under the columns) was dropped as its own random stream
  decides (fc1 not folded: conv5's maps exchanged, then dropped on every process by a mask drawn from a seed each
  process draws; folded: dropped before the exchange, as a data-parallel process drops them), and how many bytes the
  exchange before fc1 sent.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator

from alexnet_dist import sharded
from alexnet_dist.config import Config
from alexnet_dist.layouts import choose_layout
from alexnet_dist.model import alexnet
from alexnet_dist.sharded import TRAFFIC

IMAGES = 2  # per process
RECORD = {}  # Sharded.fc1_input's argument, what it returned and the bytes its exchanges sent
original_input = sharded.Sharded.fc1_input


def recording_input(part, maps):
    before = TRAFFIC.bytes
    seen, folded = original_input(part, maps)
    RECORD.setdefault("input", (maps.detach().clone(), seen.detach().clone(), TRAFFIC.bytes - before))
    return seen, folded


def placed(accelerator, flags: dict, whole):
    cfg = Config.from_flags({"parallel": "hybrid", "device": "cpu", "logger": "none", **flags})  # flags may override
    model, _ = choose_layout(cfg, accelerator.num_processes).place(whole, cfg, accelerator, optimizer=False)
    return model, accelerator.unwrap_model(model)


def batch(count: int, crop: int) -> tuple:
    """The same images and labels on every process."""
    generator = torch.Generator().manual_seed(crop)
    return torch.randn(count, 3, crop, crop, generator=generator), torch.randint(10, (count,), generator=generator)


def relative(value, reference) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


def exchange(accelerator, groups: int, crop: int) -> dict:
    torch.manual_seed(0)
    whole = alexnet(groups=groups, dropout=0.0, init="kaiming")
    images, labels = batch(IMAGES * accelerator.num_processes, crop)
    torch.nn.functional.cross_entropy(whole(images), labels).backward()
    model, part = placed(accelerator, {"groups": groups, "dropout": 0, "resize": crop, "random_crop": crop}, whole)
    mine = slice(IMAGES * accelerator.process_index, IMAGES * (accelerator.process_index + 1))
    logits = model(images[mine])
    torch.nn.functional.cross_entropy(logits, labels[mine]).backward()
    gradients = part.shards.gather({name: parameter.grad for name, parameter in part.named_parameters()})
    with torch.no_grad():
        reference = whole(images)[mine]
    worst = max(relative(gradients[name], parameter.grad) for name, parameter in whole.named_parameters())
    return {"logits": relative(logits.detach(), reference), "gradients": worst}


def dropout(accelerator, layout: str, first_linear_once: bool) -> dict:
    torch.manual_seed(0)
    groups = 2 if layout == "columns" else 1
    whole = alexnet(groups=groups, dropout=0.5, init="kaiming", first_linear_once=first_linear_once)
    model, part = placed(accelerator, {"parallel": layout, "groups": groups, "first_linear_once": first_linear_once},
                         whole)
    images, _ = batch(IMAGES * accelerator.num_processes, 64)
    index, count = part.shards.index, part.shards.count
    if layout == "hybrid":  # this process's images; a column takes them all
        images = images[IMAGES * index:IMAGES * (index + 1)]
    torch.manual_seed(1000 + accelerator.process_index)  # this process's stream
    stream = torch.get_rng_state()
    RECORD.clear()
    model.train()(images)
    maps, seen, sent = RECORD["input"]
    everyone = [torch.empty_like(seen) for _ in range(accelerator.num_processes)]
    dist.all_gather(everyone, seen)
    torch.set_rng_state(stream)
    with torch.no_grad():  # this process's part, dropped as its own stream decides
        if first_linear_once:  # as a data-parallel process drops it
            own = torch.nn.functional.dropout(torch.flatten(maps, 1), 0.5, training=True)
        else:  # by a mask drawn from a seed this process's stream draws
            features = torch.flatten(part.avgpool(maps), 1)
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
            own = features * torch.empty_like(features).bernoulli_(0.5, generator=generator) / 0.5
    mine = seen.chunk(count, dim=part.joins)[index]
    return {"same_on_every_process": all(torch.equal(other, seen) for other in everyone),
            "own_part_owner_masks": torch.equal(mine, own), "zeros": float((mine == 0).double().mean()),
            "features": seen.shape[1], "bytes_sent": sent, "maps": list(maps.shape), "element": seen.element_size()}


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    sharded.Sharded.fc1_input = recording_input
    accelerator = Accelerator(cpu=True)
    figures = {
        "exchange": {f"groups {groups}, crop {crop}": exchange(accelerator, groups, crop)
                     for groups, crop in ((1, 64), (2, 64), (1, 96))},
        "dropout": {f"{layout}, first_linear_once {once}": dropout(accelerator, layout, once)
                    for layout in ("hybrid", "columns") for once in (False, True)},
    }
    with open(os.path.join(sys.argv[1], f"hybrid{accelerator.process_index}.json"), "w") as out:
        json.dump(figures, out, indent=1)
    dist.destroy_process_group()
