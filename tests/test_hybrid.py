"""--parallel hybrid (hybrid.py): the convolutions data-parallel, fc1 and fc2 cut over every process. Each process's
part computes what the whole network computes, with fc1's input dropped alike on every process (the columns' too);
the one-column network on 4 CPU processes (gloo) learns what one process learns, and checkpoints cross between the
two; what it cannot run is refused in one line.
tests/test_layouts.py trains the two-column network under it and crosses its checkpoints with the other layouts'."""

import json

import pytest
from conftest import ROOT, assert_refused_in_one_line, assert_same_weights, copy_run_folder, run_cli
from test_layouts import EXACT, assert_learns_what_one_process_learns, train

from alexnet_dist.checkpoint import complete_checkpoints

HYBRID = ["--parallel", "hybrid"]


@pytest.mark.exact
@pytest.mark.slow  # four float64 runs of their own, two on 4 processes
def test_the_one_column_network_on_4_processes_learns_what_one_process_learns_and_resumes_its_checkpoints(tmp_path):
    """The hybrid on 4 processes ends where one process ends; the step-3 checkpoint of either resumes under the
    other and ends there too."""
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    reference = train(tmp_path / "one", flags=EXACT)
    result = train(tmp_path / "four", "hybrid", processes=4, flags=EXACT)
    assert ("global batch 32 = 4 process(es) x 1 accumulation step(s) x 8 images per micro-batch (convolutions "
            "data-parallel; fc1 and fc2 cut 4 ways") in result.stdout
    assert_learns_what_one_process_learns(result, reference)
    for source, processes, launch in (("one", 4, HYBRID), ("four", 1, [])):
        copy = copy_run_folder(tmp_path / source / "run", tmp_path / f"{source}_resumed")
        step_three = complete_checkpoints(copy / "checkpoints")[0]
        assert step_three.name == "step-0000003"
        resumed = run_cli(EXACT + launch + ["--save", "resumed.pth", "--resume", step_three], cwd=tmp_path,
                          processes=processes, float64=True).ok()
        assert "resumed from" in resumed.stdout and resumed.accuracy() == reference.accuracy(), source
        assert_same_weights(resumed.weights("resumed.pth"), reference.weights())
        assert_same_weights(resumed.weights("resumed_ema.pth"), reference.weights("model_ema.pth"))


@pytest.mark.exact
def test_the_parts_compute_the_whole_network_and_drop_the_same_features_of_fc1s_input(tmp_path):
    """Each process's part, placed as a run places it, against the whole network (tests/hybrid_probe.py): the
    logits of its images, and the gradients of the mean loss over every process's images, to float64 rounding, for
    both networks and with fc1 folded or not. With dropout on, under the hybrid and under a pair of columns, every
    process reads the same input of fc1, its own part of it dropped as its own random stream decides, and only
    conv5's 256 values an image cross before fc1, not the 9,216 that the 6x6 pooling makes of them."""
    run_cli([tmp_path], cwd=tmp_path, script=ROOT / "tests" / "hybrid_probe.py", processes=2).ok()
    for rank in (0, 1):
        figures = json.loads((tmp_path / f"hybrid{rank}.json").read_text())
        assert len(figures["exchange"]) == 3
        for case, differences in figures["exchange"].items():
            # a wrong exchange or gradient scale is off by 1e-2 or more; float64's rounding here stays near 1e-15
            assert differences["logits"] < 1e-12 and differences["gradients"] < 1e-12, (rank, case, differences)
        assert len(figures["dropout"]) == 4
        for case, dropped in figures["dropout"].items():
            assert dropped["same_on_every_process"] and dropped["own_part_owner_masks"], (rank, case, dropped)
            assert 0.4 < dropped["zeros"] < 0.7, (rank, case, dropped)  # dropout 0.5 acted (and ReLU's zeros)
            folded = case.endswith("True")
            assert dropped["features"] == (256 if folded else 256 * 36), (rank, case, dropped)
            # this process's part of conv5's 1x1 maps (2 images x 256 channels, or 4 images x a column's 128) to
            # the other process, in float64, and its 8-byte seed where the copies are dropped after the exchange
            assert dropped["maps"] == ([2, 256, 1, 1] if case.startswith("hybrid") else [4, 128, 1, 1])
            assert dropped["bytes_sent"] == 512 * 8 + (0 if folded else 8), (rank, case, dropped)


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
    # the paper's 4096 neurons in the message (the processes refuse before they build a network)
    result = run_cli(args, cwd=tmp_path, processes=processes, in_process=processes == 1, paper_width=True)
    assert_refused_in_one_line(result, processes, message, tmp_path)
