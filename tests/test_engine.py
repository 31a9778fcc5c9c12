from functools import partial

import pytest
import torch
from accelerate import Accelerator

from alexnet_dist.cli import parse_flags
from alexnet_dist.config import UsageError
from alexnet_dist.data import ImageSet
from alexnet_dist.engine import WeightAverage, accuracy, evaluate, lr_factor
from alexnet_dist.loaders import DeviceLoader
from alexnet_dist.transforms import Augmentation, draw_plan


class ByBrightness(torch.nn.Module):
    """A 'model' whose logits depend on the mean brightness of the left or right half of the view."""

    def forward(self, images):
        left, right = images[..., : images.shape[-1] // 2].mean(dim=(1, 2, 3)), images[..., images.shape[-1] // 2:].mean(dim=(1, 2, 3))
        return torch.stack([left - right, right - left], dim=1)


def test_evaluation_modes_count_every_image_once():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 12, 12), dtype=torch.uint8)
    labels = torch.randint(0, 2, (37,))
    augmentation = Augmentation((8, 8), (0.0,) * 3, (1.0,) * 3, torch.device("cpu"))
    loader = DeviceLoader(ImageSet(labels, images), augmentation, torch.device("cpu"), (12, 12), 8, 8, 0, 1,
                          partial(draw_plan, 37, (12, 12), (8, 8), True, 0))
    results = evaluate(ByBrightness(), loader, Accelerator(cpu=True), 2, batch_size=5, modes=("none", "flip", "ten"))
    assert all(int(confusion.sum()) == 37 for confusion in results.values())
    logits = ByBrightness()(next(augmentation.views(images, 1)))
    expected = (logits.argmax(dim=1) == labels).float().mean().item()
    assert accuracy(results["none"]) == pytest.approx(expected)
    assert accuracy(results["flip"]) != accuracy(results["none"])  # mirroring swaps halves: a real second view


def test_weight_average_tracks_and_swaps_back():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update()  # early decay: min(0.5, 2/11) = 0.18
    assert torch.allclose(average.average[0], torch.full((1, 2), 1 - 2 / 11))
    with average.swapped_in():
        assert torch.allclose(model.weight, torch.full((1, 2), 1 - 2 / 11))
    assert torch.equal(model.weight, torch.ones(1, 2))


def test_schedules():
    assert [lr_factor("warmup_linear", s, 2, 10) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]
    assert lr_factor("warmup_cosine", 6, 2, 10) == pytest.approx(0.5)
    assert lr_factor("constant", 9, 2, 10) == 1.0


def test_recipes_load_and_flags_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.2\nschedule: plateau\nmixed_precision: 'no'\n")
    cfg = parse_flags(["--recipe", str(recipe), "--schedule", "constant"])
    assert cfg.lr == 0.2 and cfg.schedule == "constant" and cfg.mixed_precision == "no" and cfg.recipe == str(recipe)
    recipe.write_text("learning_rate: 0.2\n")
    with pytest.raises(UsageError, match="unknown flag: learning_rate"):
        parse_flags(["--recipe", str(recipe)])
    with pytest.raises(UsageError, match="cannot be read"):
        parse_flags(["--recipe", str(tmp_path / "missing.yaml")])


SHIPPED_RECIPES = {
    "paper": {"groups": 2, "init": "paper", "tta": "ten", "schedule": "plateau", "pca_color": 0.1, "lr": 0.01,
              "nesterov": False, "label_smoothing": 0.0, "dropout": 0.5},
    "seed": {"groups": 1, "init": "pytorch", "tta": "none", "schedule": "plateau", "plateau_patience": 10, "lr": 0.1,
             "weight_decay": 0.0, "flip": False, "mixed_precision": "no", "label_smoothing": 0.0},
}


@pytest.mark.parametrize("name", sorted(SHIPPED_RECIPES))
def test_shipped_recipes_set_what_they_say(name):
    from conftest import ROOT

    path = ROOT / "configs" / "recipes" / f"{name}.yaml"
    cfg = parse_flags(["--recipe", str(path)])
    assert {key: getattr(cfg, key) for key in SHIPPED_RECIPES[name]} == SHIPPED_RECIPES[name]
    assert parse_flags(["--recipe", str(path), "--lr", "0.3"]).lr == 0.3  # a flag still wins over the recipe
