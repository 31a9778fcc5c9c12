"""The fit of saved weights, for runs that ended before every run printed it (issue 30): accuracy on the same fixed
5,000-image sample of the training split that a run now reports at its end (run.py, `Run._fit`), centre crop,
dropout off, and the validation accuracy with the centre crop beside it.

    python docs/results/fit.py WEIGHTS.pth --data_dir data/cifar10-jpeg
"""

import fire
import torch

from alexnet_dist.checkpoint import read_weights
from alexnet_dist.config import Config
from alexnet_dist.data import load_data
from alexnet_dist.engine import accuracy, evaluate
from alexnet_dist.preflight import with_weights_settings
from alexnet_dist.run import FIT_SAMPLE
from alexnet_dist.runtime import build_accelerator
from alexnet_dist.training import build_model, loader_factory


def main(weights: str, data_dir: str):
    payload = read_weights(weights)
    flags = {"dataset": "folder", "data_dir": data_dir, "logger": "none", "train": False, "load_model_path": weights}
    cfg = with_weights_settings(Config.from_flags(flags), payload)  # the run's split, crop and normalisation
    accelerator = build_accelerator(cfg)
    data = load_data(cfg, accelerator.device, writer=True)
    model = build_model(cfg, accelerator, len(data.classes), payload).eval()
    make = loader_factory(cfg, accelerator, 256)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))  # as Run._fit draws it
    sample = data.train.subset(order[:FIT_SAMPLE].sort().values)
    for name, split in (("fit (training sample)", sample), ("validation", data.val)):
        confusion = evaluate(model, make(split), accelerator, len(data.classes), 512, ("none",))["none"]
        print(f"{weights}: {name}, {int(confusion.sum())} images, centre crop, no dropout: "
              f"{100 * accuracy(confusion):.2f}%")


if __name__ == "__main__":
    fire.Fire(main)
