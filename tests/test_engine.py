import os
from functools import partial

import pytest
import torch
from accelerate import Accelerator

from alexnet_dist.cli import parse_flags
from alexnet_dist.config import UsageError
from alexnet_dist.data import ImageSet
from alexnet_dist.engine import build_average, evaluate, lr_factor
from alexnet_dist.loaders import DeviceLoader
from alexnet_dist.transforms import Augmentation, draw_plan


class ByRegions(torch.nn.Module):
    """A 'model' whose logits are a fixed linear map of the view's mean colour in each cell of a 3 x 3 grid:
    every crop position and its mirror image give other logits, computable by hand."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.weight = torch.randn(num_classes, 27, generator=torch.Generator().manual_seed(1)) * 4

    def forward(self, images):
        cells = torch.nn.functional.adaptive_avg_pool2d(images, 3).flatten(1)
        return cells @ self.weight.T


PAPER_VIEWS = {"none": 1, "flip": 2, "ten": 10}  # the views each mode averages: the centre, its mirror, all ten


def hand_cut_views(images, crop, mean, std) -> list:
    """The paper's ten views cut by slicing: the centre, then the four corners, each followed by its mirror."""
    (height, width), (h, w) = images.shape[-2:], crop
    corners = [((height - h) // 2, (width - w) // 2), (0, 0), (0, width - w), (height - h, 0), (height - h, width - w)]
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    views = []
    for top, left in corners:
        view = (images[:, :, top:top + h, left:left + w].float() / 255 - mean) / std
        views += [view, view.flip(-1)]
    return views


def averaged(model, views, used: int):
    return sum(torch.softmax(model(view), dim=1) for view in views[:used]) / used


def margins(probabilities):
    """How far each image's top class is ahead of the second."""
    top2 = probabilities.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def clear_cut_images(model, count: int, crop, mean, std):
    """`count` blocky 12 x 14 images whose predictions in every mode are far from a tie, so that float rounding
    (the loader normalises with a multiply-add, the hand-cut views with a division) decides none of them."""
    blocks = torch.randint(0, 256, (8 * count, 3, 4, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    candidates = blocks.repeat_interleave(3, dim=2).repeat_interleave(2, dim=3)
    views = hand_cut_views(candidates, crop, mean, std)
    clear = torch.stack([margins(averaged(model, views, used)) > 1e-2 for used in PAPER_VIEWS.values()]).all(dim=0)
    assert int(clear.sum()) >= count
    return candidates[clear][:count]


def test_evaluation_modes_average_the_right_views_and_count_every_image_once():
    """Image i has label i, so the confusion matrix of each mode spells out every image's prediction."""
    count, crop, mean, std = 37, (8, 8), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = ByRegions(count)
    images = clear_cut_images(model, count, crop, mean, std)
    labels = torch.arange(count)
    augmentation = Augmentation(crop, mean, std, torch.device("cpu"), channels_last=False)
    loader = DeviceLoader(ImageSet(labels, images), augmentation, torch.device("cpu"), (12, 14), 8, 8, 0, 1,
                          partial(draw_plan, count, (12, 14), crop, True, 0))
    results = evaluate(model, loader, Accelerator(cpu=True), count, batch_size=5, modes=("none", "flip", "ten"))
    views = hand_cut_views(images, crop, mean, std)
    expected = {}
    for mode, used in PAPER_VIEWS.items():
        expected[mode] = averaged(model, views, used).argmax(dim=1)
    for mode, predictions in expected.items():
        confusion = torch.zeros(count, count, dtype=torch.int64)
        confusion[labels, predictions] = 1
        assert torch.equal(results[mode], confusion), mode
    # the modes really differ here, so a mode that used other views (or fewer) would be caught above
    assert not torch.equal(expected["none"], expected["flip"]) and not torch.equal(expected["flip"], expected["ten"])


def test_weight_average_copies_then_moves_by_one_minus_decay():
    """--ema: the first update copies the weights, each later one moves the average by (1 - decay) toward them."""
    model = torch.nn.Linear(2, 1)
    average = build_average(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(4.0)
    average.update_parameters(model)
    assert torch.equal(average.module.weight, torch.full((1, 2), 4.0))
    with torch.no_grad():
        model.weight.fill_(8.0)
    average.update_parameters(model)
    assert torch.allclose(average.module.weight, torch.full((1, 2), 4.0 + 0.25 * (8.0 - 4.0)))
    assert torch.equal(model.weight, torch.full((1, 2), 8.0))  # the model keeps its own weights
    assert build_average(model, decay=0.0) is None


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


def test_a_resume_under_a_warm_up_schedule_refuses_another_num_epochs():
    """warmup_* schedules decay towards the last epoch, so num_epochs changes what is learned there (not under
    plateau or constant)."""
    from alexnet_dist.config import Config, learning_changes

    saved = Config.from_flags({"logger": "none", "num_epochs": 3}).to_dict()
    assert learning_changes(saved, Config.from_flags({"logger": "none", "num_epochs": 5})) == ["num_epochs: 3 -> 5"]
    older = {name: value for name, value in saved.items() if name != "first_linear_once"}  # before the flag was
    assert learning_changes(older, Config.from_flags({"logger": "none", "num_epochs": 3})) == []  # its default
    assert learning_changes(older, Config.from_flags({"logger": "none", "num_epochs": 3, "first_linear_once": True})
                            ) == ["first_linear_once: False -> True"]
    plateau = Config.from_flags({"logger": "none", "num_epochs": 3, "schedule": "plateau"}).to_dict()
    assert (
        learning_changes(plateau, Config.from_flags({"logger": "none", "num_epochs": 5, "schedule": "plateau"})) == []
    )


@pytest.mark.parametrize(
    "environment,netrc,mode",
    [
        ({}, None, "offline"),
        ({"WANDB_API_KEY": "k" * 40}, None, "online"),
        ({}, "machine api.wandb.ai\n  login user\n  password secret\n", "online"),
        ({}, "machine other.host\n  login user\n  password secret\n", "offline"),
        ({"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}, None, "offline"),  # WANDB_MODE wins
        ({"WANDB_MODE": "online"}, None, "online"),
    ],
)
def test_wandb_runs_online_with_credentials_offline_without_and_wandb_mode_wins(
    environment, netrc, mode, monkeypatch, tmp_path
):
    from alexnet_dist.tracking import wandb_mode

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text(netrc or "")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert wandb_mode() == mode


def test_cpu_threads_replace_the_single_thread_of_accelerate_launch(monkeypatch):
    from alexnet_dist.runtime import LOCAL_SIZE_VARIABLES, cpu_threads

    for name in ("ACCELERATE_MIXED_PRECISION", *LOCAL_SIZE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # eight usable cores
    assert cpu_threads(3) == 3  # the flag wins
    assert cpu_threads(None) == torch.get_num_threads()  # not under accelerate launch: OMP_NUM_THREADS is kept
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch, which also set OMP_NUM_THREADS=1
    assert cpu_threads(None) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three processes on this node share the cores
    assert cpu_threads(None) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpu_threads(None) == 1 and cpu_threads(4) == 4


def test_default_workers_are_one_per_usable_core_at_most_eight(monkeypatch):
    from alexnet_dist.data import worker_count

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's cores, of which this process may use fewer
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert worker_count(None) == 3 and worker_count(0) == 0 and worker_count(5) == 5
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert worker_count(None) == 8


@pytest.mark.parametrize("flags,native", [("fpu sse2 avx512f avx512_bf16 avx512_vnni", True),
                                          ("fpu sse2 avx512f amx_bf16 amx_tile", True),
                                          ("fpu sse2 avx2 avx512f avx512_vnni", False)])
def test_auto_precision_is_bf16_on_cpus_that_multiply_it_natively(flags, native, tmp_path, monkeypatch):
    from alexnet_dist import runtime

    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert runtime.cpu_has_native_bf16(str(tmp_path / "cpuinfo")) is native
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert runtime.resolve_precision("auto", on_cpu=True) == ("bf16" if native else "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # a config file's choice, also on another CPU
    assert runtime.resolve_precision("auto", on_cpu=True) == "bf16"
    assert runtime.resolve_precision("no", on_cpu=True) == "no"  # the flag wins
