"""Why two computations of the column tests' run that agree to 1e-8 part after a few steps on one CPU, not another.

    python docs/results/divergence.py ties [--seeds [0,3]] [--perturbation 1.5e-8]
    python docs/results/divergence.py kernels

`kernels` trains the tests' run (one process) under three kernel choices of this machine (ATEN_CPU_CAPABILITY and
ONEDNN_MAX_CPU_ISA) in float32 and in float64, and prints how far each one's final weights are from the native
run's. `ties` shows why:

The column tests' run (tests/test_columns.py before its float64 launch: fake data, batch 32, fp32, dropout 0, no
augmentation, --groups 2, 5 steps) is trained here in one process, step by step. Before each step the script
  1. runs the step's forward pass on the current weights in float64 and lists the network's discrete decisions
     that float32 rounding could take the other way: a ReLU input whose distance from 0, or a max-pool window whose
     gap between its largest and second-largest value, is below `--margin` (relative to the layer's largest
     value; float32's rounding in a sum of a few hundred products is about 1e-7 of it);
  2. computes the step's gradient twice in float32, from the weights and from the weights moved by
     `--perturbation` (the 1.5e-8 by which one process and a column pair differ after two steps on an AVX2 CPU),
     and prints the largest difference of the two, relative to the gradient's largest value, over the layers.
A step whose closest tie is nearer than the perturbation reaches shows a gradient moved by percents (seed 3, step
2: a max-pool gap of 4e-9 after conv2, and conv2's gradient moves by 5.5e-2); the other steps move it by the
perturbation's order (2e-6). Which of the 4-13 decisions within 1e-6 of a tie flips depends on the exact rounding
of the kernels at hand. Then the float32 step is taken. Output: docs/results/divergence.txt.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fire
import torch
from torch import nn

from alexnet_dist.config import Config
from alexnet_dist.data import load_data
from alexnet_dist.runtime import build_accelerator
from alexnet_dist.training import build_trainer

FLAGS = {"dataset": "fake", "logger": "none", "num_epochs": 1, "fraction_of_data": 0.2, "batch_size": 32,
         "mixed_precision": "no", "dropout": 0, "flip": False, "translate": 0, "resize": 64, "random_crop": 64,
         "groups": 2, "tta": "none"}


def layer_names(model: nn.Module) -> dict:
    names, convs, linears = {}, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            convs += 1
            last = f"conv{convs}"
        elif isinstance(module, nn.Linear):
            linears += 1
            last = f"fc{linears}"
        elif isinstance(module, nn.ReLU):
            names[module] = f"ReLU after {last}"
        elif isinstance(module, nn.MaxPool2d):
            names[module] = f"max-pool after {last}"
    return names


def near_ties(model: nn.Module, images: torch.Tensor, margin: float) -> list:
    """(layer, image, channel, position, gap relative to the layer's largest value) of every decision whose margin
    is below `margin`, in a float64 forward pass of `model`'s weights."""
    model64 = _copy(model, torch.float64)
    names, found = layer_names(model64), []

    def look(module, inputs, _):
        x = inputs[0].detach()
        scale = x.abs().max().item()
        if isinstance(module, nn.ReLU):  # an exact zero (a dead unit's inputs, all zero) is zero on any CPU
            gaps = torch.where(x == 0, torch.full_like(x, scale), x.abs())
        else:  # the two largest values of each 3x3 window (stride 2), where the largest is not a ReLU's zero
            windows = x.unfold(2, 3, 2).unfold(3, 3, 2).flatten(-2)
            top = windows.topk(2, dim=-1).values
            gaps = torch.where(top[..., 0] > 0, top[..., 0] - top[..., 1], torch.full_like(top[..., 0], scale))
        for index in (gaps < margin * scale).nonzero().tolist():
            found.append((names[module], index[0], index[1], tuple(index[2:]), gaps[tuple(index)].item() / scale))

    handles = [module.register_forward_hook(look) for module in names]
    with torch.no_grad():
        model64(images.double())
    for handle in handles:
        handle.remove()
    return found


def _copy(model: nn.Module, dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def gradients(model, images, labels, criterion) -> dict:
    model.zero_grad(set_to_none=True)
    criterion(model(images), labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def gradient_gaps(model, images, labels, criterion, perturbation: float) -> dict:
    """Per weight tensor: the largest difference between the float32 gradients at the weights and at the weights
    moved by +-`perturbation` (a fixed random sign per weight), relative to the gradient's largest value."""
    moved = _copy(model, torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(perturbation * (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1))
    one, other = gradients(_copy(model, torch.float32), images, labels, criterion), \
        gradients(moved, images, labels, criterion)
    return {name: ((one[name] - other[name]).abs().max() / one[name].abs().max().clamp(min=1e-30)).item()
            for name in one}


def ties(seeds=(0, 3), steps: int = 5, margin: float = 1e-6, perturbation: float = 1.5e-8):
    torch.set_num_threads(1)
    for seed in (seeds,) if isinstance(seeds, int) else seeds:
        cfg = Config.from_flags({**FLAGS, "seed": seed})
        accelerator = build_accelerator(cfg)
        data = load_data(cfg, accelerator.device, writer=True, stream=False)
        trainer = build_trainer(cfg, accelerator, data.train, len(data.classes), cfg.batch_size)
        model, criterion = trainer.accelerator.unwrap_model(trainer.model), trainer.criterion
        print(f"seed {seed}")
        for step, (images, labels) in enumerate(trainer.loader.train_epoch(0), start=1):
            if step > steps:
                break
            found = sorted(near_ties(model, images, margin), key=lambda tie: tie[-1])
            gaps = gradient_gaps(model, images, labels, criterion, perturbation)
            worst = max(gaps, key=gaps.get)
            print(f"  step {step}: {len(found)} decision(s) within {margin:g} of a tie; the {perturbation:g} "
                  f"perturbation moves a gradient by {gaps[worst]:.1e} of its largest value ({worst})")
            for layer, image, channel, position, gap in found[:3]:
                print(f"    {layer}: image {image}, channel {channel}, position {position}, gap {gap:.1e}")
            trainer.optimizer.zero_grad(set_to_none=True)
            criterion(trainer.model(images), labels).backward()
            trainer.optimizer.step()
            trainer.scheduler.step()


ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
           "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def kernels(seed: int = 0):
    """The tests' run (one process, 5 steps) under each kernel choice, float32 and float64; the largest difference
    of its final weights from the native run's, relative to the weight tensor's largest value."""
    from alexnet_dist.checkpoint import read_weights

    flags = [f"--{name}={value}" for name, value in FLAGS.items()] + ["--seed", str(seed), "--save", "model.pth"]
    with tempfile.TemporaryDirectory() as folder:
        for precision in ("float32", "float64"):
            weights = {}
            for name, variables in KERNELS.items():
                cwd = Path(folder) / precision / name
                cwd.mkdir(parents=True)
                env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                       "TEST_FLOAT64": str(int(precision == "float64")), **variables}
                subprocess.run([sys.executable, ROOT / "tests" / "launcher.py", *flags, "--run_dir", "run"], cwd=cwd,
                               env=env, check=True, capture_output=True)
                probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu."
                                        "get_cpu_capability())"], env=env, capture_output=True, text=True)
                weights[name] = read_weights(cwd / "model.pth")["state_dict"]
                parted = max(((weights[name][k] - weights["native"][k]).abs().max() / weights["native"][k].abs().max())
                             .item() for k in weights[name])
                print(f"{precision} {name:8s} (capability {probe.stdout.strip()}): final weights differ from the "
                      f"native run's by {parted:.1e}")


if __name__ == "__main__":
    fire.Fire({"ties": ties, "kernels": kernels})
