"""fc1's effective step, checked (issue 30, lever 1): one SGD step of AlexNet at the default crop (64: conv5 leaves a
1x1 map that the pooling repeats 36 times), with and without --first_linear_scaled, against the same step of a plain
256 -> 4096 layer (fc1's 36 weight blocks summed: the layer that acts). Momentum 0 (a first step has none) and
dropout 0 (then the 36 copies see the same values and fc1 is exactly the folded layer).

    python docs/results/first_linear_scale.py
"""

import copy
import types

import torch

from alexnet_dist.engine import build_optimizer
from alexnet_dist.model import alexnet, fold_positions

LR, DECAY = 0.05, 5e-4


def folded(model) -> torch.Tensor:
    return fold_positions(model.classifier[1].weight.detach(), 256).clone()


def step(model, images, labels, scaled: bool, loss_scale: float = 1.0) -> torch.Tensor:
    """The change of the summed fc1 in one step of a copy of `model` (loss_scale 0: the weight decay alone)."""
    model = copy.deepcopy(model)
    before = folded(model)
    cfg = types.SimpleNamespace(lr=LR, momentum=0.0, weight_decay=DECAY, nesterov=False, random_crop=(64, 64),
                                first_linear_scaled=scaled)
    optimizer = build_optimizer(model, cfg)
    (loss_scale * torch.nn.functional.cross_entropy(model(images), labels)).backward()
    optimizer.step()
    return folded(model) - before


def main():
    torch.manual_seed(0)
    model = alexnet(init="kaiming", dropout=0.0).train()
    images, labels = torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
    before = folded(model)

    plain = copy.deepcopy(model)  # the folded layer as a plain parameter over conv5's 256 outputs
    layer = torch.nn.Linear(256, 4096)
    layer.weight.data.copy_(before)
    layer.bias.data.copy_(model.classifier[1].bias.detach())
    _, _, *rest = plain.classifier
    logits = torch.nn.Sequential(layer, *rest)(torch.flatten(plain.features(images), 1))
    torch.nn.functional.cross_entropy(logits, labels).backward()
    plain_step = -LR * layer.weight.grad  # the gradient part of a plain layer's step
    decay_step = -LR * DECAY * before  # the weight-decay part, the same for both (a fraction of the summed weight)

    print(f"one SGD step, lr {LR}, weight decay {DECAY}, batch 64, crop 64, dropout 0, momentum 0")
    for scaled in (False, True):
        change, decay = step(model, images, labels, scaled), step(model, images, labels, scaled, loss_scale=0.0)
        gradient_part = change - decay
        ratio = float(gradient_part.norm() / plain_step.norm())
        cosine = float(torch.nn.functional.cosine_similarity(gradient_part.flatten(), plain_step.flatten(), dim=0))
        print(f"first_linear_scaled={scaled}: the summed fc1's gradient step is {ratio:.3f} x a plain layer's "
              f"(cosine {cosine:.4f}); its weight decay {float(decay.norm() / decay_step.norm()):.3f} x the plain "
              f"layer's, {float(decay.norm() / gradient_part.norm()):.2e} of its own gradient step")


if __name__ == "__main__":
    main()
