"""--parallel hybrid (hybrid.py): the convolutions data-parallel, fc1 and fc2 cut over every process. On 2 and 4 CPU
processes (gloo) it learns what one process learns, counts each image once, drops the same features of fc1's
gathered input on every process, and shares weights files and checkpoints with one process both ways."""

import json
import re
import shutil

import pytest
from conftest import ROOT, SAME_STEPS, assert_same_weights, copy_run_folder, run_cli

from alexnet_dist.checkpoint import complete_checkpoints, read_weights

# the one-column network, trained without randomness in float64: 5 optimizer steps; a checkpoint after step 3 (and
# the last); a weights' average, whose file and place in the checkpoints are the whole network's too
EXACT = SAME_STEPS + ["--log_freq", "1", "--checkpoint_steps", "3", "--keep_checkpoints", "2", "--ema", "0.9"]
HYBRID = ["--parallel", "hybrid"]


def train(folder, processes: int = 1):
    layout = HYBRID if processes > 1 else []
    result = run_cli(EXACT + layout + ["--save", "model.pth", "--run_dir", "run"], cwd=folder, processes=processes,
                     float64=True).ok()
    shutil.rmtree(complete_checkpoints(folder / "run" / "checkpoints")[-1])  # the last step's: 1.4 GB, never read
    return result


# session fixtures, read by the tests of one worker (xdist_group "hybrid"): each run is made once
@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """The reference: one process."""
    return train(tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="session")
def hybrid_pair(tmp_path_factory):
    """Two processes, each with the convolutions and half of fc1 and fc2."""
    return train(tmp_path_factory.mktemp("hybrid"), processes=2)


@pytest.mark.exact
@pytest.mark.xdist_group("hybrid")
@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_hybrid_learns_what_one_process_learns_and_counts_each_image_once(processes, one_process, hybrid_pair,
                                                                          tmp_path):
    result = hybrid_pair if processes == 2 else train(tmp_path, processes)
    assert (f"global batch 32 = {processes} process(es) x 1 accumulation step(s) x {32 // processes} images per "
            f"micro-batch (convolutions data-parallel; fc1 and fc2 cut {processes} ways") in result.stdout
    assert result.stdout.count("test (tta none) accuracy") == 1  # only the main process prints
    for name in ("model.pth", "model_ema.pth"):
        assert_same_weights(result.weights(name), one_process.weights(name))
    assert result.accuracy() == one_process.accuracy()
    assert result.accuracy()[2] == 200  # fake data's test images, each once (not once a process)
    assert result.losses() == one_process.losses() and len(result.losses()) == 5


@pytest.mark.exact
@pytest.mark.xdist_group("hybrid")
def test_weights_and_checkpoints_cross_between_hybrid_and_one_process(one_process, hybrid_pair, tmp_path):
    """Trained hybrid, evaluated by one process (and the other way round) with the same accuracy; a mid-epoch
    checkpoint of either layout resumes under the other and ends where an unbroken run ends."""
    reference, hybrid = one_process.cwd, hybrid_pair
    assert read_weights(hybrid.cwd / "model.pth")["architecture"] == {"groups": 1, "num_classes": 10}

    evaluate = ["--dataset", "fake", "--train=False", "--tta", "none", "--mixed_precision", "no"]
    by_one = run_cli(evaluate + ["--load_model_path", hybrid.cwd / "model.pth"], cwd=tmp_path, float64=True).ok()
    by_pair = run_cli(evaluate + HYBRID + ["--load_model_path", reference / "model.pth"], cwd=tmp_path, processes=2,
                      float64=True).ok()
    assert by_one.accuracy() == hybrid.accuracy()
    assert by_pair.accuracy() == one_process.accuracy() and by_pair.accuracy()[2] == 200

    for source, launch, processes in ((hybrid.cwd, [], 1), (reference, HYBRID, 2)):
        copy = copy_run_folder(source / "run", tmp_path / f"resumed{processes}")
        step_three = complete_checkpoints(copy / "checkpoints")[0]
        assert step_three.name == "step-0000003"
        resumed = run_cli(EXACT + launch + ["--save", f"resumed{processes}.pth", "--resume", step_three],
                          cwd=tmp_path, processes=processes, float64=True).ok()
        assert "resumed from" in resumed.stdout
        assert_same_weights(resumed.weights(f"resumed{processes}.pth"), one_process.weights())
        assert_same_weights(resumed.weights(f"resumed{processes}_ema.pth"), one_process.weights("model_ema.pth"))


@pytest.mark.exact
def test_the_parts_compute_the_whole_network_and_drop_the_same_features_of_fc1s_input(tmp_path):
    """Each process's part, placed as a run places it, against the whole network (tests/hybrid_probe.py): the
    logits of its images, and the gradients of the mean loss over every process's images, to float64 rounding, for
    both networks and with fc1 folded or not; with dropout on, every process reads the same input of fc1, its own
    images dropped by its own random stream, as a data-parallel process drops them."""
    run_cli([tmp_path], cwd=tmp_path, script=ROOT / "tests" / "hybrid_probe.py", processes=2).ok()
    for rank in (0, 1):
        figures = json.loads((tmp_path / f"hybrid{rank}.json").read_text())
        assert len(figures["exchange"]) == 3
        for case, differences in figures["exchange"].items():
            # a wrong exchange or gradient scale is off by 1e-2 or more; float64's rounding here stays near 1e-15
            assert differences["logits"] < 1e-12 and differences["gradients"] < 1e-12, (rank, case, differences)
        for case, dropped in figures["dropout"].items():
            assert dropped["same_on_every_process"] and dropped["own_images_owner_masks"], (rank, case, dropped)
            assert 0.4 < dropped["zeros"] < 0.7, (rank, case, dropped)  # dropout 0.5 acted (and ReLU's zeros)
        assert [dropped["features"] for dropped in figures["dropout"].values()] == [256 * 36, 256]


@pytest.mark.parametrize(
    "processes, flags, message",
    [
        (1, [], "--parallel hybrid cuts fc1 and fc2 over several processes: launch 2 or more"),
        (3, [], "--parallel hybrid cuts fc1's and fc2's 4096 neurons evenly over the processes: launch a number of "
                "processes that divides 4096 (2, 4, 8, ...), got 3"),
        (2, ["--batch_size", "33"], "--batch_size 33 does not split evenly into 2 process(es) x 1 accumulation "
                                    "step(s): use a multiple of 2"),
        (1, ["--predict", "x.jpg", "--load_model_path", "model.pth"],
         "--predict runs the whole network on the main process: drop --parallel hybrid"),
    ],
    ids=["one process", "three processes", "batch over processes", "predictions"],
)
def test_bad_hybrid_layouts_are_refused_in_one_line(processes, flags, message, tmp_path):
    args = ["--dataset", "fake", "--logger", "none", "--num_epochs", "1", *HYBRID, *flags]
    result = run_cli(args, cwd=tmp_path, processes=processes, in_process=processes == 1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    if processes == 1:
        assert result.returncode == 2 and "Traceback" not in result.stderr
    else:  # torchrun's own status and report are its business (1 when it stopped the others); the ranks exited 2
        assert result.returncode != 0 and re.search(r"exitcode\s*:\s*2 ", result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no weights
