"""Smoke runs of the real entry point on generated data, on one and two CPU processes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NARROW, QUICK, ROOT, assert_same_weights, copy_run_folder, run_cli

from alexnet_dist.checkpoint import complete_checkpoints, read_state, read_weights
from alexnet_dist.model import alexnet


def test_train_then_evaluate_saved_weights(tmp_path):
    # fp32: evaluation batches of 64 (training) and 512 (evaluation) must give the same predictions; bf16 may not
    result = run_cli(QUICK + ["--save", "out/model.pth", "--log_freq", "2", "--mixed_precision", "no"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "global batch 32 = 1 process(es) x 1 accumulation step(s) x 32 images per micro-batch" in result.stdout
    configuration = [line for line in result.stdout.splitlines() if line.startswith("configuration: ")]
    assert len(configuration) == 1  # the whole configuration, printed once at the start
    assert (
        "batch_size=32" in configuration[0] and "log_freq=2" in configuration[0] and "dataset=fake" in configuration[0]
    )
    assert "step 2: training loss" in result.stdout
    assert re.search(r"epoch 1/1: loss [\d.]+, train accuracy [\d.]+%, validation accuracy [\d.]+%", result.stdout)
    weights = read_weights(tmp_path / "out" / "model.pth")
    assert weights["classes"] == [f"pattern{i}" for i in range(10)]
    assert weights["config"]["batch_size"] == 32 and weights["architecture"] == {"groups": 1, "num_classes": 10}
    assert len(list((tmp_path / "runs").iterdir())) == 1
    trained = result.accuracy()

    evaluation = run_cli(
        [
            "--dataset",
            "fake",
            "--train=False",
            "--load_model_path",
            "out/model.pth",
            "--tta",
            "none",
            "--mixed_precision",
            "no",
        ],
        cwd=tmp_path,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    assert evaluation.accuracy() == trained
    assert "pattern9" in evaluation.stdout  # per-class lines
    assert len(list((tmp_path / "runs").iterdir())) == 1  # evaluation writes no run


# The parameters of the network the tests launch (fc1 and fc2 of NARROW neurons, 10 classes; the crop does not matter
# after the 6x6 pooling), by hand:
# (inputs x kernel + 1 bias) x outputs for conv1..conv5, then the three linear layers
GRADIENTS = (
    (3 * 11 * 11 + 1) * 64
    + (64 * 5 * 5 + 1) * 192
    + (192 * 3 * 3 + 1) * 384
    + (384 * 3 * 3 + 1) * 256
    + (256 * 3 * 3 + 1) * 256
    + (256 * 6 * 6 + 1) * NARROW
    + (NARROW + 1) * NARROW
    + (NARROW + 1) * 10
)


@pytest.mark.parametrize("hook,dtype", [("fp16", "torch.float16"), ("bf16", "torch.bfloat16")])
def test_ddp_comm_hook_sends_every_gradient_in_16_bits(tmp_path, hook, dtype):
    """Two gloo processes with --ddp_comm_hook: each optimizer step all-reduces all the network's gradients in 16 bits
    (through the hook; without one DDP reduces in C++ and nothing 16-bit passes torch.distributed.all_reduce)."""
    result = run_cli(
        [tmp_path, *QUICK, "--ddp_comm_hook", hook, "--save", "model.pth"],
        cwd=tmp_path,
        script=ROOT / "tests" / "comm_probe.py",
        processes=2,
    )
    assert result.returncode == 0, result.stderr
    assert "test (tta none) accuracy" in result.stdout
    rank0, rank1 = (torch.load(tmp_path / f"comm{rank}.pt") for rank in (0, 1))
    assert rank0 == rank1
    sent = sum(elements for kind, elements in rank0 if kind == dtype)
    assert sent >= GRADIENTS and sent % GRADIENTS == 0, (sent, GRADIENTS)  # whole steps, every gradient once
    assert not [(kind, elements) for kind, elements in rank0 if kind == "torch.float32" and elements > 1000]


def test_ddp_comm_hook_is_harmless_on_one_process():
    from alexnet_dist.config import Config
    from alexnet_dist.runtime import build_accelerator

    accelerator = build_accelerator(Config.from_flags({"ddp_comm_hook": "fp16", "device": "cpu", "logger": "none"}))
    model = alexnet()
    assert accelerator.num_processes == 1 and accelerator.prepare(model) is model  # no DDP wrapper, no hook


def test_console_script_takes_the_same_flags(tmp_path):
    script = Path(sys.executable).parent / "alexnet-dist-train"
    if not script.exists():
        pytest.skip("package not installed with pip install -e .")
    result = subprocess.run([str(script), "--batch_size", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "--batch_size must be at least 1" in result.stderr


def test_ranks_draw_their_own_dropout_masks_over_the_same_data_plan_and_end_with_identical_weights(tmp_path):
    """Two processes: the halves of a global batch get different dropout masks, and the images are
    those a single process sees in its first step, split in two; DDP still ends both ranks with the same weights,
    and only the main process prints and writes the run folder."""
    probe = ROOT / "tests" / "rank_probe.py"
    flags = QUICK + ["--mixed_precision", "no", "--save", "model.pth"]
    records = {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        result = run_cli([folder, *flags], cwd=folder, script=probe, processes=processes)
        assert result.returncode == 0, result.stderr
        records[processes] = [torch.load(folder / f"probe{rank}.pt") for rank in range(processes)]
    assert "2 process(es) x 1 accumulation step(s) x 16 images per micro-batch" in result.stdout
    assert result.stdout.count("test (tta none) accuracy") == 1  # only the main process prints
    assert len(list((tmp_path / "p2" / "runs").iterdir())) == 1
    rank0, rank1 = records[2]
    assert_same_weights(rank0["weights"], rank1["weights"], exact=True)  # DDP kept the ranks' copies equal
    assert len(rank0["masks"]) == 2 and rank0["masks"][0].shape == (16, 256 * 36)
    for first, second in zip(rank0["masks"], rank1["masks"]):
        assert not torch.equal(first, second)
        assert 0.4 < first.float().mean() < 0.6  # still dropout 0.5
    single = records[1][0]["inputs"][0]
    assert torch.equal(torch.cat([rank0["inputs"][0], rank1["inputs"][0]]), single)


@pytest.mark.slow  # inductor compiles C++ for the CPU: a minute or more
def test_compiled_training_saves_weights_that_evaluate_predict_and_resume(tmp_path):
    """--compile true: the weights file has the plain network's names (no torch.compile prefix), so evaluation
    and predictions load it; a checkpoint of the compiled run resumes, compiled or not."""
    # plateau: a schedule blind to num_epochs, so that the resume may add an epoch
    flags = QUICK + [
        "--compile",
        "true",
        "--mixed_precision",
        "no",
        "--checkpoint_minutes",
        "0",
        "--run_dir",
        "run",
        "--schedule",
        "plateau",
    ]
    trained = run_cli(flags + ["--save", "model.pth"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    state_dict = read_weights(tmp_path / "model.pth")["state_dict"]
    assert "features.0.weight" in state_dict and not any("_orig_mod" in name for name in state_dict)
    evaluation = run_cli(
        [
            "--dataset",
            "fake",
            "--train=False",
            "--load_model_path",
            "model.pth",
            "--tta",
            "none",
            "--mixed_precision",
            "no",
        ],
        cwd=tmp_path,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    assert evaluation.accuracy() == trained.accuracy()
    from torchvision.io import write_png

    from alexnet_dist.data import fake

    write_png(fake()[1].images[0], str(tmp_path / "one.png"))
    predicted = run_cli(["--predict", "one.png", "--load_model_path", "model.pth"], cwd=tmp_path)
    assert predicted.returncode == 0 and "one.png: pattern" in predicted.stdout, predicted.stderr
    for compile in ("true", "false"):
        folder = tmp_path / f"resume_{compile}"
        copy_run_folder(tmp_path / "run", folder / "run")
        resumed = run_cli(
            [*flags, "--num_epochs", "2", "--compile", compile, "--resume", "latest", "--save", "again.pth"],
            cwd=folder,
        )
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from run/checkpoints/step-0000005" in resumed.stdout
        assert read_state(complete_checkpoints(folder / "run" / "checkpoints")[-1])["global_step"] == 10  # 2 x 5
        assert read_weights(folder / "again.pth")["state_dict"].keys() == state_dict.keys()


@pytest.mark.slow  # six epochs of the default flags: a minute or more
def test_the_default_smoke_run_learns(tmp_path):
    """The README's smoke run, with every training default: six epochs of generated data (3 optimizer steps each)
    take the loss well below ln(10) = 2.303, where a network that has not started learning sits, and the validation
    accuracy well above chance (10%)."""
    result = run_cli(["--dataset", "fake", "--num_epochs", "6", "--logger", "none", "--tta", "none"], cwd=tmp_path,
                     paper_width=True)  # the paper's network, as a user's smoke run
    assert result.returncode == 0, result.stderr
    epochs = re.findall(
        r"epoch \d/6: loss ([\d.]+), train accuracy [\d.]+%, validation accuracy ([\d.]+)%", result.stdout
    )
    losses, accuracies = [float(loss) for loss, _ in epochs], [float(accuracy) for _, accuracy in epochs]
    assert len(losses) == 6 and losses[-1] < 1.9 and losses[-1] < losses[0]
    assert accuracies[-1] > 40.0
