"""Shared helpers: run the real entry point in a subprocess, on the CPU, with W&B kept offline."""

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# one thread per test process, as in every run the tests launch (OMP_NUM_THREADS=1 below): `make test` runs two
# pytest workers side by side on the two cores
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
LAUNCHER = ROOT / "tests" / "launcher.py"
# a fake-data run of 5 optimizer steps: of the 1,000 training images 20 held out for validation and 180 of the rest
# trained on (0.1837 x 980), batch 32, the centre crop at test time. The final report evaluates the validation
# images in every test-time mode (13 views each): 20 of them, not the default 100, halve a launch's time.
QUICK = ["--dataset", "fake", "--logger", "none", "--num_epochs", "1", "--batch_size", "32", "--val_size", "0.02",
         "--fraction_of_data", "0.1837", "--tta", "none"]
# dropout and random augmentation off (no resize margin either): every launch of the same flags takes the same
# optimizer steps, so weights can be compared across launches
NO_RANDOMNESS = ["--dropout", "0", "--flip=False", "--translate", "0", "--resize", "64", "--random_crop", "64"]
# an image folder written by write_image_folder, in `images`
FOLDER = ["--dataset", "folder", "--data_dir", "images", "--batch_size", "32", "--num_epochs", "1", "--logger", "none",
          "--mixed_precision", "no", "--tta", "none"]


def with_values(flags: list, values: dict) -> list:
    """`flags` with the values of some of them replaced ({"--val_size": "0.005"})."""
    return [values.get(flags[index - 1], flag) if index else flag for index, flag in enumerate(flags)]


# every launch takes the same 5 optimizer steps: weights compare across processes, nodes and accumulation (in float64).
# The same 180 training images as QUICK (of 995), but 5 validation images: the final report evaluates them in 13 views
# with each of the weights, and in float64 the 20 images' 520 forward passes took longer than the 5 steps of training.
SAME_STEPS = with_values(QUICK, {"--val_size": "0.005", "--fraction_of_data": "0.1809"}) + NO_RANDOMNESS + [
    "--init", "kaiming", "--mixed_precision", "no"]
# a schedule blind to num_epochs (a resume may add epochs), fp32 and a checkpoint at every epoch's end: the runs the
# resume tests stop, resume and compare
RESUMABLE = QUICK + ["--init", "kaiming", "--schedule", "plateau", "--mixed_precision", "no", "--checkpoint_minutes",
                     "0"]


# tests/launcher.py's switch for the exactness tests: float64 (its docstring says why)
EXACT_ENV = {"TEST_FLOAT64": "1"}
# The runs the tests launch or call train AlexNet with fc1 and fc2 of NARROW neurons (tests/narrow/sitecustomize.py
# says why); PAPER_WIDTH, added to cli_env, launches the paper's 4096
NARROW, PAPER = 512, 4096
PAPER_WIDTH = {"TEST_HIDDEN": ""}  # sitecustomize.py then leaves the launch as a user's


@contextlib.contextmanager
def narrow_network(width: int = NARROW):
    """Within: networks built in this process have fc1 and fc2 of `width` neurons, as in the runs the tests launch
    (for weights files that those runs load, and for runs called in this process)."""
    import alexnet_dist.model

    paper = alexnet_dist.model.HIDDEN
    alexnet_dist.model.HIDDEN = width
    try:
        yield
    finally:
        alexnet_dist.model.HIDDEN = paper


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
    narrow = str(ROOT / "tests" / "narrow")  # its sitecustomize.py narrows the network to TEST_HIDDEN
    env.update({"WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                "TEST_HIDDEN": str(NARROW), "PYTHONPATH": os.pathsep.join([str(ROOT), narrow])})
    env.update(extra)
    return env


@dataclass
class Result:
    """A finished launch: its status and output, and what it wrote, read from its files."""
    command: list
    cwd: Path
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> "Result":
        assert self.returncode == 0, f"{' '.join(self.command)} exited {self.returncode}:\n{self.stderr[-3000:]}"
        return self

    def accuracy(self, title: str = "test (tta none)") -> tuple:
        """(percent as printed, images right, images counted) of the report's 'TITLE accuracy' line."""
        found = re.search(re.escape(title) + r" accuracy ([\d.]+)% \((\d+)/(\d+) images\)", self.stdout)
        assert found, f"no '{title} accuracy' in:\n{self.stdout[-3000:]}"
        return found.group(1), int(found.group(2)), int(found.group(3))

    def weights(self, name="model.pth") -> dict:
        """The state dict of a weights file the run wrote (relative to its folder)."""
        from alexnet_dist.checkpoint import read_weights

        return read_weights(self.cwd / name)["state_dict"]

    def rank_weights(self, rank: int = 0) -> dict:
        """The weights rank `rank` held at the end (launched with rank_weights=True)."""
        return rank_weights(self.cwd, rank)

    def losses(self) -> list:
        """The printed training losses, one per log point."""
        return re.findall(r"^step \d+: training loss ([\d.]+)", self.stdout, flags=re.M)


def rank_weights(folder: Path, rank: int = 0) -> dict:
    """The weights that rank `rank` of a launch through tests/launcher.py (TEST_RANK_WEIGHTS=folder) ended with."""
    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


def run_cli(args, cwd, script=TRAIN, processes=1, env=None, timeout=600, float64=False,
            rank_weights=False, in_process=False, paper_width=False) -> Result:
    """`python launch/train.py ARGS` (or torchrun with `processes` ranks) in `cwd`. `float64`: the network in
    double precision (EXACT_ENV), for the exactness tests; `rank_weights`: every rank saves the weights
    it ends with (both through tests/launcher.py). `in_process`: the entry point called in this test process
    instead, without an interpreter to start and torch to import (4 s of a 13 s launch), for tests of what a run
    does, not of how a process starts, ends or takes signals. `paper_width`: the paper's fc1 and fc2 of 4096
    neurons, not the tests' NARROW."""
    if in_process:
        assert script == TRAIN and processes == 1 and env is None and not (float64 or rank_weights)
        return run_here(args, cwd, PAPER if paper_width else NARROW)
    env = {**(env or cli_env()), **(PAPER_WIDTH if paper_width else {})}
    if float64 or rank_weights:
        assert script == TRAIN, "the launcher runs launch/train.py's entry point only"
        script = LAUNCHER
        env.update(EXACT_ENV if float64 else {})
        env.update({"TEST_RANK_WEIGHTS": str(cwd)} if rank_weights else {})
    if processes == 1:
        command = [sys.executable, str(script), *map(str, args)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(script), *map(str, args)]
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:  # a loaded machine: say what the run had done by then
        def text(out):
            return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")

        output = text(error.stdout)[-3000:] + text(error.stderr)[-3000:]
        raise AssertionError(f"{' '.join(command)} ran past {timeout} s; its output so far:\n{output}") from None
    return Result(command, Path(cwd), done.returncode, done.stdout, done.stderr)


class Running:
    """A launch whose output is read as it comes, so that a test waits for a line or a file instead of sleeping
    blindly, then signals or kills it."""

    def __init__(self, command: list, cwd, env: dict, own_group: bool = False):
        """`own_group`: in a process group of its own, as a terminal's foreground job (Ctrl-C: os.killpg)."""
        self.own_group = own_group
        self.process = subprocess.Popen([str(part) for part in command], cwd=cwd,
                                        env={**env, "PYTHONUNBUFFERED": "1"}, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=own_group)
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list):
        for line in stream:
            lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def _fail(self, why: str):
        self.kill()
        raise AssertionError(f"{why}\n--- stdout:\n{self.stdout[-3000:]}\n--- stderr:\n{self.stderr[-3000:]}")

    def wait_for(self, condition, what: str, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                self._fail(f"ended (status {self.process.returncode}) before {what}")
            if time.monotonic() > deadline:
                self._fail(f"no {what} within {timeout} s")
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"still running after {timeout} s")
        for reader in self.readers:
            reader.join(timeout=10)
        return self.process.returncode

    def kill(self):
        """SIGKILL to the process (to its whole group, if it has its own: torchrun's workers too); then its output."""
        if self.own_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.kill()
        self.process.wait()
        for reader in self.readers:
            reader.join(timeout=10)


def launch(args, cwd, env=None, script=TRAIN) -> Running:
    """`python SCRIPT ARGS` in `cwd`, running on while the test watches it."""
    return Running([sys.executable, str(script), *map(str, args)], cwd, env or cli_env())


def launch_ranks(args, cwd, processes: int = 2, script=TRAIN) -> list:
    """Each rank as its own process (the environment torchrun would set), so that each one's status is seen."""
    port = free_port()
    return [launch(args, cwd, cli_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                                      LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                   script=script)
            for rank in range(processes)]


def run_here(args, cwd, width: int = NARROW) -> Result:
    """launch/train.py's main(ARGS) in this process, in `cwd`, its output captured and its exit status kept; the
    process-wide state a run leaves (Accelerate's, the current folder) is reset around it. fc1 and fc2 of `width`
    neurons, as in the runs the tests launch."""
    from accelerate.state import AcceleratorState, GradientState

    from alexnet_dist.cli import main

    args, out, err, status = [str(arg) for arg in args], io.StringIO(), io.StringIO(), 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), narrow_network(width):
            main(args)
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(previous)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return Result(["main", *args], Path(cwd), status, out.getvalue(), err.getvalue())


def assert_same_weights(first: dict, second: dict, exact: bool = False):
    """The same keys and, name by name, the same values: bit for bit (`exact`, the same computation repeated), or
    to float64 rounding (the same training computed another way: other processes, layouts or accumulation, in
    float64). A wrong exchange or a lost step moves weights by 1e-4 or more; float64's rounding after a few steps
    stays below 1e-14 of a weight."""
    assert first.keys() == second.keys()
    for name in first:
        if exact:
            assert torch.equal(first[name], second[name]), name
        else:
            assert first[name].dtype == torch.float64, f"{name}: compare launches in float64 (run_cli(float64=True))"
            torch.testing.assert_close(first[name], second[name], rtol=1e-9, atol=1e-12, msg=name)


def assert_refused_in_one_line(result: Result, processes: int, message: str, folder: Path):
    """Bad input: one `error:` line holding `message`, status 2 (under torchrun: each rank's), nothing written."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    if processes == 1:
        assert result.returncode == 2 and "Traceback" not in result.stderr
    else:  # torchrun's own status and report are its business (1 when it stopped the others); the ranks exited 2
        assert result.returncode != 0 and re.search(r"exitcode\s*:\s*2 ", result.stderr), result.stderr
    assert list(folder.iterdir()) == []  # no run folder, no weights


def write_image_folder(root: Path, split: str, imageset, classes, count: int) -> list:
    """The first `count` images of `imageset` as PNGs under root/split/<class>/; their paths."""
    from torchvision.io import write_png

    paths = []
    for index in range(count):
        folder = root / split / classes[int(imageset.labels[index])]
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{index}.png")
        write_png(imageset.images[index], str(paths[-1]))
    return paths


def metric_rows(run_dir: Path) -> list:
    """The rows of a run folder's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def first_epoch_of(run: Path, copy: Path) -> Path:
    """A copy of a finished run's folder as it stood after its first epoch: its first checkpoint and nothing newer
    (the run kept them with --keep_checkpoints 2 --checkpoint_minutes 0). A resume from it takes the steps a
    separate first-epoch run would have handed over, without training that epoch again. The newer checkpoints
    go from the run itself too: no test reads them, and each takes 0.06-0.2 GB of disk
    (the narrow network's, fp32 or float64)."""
    from alexnet_dist.checkpoint import complete_checkpoints

    for newer in complete_checkpoints(run / "checkpoints")[1:]:
        shutil.rmtree(newer)
    return copy_run_folder(run, copy)


def copy_run_folder(run: Path, copy: Path) -> Path:
    """A copy of a run folder whose checkpoints' files are hard links, not copies: a run never writes into a
    checkpoint's files (it writes a new one under a temporary name, then renames it), and each was 0.5-0.7 GB at
    the paper's width. A CI machine's disk filled up while two resume tests ran side by side. Anything else
    (metrics, W&B, weights) is copied, since a resumed run appends to it; so is everything where links cannot be
    made. A test that damages a checkpoint's file must replace it (`replace_file`), not write into it."""

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
    "test_split_layouts_learn_what_one_process_learns",  # with its group: the one-process, columns and hybrid runs
    "test_weights_and_checkpoints_cross_between_the_layouts",
    "test_two_nodes_learn_what_one_process_learns",  # with its group: the reference run, resumes and the slurm test
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
    """How much disk the tests had: two workers' launches held up to 4.3-5.0 GB of checkpoints and weights at once (at
    the paper's width), and
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
    for path in tmp_path.iterdir():  # weights and checkpoints take up to 0.5 GB a run: free the disk as we go
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
