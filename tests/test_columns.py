"""--parallel columns (columns.py): the paper's two columns on a pair of CPU processes (gloo) learn what one process
learns with --groups 2, count each image once, and share weights files and checkpoints with it both ways."""

import re
import shutil

import pytest
from conftest import SAME_STEPS, assert_same_weights, copy_run_folder, run_cli

from alexnet_dist.checkpoint import complete_checkpoints, read_weights

# the paper's two columns, trained without randomness in float64 (the layouts then differ only by float64's
# rounding): 5 optimizer steps; a checkpoint after step 3 (and the last); a weights' average (its file,
# model_ema.pth, and its place in the checkpoints are the whole network's too)
EXACT = SAME_STEPS + ["--groups", "2", "--log_freq", "1", "--checkpoint_steps", "3", "--keep_checkpoints", "2",
                      "--ema", "0.9"]
COLUMNS = ["--parallel", "columns"]


def train(folder, processes: int = 1):
    layout = COLUMNS if processes > 1 else []
    result = run_cli(EXACT + layout + ["--save", "model.pth", "--run_dir", "run"], cwd=folder, processes=processes,
                     float64=True).ok()
    shutil.rmtree(complete_checkpoints(folder / "run" / "checkpoints")[-1])  # the last step's: 1.5 GB, never read
    return result


# session fixtures, read by the tests of one worker (xdist_group "columns"): each run is made once
@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """The reference: one process with --groups 2."""
    return train(tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="session")
def column_pair(tmp_path_factory):
    """The two columns on a pair of processes."""
    return train(tmp_path_factory.mktemp("pair"), processes=2)


@pytest.mark.exact
@pytest.mark.xdist_group("columns")
@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: pairs data-parallel
def test_columns_learn_what_one_process_learns_and_count_each_image_once(processes, one_process, column_pair,
                                                                          tmp_path):
    result = column_pair if processes == 2 else train(tmp_path, processes)
    pairs = processes // 2
    assert f"global batch 32 = {pairs} pair(s) of column processes x 1 accumulation step(s) x {32 // pairs} images" \
        in result.stdout
    assert result.stdout.count("test (tta none) accuracy") == 1  # only the main process prints
    for name in ("model.pth", "model_ema.pth"):
        assert_same_weights(result.weights(name), one_process.weights(name))
    assert result.accuracy() == one_process.accuracy()
    assert result.accuracy()[2] == 200  # fake data's test images, each once (not once a column)
    assert result.losses() == one_process.losses() and len(result.losses()) == 5


@pytest.mark.exact
@pytest.mark.xdist_group("columns")
def test_weights_and_checkpoints_cross_between_the_layouts(one_process, column_pair, tmp_path):
    """One process's weights file evaluated by a pair of columns with the same accuracy (a columns run's file is one
    process's: the test above); a mid-epoch checkpoint of either layout resumes under the other and ends where an
    unbroken run ends, and evaluates as it does."""
    reference, columns = one_process.cwd, column_pair
    assert read_weights(columns.cwd / "model.pth")["architecture"] == {"groups": 2, "num_classes": 10}

    evaluate = ["--dataset", "fake", "--train=False", "--tta", "none", "--mixed_precision", "no"]
    by_pair = run_cli(evaluate + COLUMNS + ["--groups", "2", "--load_model_path", reference / "model.pth"],
                      cwd=tmp_path, processes=2, float64=True).ok()
    assert by_pair.accuracy() == one_process.accuracy()

    for source, launch, processes in ((columns.cwd, [], 1), (reference, COLUMNS, 2)):
        copy = copy_run_folder(source / "run", tmp_path / f"resumed{processes}")
        step_three = complete_checkpoints(copy / "checkpoints")[0]
        assert step_three.name == "step-0000003"
        resumed = run_cli(EXACT + launch + ["--save", f"resumed{processes}.pth", "--resume", step_three],
                          cwd=tmp_path, processes=processes, float64=True).ok()
        assert "resumed from" in resumed.stdout and resumed.accuracy() == one_process.accuracy()
        assert_same_weights(resumed.weights(f"resumed{processes}.pth"), one_process.weights())
        assert_same_weights(resumed.weights(f"resumed{processes}_ema.pth"), one_process.weights("model_ema.pth"))


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


