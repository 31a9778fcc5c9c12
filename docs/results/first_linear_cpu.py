"""How much of a CPU training step the first linear layer on 36 copies costs, against computing it once per image.

Both steps: AlexNet (seed widths), batch 256, 64x64 crops, bf16 autocast as the default run on this CPU,
SGD step included. 'copies': the default training forward (dropout on 36 copies of conv5's 1x1 map,
then the 9216 -> 4096 layer). 'once': dropout on the 256 features, the layer's 36 position weights
summed (the folded form evaluation uses) - a different function in training (one mask per feature
instead of one per copy). Windows interleaved; median and min-max of 5 windows of 3 steps.
"""
import json
import statistics
import time

import torch
from torch import nn

from alexnet_dist.model import alexnet

torch.manual_seed(0)
model = alexnet(init="kaiming")
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
criterion = nn.CrossEntropyLoss()
images, labels = torch.randn(256, 3, 64, 64), torch.randint(10, (256,))

def folded_forward(x):
    x = model.features(x).flatten(1)
    drop, first, relu, drop2, second, relu2, last = model.classifier
    x = drop(x)
    folded = first.weight.unflatten(1, (x.shape[1], 36)).sum(dim=-1)
    x = relu(nn.functional.linear(x, folded, first.bias))
    return last(relu2(second(drop2(x))))

def step(forward):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(forward(images).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

def first_layer_only():
    x = torch.randn(256, 9216, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.classifier[1](x)
    y.float().sum().backward()

model.train()
forms = {"copies": lambda: step(model), "once": lambda: step(folded_forward), "first_layer_alone": first_layer_only}
for form in forms.values():
    form()
times = {name: [] for name in forms}
for _ in range(5):
    for name, form in forms.items():
        start = time.perf_counter()
        for _ in range(3):
            form()
        times[name].append((time.perf_counter() - start) / 3)
result = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for name, v in times.items()}
result["first_layer_share_of_step"] = result["first_layer_alone"]["median_s"] / result["copies"]["median_s"]
result["speedup_once_over_copies"] = result["copies"]["median_s"] / result["once"]["median_s"]
result["cpu"] = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ")
result["torch"] = torch.__version__
print(json.dumps(result, indent=1))
