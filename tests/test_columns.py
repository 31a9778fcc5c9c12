"""--parallel columns (columns.py): the paper's two columns on a pair of CPU processes (gloo) learn what one process
learns with --groups 2, count each image once, and share weights files and checkpoints with it both ways."""

import re

import pytest
import torch
from conftest import copy_run_folder, run_cli

from alexnet_dist.checkpoint import complete_checkpoints, read_weights

# no dropout, no augmentation, fp32: the layouts then differ only by float rounding. 180 training images at
# batch 32: 5 optimizer steps; a checkpoint every 2 steps; a weights' average (its file, model_ema.pth, and its
# place in the checkpoints are the whole network's too)
EXACT = ["--dataset", "fake", "--logger", "none", "--num_epochs", "1", "--fraction_of_data", "0.2",
         "--batch_size", "32", "--mixed_precision", "no", "--dropout", "0", "--noflip", "--translate", "0",
         "--resize", "64", "--random_crop", "64", "--groups", "2", "--tta", "none", "--log_freq", "1",
         "--checkpoint_steps", "2", "--keep_checkpoints", "5", "--ema", "0.9"]
COLUMNS = ["--parallel", "columns"]


def printed_test_accuracy(output: str) -> tuple:
    """(accuracy text, images counted) of the printed test accuracy."""
    found = re.search(r"test \(tta none\) accuracy ([\d.]+)% \(\d+/(\d+) images\)", output)
    return found.group(1), int(found.group(2))


def assert_same_weights(first, second):
    one, other = read_weights(first)["state_dict"], read_weights(second)["state_dict"]
    assert one.keys() == other.keys()
    for name in one:
        torch.testing.assert_close(one[name], other[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with --groups 2."""
    folder = tmp_path_factory.mktemp("one")
    result = run_cli(EXACT + ["--save", "model.pth", "--run_dir", "run"], cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, result


@pytest.mark.parametrize("processes", [2, 4])
def test_columns_learn_what_one_process_learns_and_count_each_image_once(processes, one_process, tmp_path):
    reference, single = one_process
    result = run_cli(EXACT + COLUMNS + ["--save", "model.pth", "--run_dir", "run"], cwd=tmp_path,
                     processes=processes)
    assert result.returncode == 0, result.stderr
    pairs = processes // 2
    assert f"global batch 32 = {pairs} pair(s) of column processes x 1 accumulation step(s) x {32 // pairs} images" \
        in result.stdout
    assert result.stdout.count("test (tta none) accuracy") == 1  # only the main process prints
    for name in ("model.pth", "model_ema.pth"):
        assert_same_weights(tmp_path / name, reference / name)
    assert printed_test_accuracy(result.stdout) == printed_test_accuracy(single.stdout)
    assert printed_test_accuracy(result.stdout)[1] == 200  # fake data's test images, each once (not once a column)
    losses = [line.split(",")[0] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert losses == [line.split(",")[0] for line in single.stdout.splitlines() if line.startswith("step ")]


def test_weights_and_checkpoints_cross_between_the_layouts(one_process, tmp_path):
    """Trained with columns, evaluated by one process (and the other way round) with the same accuracy; a
    mid-epoch checkpoint of either layout resumes under the other and ends where an unbroken run ends."""
    reference, single = one_process
    columns = run_cli(EXACT + COLUMNS + ["--save", "model.pth", "--run_dir", "run"], cwd=tmp_path, processes=2)
    assert columns.returncode == 0, columns.stderr
    assert read_weights(tmp_path / "model.pth")["architecture"] == {"groups": 2, "num_classes": 10}

    evaluate = ["--dataset", "fake", "--train=False", "--tta", "none", "--mixed_precision", "no"]
    by_one = run_cli(evaluate + ["--load_model_path", tmp_path / "model.pth"], cwd=tmp_path)
    by_pair = run_cli(evaluate + COLUMNS + ["--groups", "2", "--load_model_path", reference / "model.pth"],
                      cwd=tmp_path, processes=2)
    assert by_one.returncode == 0 and by_pair.returncode == 0, by_one.stderr + by_pair.stderr
    assert printed_test_accuracy(by_one.stdout) == printed_test_accuracy(columns.stdout)
    assert printed_test_accuracy(by_pair.stdout) == printed_test_accuracy(single.stdout)

    for source, launch, processes in ((tmp_path, [], 1), (reference, COLUMNS, 2)):
        copy = copy_run_folder(source / "run", tmp_path / f"resumed{processes}")
        step_two = complete_checkpoints(copy / "checkpoints")[0]
        assert step_two.name == "step-0000002"
        resumed = run_cli(EXACT + launch + ["--save", f"resumed{processes}.pth", "--resume", step_two],
                          cwd=tmp_path, processes=processes)
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from" in resumed.stdout
        assert_same_weights(tmp_path / f"resumed{processes}.pth", reference / "model.pth")
        assert_same_weights(tmp_path / f"resumed{processes}_ema.pth", reference / "model_ema.pth")


@pytest.mark.parametrize(
    "processes, flags, message",
    [
        (1, COLUMNS + ["--groups", "2"], "--parallel columns puts the two columns on a pair of processes: launch an "
                                         "even number of processes, got 1"),
        (1, COLUMNS + ["--groups", "1"], "--parallel columns splits the paper's two-column network over a pair of "
                                         "processes: add --groups 2"),
        (4, COLUMNS + ["--groups", "2", "--batch_size", "33"], "--batch_size 33 does not split evenly into 2 pair(s) "
                                                               "of column processes x 1 accumulation step(s)"),
    ],
    ids=["odd processes", "groups 1", "batch over pairs"],
)
def test_bad_column_layouts_are_refused_in_one_line(processes, flags, message, tmp_path):
    result = run_cli(["--dataset", "fake", "--logger", "none", "--num_epochs", "1", *flags], cwd=tmp_path,
                     processes=processes)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    if processes == 1:
        assert result.returncode == 2 and "Traceback" not in result.stderr
    else:  # torchrun's own status and report are its business (1 when it stopped the others); the ranks exited 2
        assert result.returncode != 0 and re.search(r"exitcode\s*:\s*2 ", result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no weights


def test_predictions_under_columns_are_one_process_predictions(one_process, tmp_path):
    """--predict launched with --parallel columns on 2 processes gives one process's probabilities for the same
    weights, written once."""
    import json

    from PIL import Image

    reference, _ = one_process
    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(3):
        pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(images / f"image{index}.png")
    predict = ["--predict", images, "--load_model_path", reference / "model.pth", "--mixed_precision", "no",
               "--tta", "ten", "--top_k", "10"]
    single = run_cli(predict + ["--predict_json", "one.json"], cwd=tmp_path)
    pair = run_cli(predict + COLUMNS + ["--groups", "2", "--predict_json", "pair.json"], cwd=tmp_path, processes=2)
    assert single.returncode == 0 and pair.returncode == 0, single.stderr + pair.stderr
    assert pair.stdout.count("image0.png:") == 1  # only the main process prints
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "pair.json"))
    assert [row["file"] for row in one] == [row["file"] for row in two] and len(one) == 3
    for first, second in zip(one, two):
        for a, b in zip(first["top"], second["top"]):
            assert a["class"] == b["class"] and abs(a["probability"] - b["probability"]) < 1e-5
