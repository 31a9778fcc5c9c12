"""Two "nodes" on this machine: two torchrun launchers meeting over c10d on 127.0.0.1, or
launch/slurm.sh under a stand-in srun. They train exactly as one process does (as two processes on one
node and gradient accumulation do, resuming one process's checkpoint: the launch-invariance tests live here, beside
their one reference run), and the usual multi-node failures (a node that never comes, a taken port, other flags) stop
with a clear message within a bounded time instead of hanging.
"""

import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from conftest import (
    EXACT_ENV,
    LAUNCHER,
    NO_RANDOMNESS,
    QUICK,
    RESUMABLE,
    ROOT,
    TRAIN,
    Running,
    assert_same_weights,
    cli_env,
    copy_run_folder,
    first_epoch_of,
    free_port,
    rank_weights,
    run_cli,
)

from alexnet_dist.checkpoint import read_weights
from alexnet_dist.model import alexnet

# no randomness (dropout and augmentation off) and a schedule blind to num_epochs: every launch of these flags
# takes the same 5 optimizer steps an epoch, and a run of 1 epoch the first 5 steps of a run of 2
SAME_STEPS = RESUMABLE + NO_RANDOMNESS + ["--save", "model.pth"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LIMIT = 240  # seconds for any launch here; a training run takes ~25 s on 2 busy cores

STAND_IN_SRUN = """#!/usr/bin/env bash
# stand-in srun: one task per node, all on this machine, each with the variables SLURM gives it
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_NNODES "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
STAND_IN_SCONTROL = """#!/usr/bin/env bash
# stand-in scontrol: every node of the job is this machine
[[ "$1 $2" == "show hostnames" ]] && printf '127.0.0.1\\n127.0.0.1\\n'
"""


def node(port: int, is_host: bool, script, args, join_timeout: int = 120) -> list:
    """The per-node command of docs/distributed.md: is_host=1 on the head node makes a taken port fail there at
    once."""
    return [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"job{port}",
            "--rdzv_conf", f"join_timeout={join_timeout},is_host={int(is_host)}", script, *args]


def start(command, cwd: Path, env=None) -> Running:
    """`command` in its own process group (a kill then reaches torchrun's workers too)."""
    return Running(command, cwd, env or cli_env(), own_group=True)


def finish(launched: list, timeout: float = LIMIT) -> list:
    """(exit status, output) of each launch once all have ended; past `timeout`, kill all and fail with the output."""
    deadline = time.monotonic() + timeout
    try:
        return [(run.finish(max(deadline - time.monotonic(), 0)), run.stdout + run.stderr) for run in launched]
    finally:
        for run in launched:
            run.kill()  # nothing left to kill after a normal end


def check_succeeded(results: list):
    for status, output in results:
        assert status == 0, output


def float64_env(folder: Path) -> dict:
    """tests/launcher.py's switches: float64 (EXACT_ENV), and each rank's final weights saved into `folder`."""
    return cli_env(**EXACT_ENV, TEST_RANK_WEIGHTS=str(folder))


def assert_one_run_written(folder: Path):
    """The main process alone wrote the run folder and the weights; each rank's RNG state is in its checkpoint."""
    assert len(list((folder / "runs").iterdir())) == 1
    run = next((folder / "runs").iterdir())
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step-0000005"]
    states = sorted(path.name for path in (run / "checkpoints" / "step-0000005").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]
    assert (folder / "model.pth").is_file()


@dataclass
class Reference:
    """One process's run of SAME_STEPS for 2 epochs: the weights after its first epoch and at its end, and its run
    folder as it stood after the first epoch (for resumes)."""
    first_epoch: dict
    end: dict
    run: Path


@pytest.fixture(scope="session")  # one worker runs the tests that read it (xdist_group "one_process"): made once
def one_process(tmp_path_factory) -> Reference:
    folder = tmp_path_factory.mktemp("one_process")
    command = [sys.executable, LAUNCHER, *SAME_STEPS, "--num_epochs", "2", "--run_dir", "run", "--keep_checkpoints",
               "2"]
    [(status, output)] = finish([start(command, folder, float64_env(folder))])
    assert status == 0, output
    first_epoch_of(folder / "run", folder / "first_epoch")  # the step-5 checkpoint only
    step_five = torch.load(folder / "first_epoch" / "checkpoints" / "step-0000005" / "pytorch_model.bin",
                           weights_only=True)
    reference = Reference(step_five, rank_weights(folder), folder / "first_epoch")
    shutil.rmtree(folder / "run")  # its weights and checkpoints
    return reference


@pytest.mark.exact
@pytest.mark.xdist_group("one_process")  # on one worker, so that the reference is trained once
def test_two_nodes_learn_what_one_process_learns(tmp_path, one_process):
    """What is learned does not depend on the launch (dropout and random augmentation off): 2 nodes x 16 images
    (node 0 and node 1 in one folder, as on a shared file system) take the steps 1 x 32 takes."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    port = free_port()
    results = finish(
        [
            start(node(port, number == 0, LAUNCHER, SAME_STEPS + ["--num_epochs", "1"]), nodes,
                  float64_env(nodes))
            for number in (0, 1)
        ]
    )
    check_succeeded(results)
    assert "global batch 32 = 2 process(es) x 1 accumulation step(s) x 16 images per micro-batch" in results[0][1]
    rank0, rank1 = rank_weights(nodes, 0), rank_weights(nodes, 1)
    assert_same_weights(rank0, rank1, exact=True)  # DDP kept both nodes' copies equal
    assert_same_weights(rank0, one_process.first_epoch)
    assert_one_run_written(nodes)
    set_seed(0)
    initial = alexnet(init="kaiming").state_dict()
    moved = (one_process.first_epoch["features.0.weight"] - initial["features.0.weight"].double()).abs().max()
    assert moved > 1e-4  # the steps moved the weights far more than the tolerance of assert_same_weights


@pytest.mark.exact
@pytest.mark.xdist_group("one_process")
@pytest.mark.parametrize("processes, extra", [(2, []), (1, ["--grad_accum_steps", "2"])], ids=["two", "accumulated"])
def test_resume_with_other_processes_or_accumulation_keeps_the_training(tmp_path, one_process, processes, extra):
    """One process's checkpoint of its first epoch, resumed by 2 processes x 16 images on one node, or by 1 process
    x 2 accumulation steps x 16, ends where the one process ended."""
    copy_run_folder(one_process.run, tmp_path / "run")  # the fixture's copy holds the first epoch's checkpoint only
    resumed = run_cli(SAME_STEPS + ["--num_epochs", "2", "--run_dir", "run", "--resume", "latest", *extra],
                      cwd=tmp_path, processes=processes, float64=True, rank_weights=True).ok()
    assert "resumed from run/checkpoints/step-0000005" in resumed.stdout
    assert_same_weights(resumed.rank_weights(), one_process.end)


def slurm_env(bin_folder: Path, port: int) -> dict:
    """What sbatch gives the batch script for a 2-node job, with the stand-ins first on the PATH."""
    bin_folder.mkdir()
    for name, text in (("srun", STAND_IN_SRUN), ("scontrol", STAND_IN_SCONTROL)):
        (bin_folder / name).write_text(text)
        (bin_folder / name).chmod(0o755)
    path = os.pathsep.join([str(bin_folder), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = cli_env(
        PATH=path,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[0-1]",
        SLURM_NNODES="2",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        MASTER_PORT=str(port),
    )
    env.pop("SLURM_GPUS_ON_NODE", None)  # CPU-only "nodes": one process each
    return env


def submit_folder(tmp_path: Path, launch_script: Path = TRAIN) -> Path:
    """sbatch runs the script from the submission folder: here a folder whose launch/train.py is `launch_script`."""
    folder = tmp_path / "submitted"
    (folder / "launch").mkdir(parents=True)
    (folder / "launch" / "train.py").symlink_to(launch_script)
    return folder


@pytest.mark.exact
@pytest.mark.slow  # the two nodes' launch again, through slurm.sh (make test-slow; its refusals stay in make test)
@pytest.mark.xdist_group("one_process")  # on one worker, so that the reference is trained once
def test_slurm_script_starts_the_same_two_node_job(tmp_path, one_process):
    folder, port = submit_folder(tmp_path, LAUNCHER), free_port()  # launch/train.py in float64
    env = {**slurm_env(tmp_path / "bin", port), **EXACT_ENV}
    [(status, output)] = finish(
        [start(["bash", ROOT / "launch" / "slurm.sh", *SAME_STEPS, "--num_epochs", "1"], folder, env)]
    )
    assert status == 0, output
    breakdown = "global batch 32 = 2 process(es) x 1 accumulation step(s) x 16 images per micro-batch"
    assert output.count(breakdown) == 2  # the first process of each node prints the progress
    assert_same_weights(read_weights(folder / "model.pth")["state_dict"], one_process.first_epoch)
    assert_one_run_written(folder)


def test_a_node_that_never_comes_stops_the_one_waiting_after_the_join_timeout(tmp_path):
    [(status, output)] = finish(
        [start(node(free_port(), True, TRAIN, QUICK, join_timeout=5), tmp_path)]
    )
    assert status == 1 and output.rstrip().endswith("torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError")
    assert not (tmp_path / "runs").exists()


def test_a_taken_port_stops_the_head_node_at_once(tmp_path):
    """With a join timeout longer than the test's limit, ending at all shows that it did not wait for the other
    node."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        [(status, output)] = finish(
            [start(node(port, True, TRAIN, QUICK, join_timeout=10 * LIMIT), tmp_path)]
        )
    assert status == 1
    assert f"port: {port}" in output and "EADDRINUSE" in output
    assert "RendezvousConnectionError: The connection to the C10d store has failed" in output


def test_slurm_script_refuses_a_taken_port_before_starting_any_node(tmp_path):
    folder = submit_folder(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        [(status, output)] = finish(
            [
                start(
                    ["bash", ROOT / "launch" / "slurm.sh", *QUICK],
                    folder,
                    slurm_env(tmp_path / "bin", port),
                )
            ],
        )
    assert status == 1
    assert output == (
        f"error: port {port} on 127.0.0.1 is already taken: submit again with MASTER_PORT set to a free port\n"
    )


def test_nodes_launched_with_other_flags_stop_together_with_one_message(tmp_path):
    """Preflight compares every rank's flags with the main process's; both nodes stop, the main process says why."""
    other = [value if value != "32" else "64" for value in QUICK]  # --batch_size 64 on one node
    port = free_port()
    results = finish(  # within LIMIT, far below the 30-minute collective timeout a rank left waiting would meet
        [
            start(node(port, number == 0, TRAIN, flags), tmp_path)
            for number, flags in ((0, QUICK), (1, other))
        ]
    )
    assert [status for status, _ in results] == [1, 1]
    output = "".join(output for _, output in results)
    message = (
        "error: process 1 was launched with other flags than the main process (--batch_size {} here, {} on "
        "the main process): give every node the same command"
    )
    assert output.count(message.format(64, 32)) + output.count(message.format(32, 64)) == 1, output
    assert len(re.findall(r"exitcode\s*: 2 ", output)) == 2  # each launcher reports its process's usage-error status
    assert not (tmp_path / "runs").exists()
