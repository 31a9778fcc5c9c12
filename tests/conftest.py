"""Shared helpers: run the real entry point in a subprocess, on the CPU, with W&B kept offline."""

import contextlib
import errno
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# one thread per test process, as in every run the tests launch (OMP_NUM_THREADS=1 below): `make test` runs two
# pytest workers side by side on the two cores
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
# a fake-data run of a few optimizer steps: 180 training images, batch 32, the centre crop at test time
QUICK = [
    "--dataset",
    "fake",
    "--logger",
    "none",
    "--num_epochs",
    "1",
    "--batch_size",
    "32",
    "--fraction_of_data",
    "0.2",
    "--tta",
    "none",
]
# dropout and random augmentation off (no resize margin either): every launch of the same flags takes the same
# optimizer steps, so weights can be compared across launches
NO_RANDOMNESS = ["--dropout", "0", "--flip=False", "--translate", "0", "--resize", "64", "--random_crop", "64"]


def free_port() -> int:
    """A port free now on every address (as torch's c10d store binds it), drawn below the kernel's ephemeral
    range: the ports gloo, torchrun and the other worker's sockets get without asking come from that range, so
    none of them can take this one between this probe and the run's bind (another free_port() could, one chance
    in thousands)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = range(max(1024, low - 12000), low)
    for port in random.Random().sample(candidates, min(50, len(candidates))):
        if bindable(port):
            return port
    with socket.socket() as probe:  # no room below the ephemeral range: one the kernel picks
        probe.bind(("", 0))
        return probe.getsockname()[1]


def bindable(port: int) -> bool:
    """Whether `port` can be bound on every IPv4 address, and every IPv6 one where there is IPv6."""
    families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, address in families:
        try:
            with socket.socket(family) as probe:
                probe.bind((address, port))
        except OSError as error:
            if family == socket.AF_INET6 and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):  # no IPv6
                continue
            return False
    return True


def cli_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "ACCELERATE_"))}
    env.update({"WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def run_cli(args, cwd, script=TRAIN, processes=1, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`python launch/train.py ARGS` (or torchrun with `processes` ranks) in `cwd`."""
    if processes == 1:
        command = [sys.executable, str(script), *map(str, args)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            str(script),
            *map(str, args),
        ]
    try:
        return subprocess.run(command, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:  # a loaded machine: say what the run had done by then
        def text(out):
            return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")

        output = text(error.stdout)[-3000:] + text(error.stderr)[-3000:]
        raise AssertionError(f"{' '.join(command)} ran past {timeout} s; its output so far:\n{output}") from None


def metric_rows(run_dir: Path) -> list:
    """The rows of a run folder's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def first_epoch_of(run: Path, copy: Path) -> Path:
    """A copy of a finished run's folder as it stood after its first epoch: its first checkpoint and nothing newer
    (the run kept them with --keep_checkpoints 2 --checkpoint_minutes 0). A resume from it takes the steps a
    separate first-epoch run would have handed over, without training that epoch again. The newer checkpoints
    go from the run itself too: no test reads them, and each takes 0.5-0.7 GB of disk."""
    from alexnet_dist.checkpoint import complete_checkpoints

    for newer in complete_checkpoints(run / "checkpoints")[1:]:
        shutil.rmtree(newer)
    return copy_run_folder(run, copy)


def copy_run_folder(run: Path, copy: Path) -> Path:
    """A copy of a run folder whose checkpoints' files are hard links, not copies: a run never writes into a
    checkpoint's files (it writes a new one under a temporary name, then renames it), and each is 0.5-0.7 GB.
    A CI machine's disk filled up while two resume tests ran side by side. Anything else (metrics, W&B,
    weights) is copied, since a resumed run appends to it; so is everything where links cannot be made. A
    test that damages a checkpoint's file must replace it (`replace_file`), not write into it."""

    def link_checkpoints(source, target):
        if "checkpoints" in Path(source).relative_to(run).parts:
            with contextlib.suppress(OSError):
                return os.link(source, target)
        shutil.copy2(source, target)

    shutil.copytree(run, copy, copy_function=link_checkpoints)
    return copy


def replace_file(path: Path, data: bytes):
    """Writes a new file under the name, leaving any hard link to the old one as it was."""
    path.unlink()
    path.write_bytes(data)


PAUSED_SAVE = """\
import os, sys, time
from pathlib import Path
from alexnet_dist.cli import main
rename = os.replace

def rename_late(source, target):
    if Path(source).name.startswith(".tmp-"):  # a checkpoint's temporary folder, whole, about to be published
        time.sleep({seconds})
    rename(source, target)

os.replace = rename_late
main(sys.argv[1:])
"""


def paused_save(folder: Path, seconds: float) -> Path:
    """A launch script that runs the CLI with every checkpoint held `seconds` in its temporary folder, complete,
    before the rename that publishes it: a kill or a signal sent then lands inside a save."""
    script = folder / "paused_save.py"
    script.write_text(PAUSED_SAVE.format(seconds=seconds))
    return script


# the longest tests (one minute or so each on two busy cores), started first: the two workers then end together
# instead of one of them running a long test alone at the end
LONGEST_FIRST = [
    "test_two_nodes_two_processes_and_accumulation",  # with its group: the reference run and the slurm test
    "test_slurm_script_starts_the_same_two_node_job",
    "test_kills_at_set_points",
    "test_compiled_training",
    "test_sweep_rehearsal",
    "test_resume_with_other_processes",
    "test_weight_average_is_saved",
    "test_evaluation_and_predictions_use_the_preprocessing",
    "test_resume_is_bit_identical",
    "test_smoke_rehearsal",
    "test_resume_on_two_processes",
    "test_evaluation_and_predictions_use_the_test_time_views",
    "test_ranks_draw_their_own_dropout_masks",
]


def pytest_sessionstart(session):
    import tempfile

    session.config.stash[FREE_DISK] = (tempfile.gettempdir(), shutil.disk_usage(tempfile.gettempdir()).free)


def pytest_terminal_summary(terminalreporter, config):
    """How much disk the tests had: two workers' launches held up to 4.3-5.0 GB of checkpoints and weights at once, and
    a full disk shows only as a failed save in whichever test ran out first."""
    if FREE_DISK in config.stash:
        where, free = config.stash[FREE_DISK]
        terminalreporter.write_line(f"free disk where the tests write ({where}) at the start: {free / 1e9:.1f} GB")


FREE_DISK = pytest.StashKey[tuple]()


def pytest_collection_modifyitems(items):
    def place(item):
        return next((i for i, name in enumerate(LONGEST_FIRST) if item.name.startswith(name)), len(LONGEST_FIRST))

    items.sort(key=place)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Every test runs in its own empty folder, without a tracker reaching the network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for path in tmp_path.iterdir():  # weights and checkpoints take ~0.5 GB a run: free the disk as we go
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
