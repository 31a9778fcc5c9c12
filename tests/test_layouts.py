"""The split layouts (layouts.py) learn what one process learns, and their weights files and checkpoints cross.

The paper's two-column network (--groups 2) on one process is the reference: the columns (columns.py, a pair of
processes) and Krizhevsky's hybrid (hybrid.py: the convolutions data-parallel, fc1 and fc2 cut over the processes)
each train it on 2 CPU processes (gloo) to the same weights, to float64 rounding, and count each test image once.
A checkpoint of each layout resumes under the next (one process -> hybrid -> columns -> one process) and ends where
the unbroken run ends. tests/test_hybrid.py checks the hybrid's parts against the whole network, one-column network
included, and trains that network on 4 processes.
"""

import shutil

import pytest
from conftest import SAME_STEPS, assert_same_weights, copy_run_folder, run_cli
from launcher import FLOAT64_TEST_IMAGES

from alexnet_dist.checkpoint import complete_checkpoints, read_weights

# trained without randomness in float64 (the layouts then differ only by float64's rounding): 5 optimizer steps; a
# checkpoint after step 3 (and the last); a weights' average (its file, model_ema.pth, and its place in the
# checkpoints are the whole network's too)
EXACT = SAME_STEPS + ["--log_freq", "1", "--checkpoint_steps", "3", "--keep_checkpoints", "2", "--ema", "0.9"]
TWO_COLUMNS = EXACT + ["--groups", "2"]
LAYOUTS = {"one": (1, []), "columns": (2, ["--parallel", "columns"]), "hybrid": (2, ["--parallel", "hybrid"])}
BREAKDOWN = {  # the batch line of each layout on 2 and 4 processes
    ("columns", 2): "global batch 32 = 1 pair(s) of column processes x 1 accumulation step(s) x 32 images",
    ("columns", 4): "global batch 32 = 2 pair(s) of column processes x 1 accumulation step(s) x 16 images",
    ("hybrid", 2): "global batch 32 = 2 process(es) x 1 accumulation step(s) x 16 images per micro-batch "
                   "(convolutions data-parallel; fc1 and fc2 cut 2 ways",
}


def train(folder, layout: str = "one", processes: int | None = None, flags=TWO_COLUMNS):
    """A float64 run of `flags` under `layout`; the last step's checkpoint (never read) removed."""
    default_processes, launch = LAYOUTS[layout]
    result = run_cli(flags + launch + ["--save", "model.pth", "--run_dir", "run"], cwd=folder,
                     processes=processes or default_processes, float64=True).ok()
    shutil.rmtree(complete_checkpoints(folder / "run" / "checkpoints")[-1])
    return result


def assert_learns_what_one_process_learns(result, reference):
    assert result.stdout.count("test (tta none) accuracy") == 1  # only the main process prints
    for name in ("model.pth", "model_ema.pth"):
        assert_same_weights(result.weights(name), reference.weights(name))
    assert result.accuracy() == reference.accuracy()
    assert result.accuracy()[2] == FLOAT64_TEST_IMAGES  # fake data's test images, each once (not once a process)
    assert result.losses() == reference.losses() and len(result.losses()) == 5


# session fixtures, read by the tests of one worker (xdist_group "layouts"): each run is made once
@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """layout -> its run of TWO_COLUMNS, made when a test first asks for it."""
    runs = {}

    def run_of(layout: str):
        if layout not in runs:
            runs[layout] = train(tmp_path_factory.mktemp(layout), layout)
        return runs[layout]

    return run_of


@pytest.mark.exact
@pytest.mark.xdist_group("layouts")
@pytest.mark.parametrize("layout, processes", [("columns", 2), ("hybrid", 2),
                                               pytest.param("columns", 4, marks=pytest.mark.slow)])
def test_split_layouts_learn_what_one_process_learns_and_count_each_image_once(layout, processes, trained,
                                                                               tmp_path):
    result = trained(layout) if processes == 2 else train(tmp_path, layout, processes)
    assert BREAKDOWN[layout, processes] in result.stdout
    assert_learns_what_one_process_learns(result, trained("one"))


@pytest.mark.exact
@pytest.mark.slow  # four float64 launches, three on 2 processes: two minutes of a worker (make test-slow runs it)
@pytest.mark.xdist_group("layouts")
def test_weights_and_checkpoints_cross_between_the_layouts(trained, tmp_path):
    """One process's weights file evaluated by a pair of columns with the same accuracy (each layout's file is one
    process's: the test above); the step-3 checkpoint of each layout resumes under the next and ends, and
    evaluates, as the unbroken run."""
    reference = trained("one")
    assert read_weights(trained("hybrid").cwd / "model.pth")["architecture"] == {"groups": 2, "num_classes": 10}
    evaluate = ["--dataset", "fake", "--train=False", "--tta", "none", "--mixed_precision", "no", "--groups", "2"]
    by_pair = run_cli(evaluate + LAYOUTS["columns"][1] + ["--load_model_path", reference.cwd / "model.pth"],
                      cwd=tmp_path, processes=2, float64=True).ok()
    assert by_pair.accuracy() == reference.accuracy()

    for source, layout in (("one", "hybrid"), ("hybrid", "columns"), ("columns", "one")):
        copy = copy_run_folder(trained(source).cwd / "run", tmp_path / f"{source}_to_{layout}")
        step_three = complete_checkpoints(copy / "checkpoints")[0]
        assert step_three.name == "step-0000003"
        processes, launch = LAYOUTS[layout]
        resumed = run_cli(TWO_COLUMNS + launch + ["--save", f"{layout}.pth", "--resume", step_three], cwd=tmp_path,
                          processes=processes, float64=True).ok()
        assert "resumed from" in resumed.stdout and resumed.accuracy() == reference.accuracy(), (source, layout)
        assert_same_weights(resumed.weights(f"{layout}.pth"), reference.weights())
        assert_same_weights(resumed.weights(f"{layout}_ema.pth"), reference.weights("model_ema.pth"))
