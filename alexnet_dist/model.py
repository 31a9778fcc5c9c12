"""AlexNet (Krizhevsky, Sutskever and Hinton, 2012), for any input of at least 63x63 pixels.

What the paper did and what this keeps: five convolutions with ReLU; local response normalisation
(size 5, alpha 1e-4, beta 0.75, k 2) after conv1 and conv2; overlapping max pooling (3x3, stride
2) after conv1, conv2 and conv5; dropout 0.5 before the two hidden linear layers of 4096 units.

Where it differs:
- `groups=1` (default) is the one-column network of the seed (and of torchvision): 64, 192, 384,
  256, 256 channels. `groups=2` is the paper's two-column network, 96, 256, 384, 384, 256
  channels, with the columns as grouped convolutions: conv2, conv4 and conv5 see only their own
  column's maps, conv3 and the linear layers see both (the paper's two GPUs).
- An adaptive average pooling to 6x6 before the classifier (as in torchvision) lets inputs other
  than 224x224 through. At the seed's 64x64 crops conv5 leaves a single 1x1 map, which the pooling
  would repeat 36 times; the first linear layer applied to 36 copies equals that layer with its 36
  positions summed, applied once. Where no dropout acts on those copies (evaluation, or dropout 0)
  `forward` computes it so: the same outputs (up to float rounding) for a 36th of that layer's work.
  In training, dropout draws a separate mask for each copy, so the full layer runs as in the seed:
  the layer sees the average of 36 masks, a weaker dropout than its p says. `first_linear_once=True`
  computes the layer once in training too, with one mask per feature (a different function, and
  faster: a candidate recipe, off by default).
- Local response normalisation is nearly inert at this input scale. The paper's alpha was set for
  activations of raw 0-255 pixels; with inputs normalised to [-1, 1] the term alpha / n * sum(x^2) is
  far below k = 2, so the layer is very nearly the constant scale x / 2^0.75 (at the He
  initialisation on 256 CIFAR-10 images: the term at most 3e-4, the output within 0.012% of that
  scale; about 0.2% on a trained network, as reported in the accuracy issue). The layers are kept
  as the paper has them.
- `init='paper'` draws every weight from N(0, 0.01) and sets the biases of conv2, conv4, conv5
  and the hidden linear layers to 1 (0 elsewhere). At this depth and scale it does not learn: the
  paper's recipe (`configs/recipes/paper.yaml`, lr 0.01) sat at the loss ln(10) and chance accuracy
  for all 25 epochs of a full CPU run (docs/results/recipes/paper_seed0).
- PyTorch's initialisation (`init='pytorch'`, this builder's default, as in torchvision) shrinks
  the signal layer by layer (conv5's output has a standard deviation near 0.01 at the start), so
  the loss sits at ln(10) for the first hundreds of steps. `init='kaiming'` (He et al. 2015:
  N(0, 2 / fan_in), biases 0, the last layer N(0, 0.01)) keeps the signal's scale and learns from
  the first steps: the training CLI's default (`--init`).
"""

from typing import NamedTuple

import torch
from torch import nn

MIN_INPUT = 63
MAX_SINGLE_POSITION = 94  # the largest input side for which conv5 leaves a 1x1 map (95 leaves 2x2)
COLUMN_WIDTHS = {1: (64, 192, 384, 256, 256), 2: (96, 256, 384, 384, 256)}
HIDDEN = 4096  # the neurons of fc1 and fc2

# The network's structure, for the layouts that spread it over processes (columns.py, hybrid.py), so that none of
# them slices the network or names a parameter by position. Module names are the state_dict's (fc1's weight is
# "classifier.1.weight"), and weights files depend on them: they do not change.
#   features     the feature extractor: conv1 to conv5 with their ReLUs, normalisations and poolings
#   features[:COLUMNS_MEET]   conv1 and conv2, normalised and pooled: each column reads only its own maps there
#   features[COLUMNS_MEET:]   conv3 (the first layer that reads both columns' maps) to conv5, pooled
#   avgpool, classifier       the 6x6 pooling, then the fully connected part (Classifier names its modules)
COLUMNS_MEET = 8


def conv5_side(side: int) -> int:
    """The side of conv5's map for an input side (conv1 11/4 padded 2, then three 3/2 poolings)."""
    side = (side + 2 * 2 - 11) // 4 + 1
    for _ in range(3):  # the poolings after conv1 and conv2 (conv2 to conv5 keep the size) and after conv5
        side = (side - 3) // 2 + 1
    return side


def pooled_copies(crop) -> int:
    """How many times the 6x6 average pooling repeats each value of conv5's map before the first linear layer, at
    crops where that map divides 6 evenly (36 for crops up to 94, where the map is 1x1); otherwise 1."""
    height, width = conv5_side(crop[0]), conv5_side(crop[1])
    return 36 // (height * width) if 6 % height == 0 and 6 % width == 0 else 1


class ColumnNorm(nn.LocalResponseNorm):
    """Local response normalisation within each column: the paper normalised over the kernels of one GPU, so with
    two columns a map's neighbours in the other column do not count."""

    def __init__(self, groups: int, alpha: float):
        super().__init__(size=5, alpha=alpha, beta=0.75, k=2.0)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(self.groups, dim=1)
        return torch.cat([nn.functional.local_response_norm(part, self.size, self.alpha, self.beta, self.k)
                          for part in parts], dim=1)


class Classifier(NamedTuple):
    """The fully connected part by role: the modules of AlexNet's `classifier` (or of a layout's copy of it), in
    order."""
    dropout1: nn.Module  # before fc1
    fc1: nn.Module
    relu1: nn.Module
    dropout2: nn.Module  # before fc2
    fc2: nn.Module
    relu2: nn.Module
    fc3: nn.Module  # the logits


def layer_name(role: str) -> str:
    """The module name of a layer of the classifier ("fc1", "fc2", "fc3"): its state_dict entries' prefix."""
    return f"classifier.{Classifier._fields.index(role)}"


def column_stages(features: nn.Sequential) -> tuple:
    """(the layers before the columns first meet, the rest) of AlexNet's `features` or of a column's copy of them."""
    return features[:COLUMNS_MEET], features[COLUMNS_MEET:]


def convolutions(features: nn.Sequential) -> list:
    """conv1 to conv5, the feature extractor's layers with weights."""
    return [layer for layer in features if isinstance(layer, nn.Conv2d)]


def folds(maps: torch.Tensor, training: bool, first_linear_once: bool, dropout: float) -> bool:
    """Whether fc1 runs once on conv5's `maps` instead of on their 36 pooled copies (`fold_positions`): the maps are
    1x1 and no dropout draws a mask per copy (evaluation, dropout 0, or --first_linear_once)."""
    return maps.shape[-2:] == (1, 1) and (first_linear_once or not training or dropout == 0)


def fold_positions(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """The first linear layer's weight over `channels` x 36 pooled copies, summed over the copies: the same layer
    applied once to a 1x1 map."""
    return weight.unflatten(1, (channels, 36)).sum(dim=-1)


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 10, groups: int = 1, dropout: float = 0.5, init: str = "pytorch",
                 first_linear_once: bool = False, lrn_alpha: float = 1e-4):
        super().__init__()
        self.first_linear_once = first_linear_once
        # what builds this network again around other weights (a layout gathering the whole network)
        self.settings = {"num_classes": num_classes, "groups": groups, "dropout": dropout,
                         "first_linear_once": first_linear_once, "lrn_alpha": lrn_alpha}
        if groups not in COLUMN_WIDTHS:
            raise ValueError(f"groups must be 1 or 2, got {groups}")
        c1, c2, c3, c4, c5 = COLUMN_WIDTHS[groups]
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            ColumnNorm(groups, lrn_alpha),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=groups),
            nn.ReLU(inplace=True),
            ColumnNorm(groups, lrn_alpha),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c5 * 6 * 6, HIDDEN),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(inplace=True),
            nn.Linear(HIDDEN, num_classes),
        )
        if init == "paper":
            self._paper_init()
        elif init == "kaiming":
            self._kaiming_init()
        elif init != "pytorch":
            raise ValueError(f"init must be 'pytorch', 'paper' or 'kaiming', got {init!r}")

    def _paper_init(self):
        convs, head = convolutions(self.features), Classifier(*self.classifier)
        for layer in convs + [head.fc1, head.fc2, head.fc3]:
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)
        for layer in (convs[1], convs[3], convs[4], head.fc1, head.fc2):
            nn.init.ones_(layer.bias)

    def _kaiming_init(self):
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.normal_(Classifier(*self.classifier).fc3.weight, mean=0.0, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < MIN_INPUT or x.shape[-2] < MIN_INPUT:
            raise ValueError(
                f"AlexNet needs inputs of at least {MIN_INPUT}x{MIN_INPUT} pixels, got {x.shape[-2]}x{x.shape[-1]}"
            )
        x = self.features(x)
        if folds(x, self.training, self.first_linear_once, Classifier(*self.classifier).dropout1.p):
            return self._classify_single_position(torch.flatten(x, 1))
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))

    def _classify_single_position(self, x: torch.Tensor) -> torch.Tensor:
        head = Classifier(*self.classifier)
        x = head.dropout1(x)  # one mask per feature (inactive in evaluation)
        x = nn.functional.linear(x, fold_positions(head.fc1.weight, x.shape[1]), head.fc1.bias)
        for layer in head[2:]:
            x = layer(x)
        return x


def alexnet(num_classes: int = 10, groups: int = 1, dropout: float = 0.5, init: str = "pytorch",
            first_linear_once: bool = False, lrn_alpha: float = 1e-4) -> AlexNet:
    return AlexNet(num_classes=num_classes, groups=groups, dropout=dropout, init=init,
                   first_linear_once=first_linear_once, lrn_alpha=lrn_alpha)


def architecture(model: AlexNet) -> dict:
    """What a weights file must match to load into `model`."""
    return {"groups": convolutions(model.features)[1].groups,
            "num_classes": Classifier(*model.classifier).fc3.out_features}
