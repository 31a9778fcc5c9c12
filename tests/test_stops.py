"""Stop signals through the real entry point: Ctrl-C and SIGINT stop after the step under way with a checkpoint, a
second one at once; torchrun forwards them to every rank."""

import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import NARROW, QUICK, Running, cli_env, launch, paused_save

from alexnet_dist.checkpoint import complete_checkpoints, read_state

# ---------------------------------------------------------------- stop signals

EXIT_RECORDER = """\
import os, sys
from alexnet_dist.cli import main
code = 0
try:
    main(sys.argv[1:])
except BaseException as error:
    code = getattr(error, "code", type(error).__name__)
    raise
finally:
    open(f"exit-{os.environ.get('RANK', '0')}", "w").write(str(code))
"""


def exit_recorder(folder: Path) -> Path:
    """A launch script that runs the CLI and writes each rank's exit status to exit-<rank> (torchrun hides them)."""
    script = folder / "recorded_exit.py"
    script.write_text(EXIT_RECORDER)
    return script




CTRL_C_IN_STEP_3 = """\
import signal, sys
from alexnet_dist import model
from alexnet_dist.cli import main

forward, calls = model.AlexNet.forward, []

def ctrl_c_in_step_3(self, x):
    calls.append(self.training)
    if calls.count(True) == 3:  # the third training forward pass: step 3 of 5 in the first epoch
        signal.raise_signal(signal.SIGINT)
    return forward(self, x)

model.AlexNet.forward = ctrl_c_in_step_3
main(sys.argv[1:])
"""


def test_sigint_stops_after_the_current_step_with_a_checkpoint_and_status_130(tmp_path):
    """Ctrl-C in the middle of step 3 (raised by the process itself in that step's forward pass, so that a slow
    machine cannot move it): the run finishes step 3 and stops, not at the epoch's end (step 5), with a checkpoint
    of step 3."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_IN_STEP_3)
    run = launch(QUICK + ["--num_epochs", "30", "--run_dir", "run"], tmp_path, script=script)
    assert run.finish() == 130, run.stderr
    assert "stopped by SIGINT after optimizer step 3; checkpoint run/checkpoints/step-0000003" in run.stderr
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [path.name for path in saved] == ["step-0000003"] and read_state(saved[0])["global_step"] == 3


def test_a_second_sigint_stops_at_once(tmp_path):
    run = launch(
        QUICK + ["--num_epochs", "30", "--log_freq", "1", "--run_dir", "run"],
        tmp_path,
        script=paused_save(tmp_path, 600),
    )  # the save after the first Ctrl-C takes 10 minutes
    folder = tmp_path / "run" / "checkpoints"
    run.wait_for(lambda: "step 2: training loss" in run.stdout, "step 2 printed")
    run.process.send_signal(signal.SIGINT)
    run.wait_for(
        lambda: any((path / "trainer_state.json").exists() for path in folder.glob(".tmp-*")), "the stop's save"
    )
    run.process.send_signal(signal.SIGINT)
    status = run.finish(timeout=300)  # the slow path it must not take: 600 s
    assert status == 130, run.stderr
    assert run.stderr.rstrip().splitlines()[-1] == STOPPED_AT_ONCE and "Traceback" not in run.stderr
    assert not complete_checkpoints(folder) and "stopped by SIGINT" not in run.stderr


STOPPED_AT_ONCE = "stopped at once by Ctrl-C; what was saved before it stays (checkpoints, final weights)"
PAUSED_REPORT = """\
import signal, sys, time
from alexnet_dist import run
from alexnet_dist.cli import main

signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell script's background job starts (and a test worker's child)

def paused(self, summary):
    print("the final report begins", flush=True)
    time.sleep(600)

run.Run._final_validation = paused
main(sys.argv[1:])
"""


def test_ctrl_c_during_the_final_report_stops_the_run_at_once(tmp_path):
    """The final report (every test-time mode, test, dashboard) can take minutes on a CPU: Ctrl-C ends it, with
    the final weights already saved, also in a process that started with SIGINT ignored."""
    script = tmp_path / "paused_report.py"
    script.write_text(PAUSED_REPORT)
    run = launch(QUICK + ["--save", "model.pth"], tmp_path, script=script)
    run.wait_for(lambda: "the final report begins" in run.stdout, "the final report")
    run.process.send_signal(signal.SIGINT)
    assert run.finish(timeout=300) == 130, run.stderr  # not 600 s of report
    assert run.stderr.rstrip().splitlines()[-1] == STOPPED_AT_ONCE and "Traceback" not in run.stderr
    assert (tmp_path / "model.pth").is_file()


@pytest.mark.parametrize("layout, processes", [([], 2), (["--parallel", "columns", "--groups", "2"], 2),
                                               (["--parallel", "hybrid"], 2),
                                               pytest.param(["--parallel", "hybrid"], 4, marks=pytest.mark.slow)],
                         ids=["data", "columns", "hybrid", "hybrid-4"])
def test_sigint_to_torchrun_stops_every_rank_after_the_same_step(layout, processes, tmp_path):
    """Ctrl-C reaches torchrun only (its workers run in their own sessions); it forwards SIGINT to every rank. The
    same with the two columns on the two ranks, and the hybrid's slices on 2 or 4: they stop together and save the
    whole network."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        str(exit_recorder(tmp_path)),
        *QUICK,
        "--mixed_precision",
        "no",
        "--num_epochs",
        "30",
        "--log_freq",
        "1",
        "--run_dir",
        "run",
        *layout,
    ]
    # torchrun's SIGKILL, 30 s after it forwards the signal by default, must not cut the ranks' saves short on a
    # loaded machine
    run = Running(command, tmp_path, cli_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300"))
    run.wait_for(lambda: "step 2: training loss" in run.stdout, "step 2 printed")
    run.process.send_signal(signal.SIGINT)
    run.finish()  # torchrun's own status after a signal is its business (1)
    assert [(tmp_path / f"exit-{rank}").read_text() for rank in range(processes)] == ["130"] * processes, run.stderr
    step = int(re.search(r"stopped by SIGINT after optimizer step (\d+);", run.stderr).group(1))
    assert step % 5 == 0  # the ranks compare notes at epoch ends (5 steps) and every 10 steps
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [path.name for path in saved] == [f"step-{step:07d}"] and read_state(saved[0])["global_step"] == step
    assert all((saved[0] / f"random_states_{rank}.pkl").is_file() for rank in range(processes))  # each saved it
    if layout:  # the whole network's weights and momenta, gathered from both processes, not rank 0's part
        weights = torch.load(saved[0] / "pytorch_model.bin", weights_only=True)
        momenta = torch.load(saved[0] / "optimizer.bin", weights_only=True)["state"]
        momentum_shapes = [entry["momentum_buffer"].shape for entry in momenta.values()]
        conv1, fc1 = weights["features.0.weight"], weights["classifier.1.weight"]
        assert conv1.shape[0] == (96 if "columns" in layout else 64) and fc1.shape[0] == NARROW
        assert conv1.shape in momentum_shapes and fc1.shape in momentum_shapes
