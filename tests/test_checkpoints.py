"""Which checkpoints a run keeps and when it saves them, and its run folder."""


from conftest import QUICK, run_cli

from alexnet_dist.checkpoint import complete_checkpoints, read_state

# ---------------------------------------------------------------- checkpoints kept


SCORED = """\
import sys
from alexnet_dist import run
from alexnet_dist.cli import main

scores = iter([0.9, 0.5, 0.6, 0.7])  # the validation accuracy of epochs 1-4: the first is the best
run.Run.validate = lambda self: {"Accuracy/Validation": next(scores)}
main(sys.argv[1:])
"""


def test_the_newest_checkpoints_and_the_best_are_kept_and_nothing_else(tmp_path):
    """With the validation accuracies set by the test (the best at step 5, not among the newest two), a run of 4
    epochs and --keep_checkpoints 2 keeps steps 5, 15 and 20: one more or one fewer is caught."""
    script = tmp_path / "scored.py"
    script.write_text(SCORED)
    result = run_cli(QUICK + ["--num_epochs", "4", "--keep_checkpoints", "2", "--checkpoint_minutes", "0",
                              "--run_dir", "run"], cwd=tmp_path, script=script)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["step-0000005", "step-0000015", "step-0000020"]
    states = [read_state(folder / name) for name in ("step-0000005", "step-0000015", "step-0000020")]
    assert [state["val_accuracy"] for state in states] == [0.9, 0.6, 0.7]
    assert states[-1]["best_val_accuracy"] == 0.9

# ---------------------------------------------------------------- run folders and checkpoints


def test_two_runs_started_in_the_same_second_get_two_folders():
    """The preflight claims the run folder with an atomic mkdir, so a second run with the same start time (and
    name) takes the next free one instead of sharing it."""
    from alexnet_dist.cli import parse_flags
    from alexnet_dist.preflight import new_run_dir

    cfg = parse_flags(QUICK)
    first, second = new_run_dir(cfg, "20261130-120000"), new_run_dir(cfg, "20261130-120000")
    assert first.is_dir() and second.is_dir()
    assert (first.name, second.name) == ("20261130-120000_alexnet", "20261130-120000_alexnet-2")


def test_checkpoints_are_saved_when_their_minutes_have_passed_and_not_before(tmp_path):
    """--checkpoint_minutes 0.0005 (30 ms, less than a step here) saves after every optimizer step; the default
    10 minutes saves only at the end of this short run."""
    timed = run_cli(QUICK + ["--checkpoint_minutes", "0.0005", "--keep_checkpoints", "10", "--run_dir", "timed"],
                    cwd=tmp_path, in_process=True)
    assert timed.returncode == 0, timed.stderr
    assert [path.name for path in complete_checkpoints(tmp_path / "timed" / "checkpoints")] == [
        f"step-{step:07d}" for step in range(1, 6)]
    default = run_cli(QUICK + ["--keep_checkpoints", "10", "--run_dir", "default"], cwd=tmp_path, in_process=True)
    assert default.returncode == 0, default.stderr
    assert [path.name for path in complete_checkpoints(tmp_path / "default" / "checkpoints")] == ["step-0000005"]
