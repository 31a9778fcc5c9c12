"""GPU check: the CUDA-graph training step computes what the eager step computes.

    python scripts/graph_check.py [--steps 12] [--json_path OUT.json]

Trains the same initial AlexNet for a few optimizer steps on the same batches (dropout off, a
changing learning rate), once eagerly and once through GraphedStep, and prints the largest
difference of the losses and of the final weights.
"""

import json

import fire
import torch
from accelerate.utils import set_seed

from alexnet_dist.config import Config
from alexnet_dist.engine import GraphedStep, Step, build_optimizer, build_scheduler
from alexnet_dist.model import alexnet
from alexnet_dist.runtime import build_accelerator


def train(cfg, accelerator, graphs: bool, batches):
    set_seed(0)
    model = alexnet(init="kaiming", dropout=0.0).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, accelerator.device, lr_on_device=graphs)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(batches))
    model, optimizer = accelerator.prepare(model, optimizer)
    step = (GraphedStep if graphs else Step)(accelerator, model, optimizer, torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    initial = {name: value.detach().float().clone() for name, value in accelerator.unwrap_model(model).state_dict().items()}
    losses = []
    for images, labels in batches:
        loss, _ = step(images, labels)
        scheduler.step()
        losses.append(float(loss))
    final = {name: value.detach().float().clone() for name, value in accelerator.unwrap_model(model).state_dict().items()}
    return losses, final, max((final[name] - initial[name]).abs().max().item() for name in final)


def main(steps: int = 12, json_path: str | None = None):
    cfg = Config.from_flags({"logger": "none", "batch_size": 128, "warmup_epochs": 0.5, "num_epochs": 1})
    accelerator = build_accelerator(cfg)
    generator = torch.Generator(device=accelerator.device).manual_seed(0)
    batches = [(torch.randn(128, 3, 64, 64, device=accelerator.device, generator=generator).contiguous(memory_format=torch.channels_last),
                torch.randint(10, (128,), device=accelerator.device, generator=generator)) for _ in range(steps)]
    eager_losses, eager_weights, eager_change = train(cfg, accelerator, False, batches)
    graph_losses, graph_weights, _ = train(cfg, accelerator, True, batches)
    result = {
        "device": torch.cuda.get_device_name(), "precision": accelerator.mixed_precision, "steps": steps,
        "eager_losses": eager_losses, "graph_losses": graph_losses,
        "max_loss_difference": max(abs(a - b) for a, b in zip(eager_losses, graph_losses)),
        "max_weight_difference": max((eager_weights[k] - graph_weights[k]).abs().max().item() for k in eager_weights),
        "max_weight_change_in_training": eager_change,
    }
    print(json.dumps({k: v for k, v in result.items() if "losses" not in k}))
    print("eager losses:", " ".join(f"{x:.4f}" for x in eager_losses))
    print("graph losses:", " ".join(f"{x:.4f}" for x in graph_losses))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    fire.Fire(main)
