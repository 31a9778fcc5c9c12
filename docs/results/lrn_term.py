"""How much the local response normalisation acts (issue 30, lever 2): on trained weights, the term alpha / n x the
sum of squares over each map's window, against k = 2, at both normalisation layers, on validation images.

    python docs/results/lrn_term.py WEIGHTS.pth --data_dir data/cifar10-jpeg [--images 1000]

A layer divides by (k + term)^0.75: with the term far below k it is the constant x / 2^0.75. Printed: the median,
mean and 90th percentile of the term at the weights' alpha, and the alphas that would put the 90th percentile or the
mean at k (where the division of the strongest responses is 2^0.75 = 1.68 times that of the weakest).
"""

import fire
import torch

from alexnet_dist.checkpoint import read_weights
from alexnet_dist.config import Config
from alexnet_dist.data import load_data, resize_images
from alexnet_dist.model import alexnet
from alexnet_dist.preflight import with_weights_settings


def window_sums(x: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Sum of x^2 over each map and its size // 2 neighbours on each side (zeros past the ends), as
    LocalResponseNorm takes it."""
    squares = torch.nn.functional.pad((x * x).unsqueeze(1), (0, 0, 0, 0, size // 2, (size - 1) // 2))
    return torch.nn.functional.avg_pool3d(squares, (size, 1, 1), stride=1).squeeze(1) * size


def main(weights: str, data_dir: str, images: int = 1000, seed: int = 0):
    payload = read_weights(weights)
    flags = {"dataset": "folder", "data_dir": data_dir, "seed": seed, "logger": "none"}
    cfg = with_weights_settings(Config.from_flags(flags), payload)  # the run's split, network and preprocessing
    data = load_data(cfg, torch.device("cpu"), writer=True)
    model = alexnet(groups=cfg.groups, lrn_alpha=cfg.lrn_alpha)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    sample = resize_images(data.val.images[:images], cfg.resize)
    top = (cfg.resize[0] - cfg.random_crop[0]) // 2
    x = (sample[:, :, top:top + cfg.random_crop[0], top:top + cfg.random_crop[1]].float() / 255 - 0.5) / 0.5
    print(f"{weights}: {len(x)} validation images, centre crop; term = alpha / 5 x window sum of squares, k = 2")
    with torch.no_grad():
        for index, layer in enumerate(model.features):
            if isinstance(layer, torch.nn.LocalResponseNorm):
                sums = window_sums(x).flatten()
                drawn = sums[torch.randperm(len(sums), generator=torch.Generator().manual_seed(0))[:1_000_000]]
                median, high = (float(q) * layer.alpha / layer.size
                                for q in torch.quantile(drawn, torch.tensor([0.5, 0.9])))
                mean = float(sums.mean()) * layer.alpha / layer.size
                print(f"features.{index} (after conv{1 if index < 4 else 2}): at alpha {layer.alpha:g} the term's "
                      f"median is {median:.2e}, mean {mean:.2e}, 90th percentile {high:.2e}, against k = 2; "
                      f"{100 * float((sums == 0).float().mean()):.0f}% of windows are all zero (ReLU); alpha "
                      f"{2 * layer.alpha / high:.3g} puts the 90th percentile at k, {2 * layer.alpha / mean:.3g} the "
                      f"mean")
            x = layer(x)


if __name__ == "__main__":
    fire.Fire(main)
