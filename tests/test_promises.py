"""The promises of README.md and docs/, each through the real entry point (launch/train.py) on the CPU, on tiny data.

    PYTHONPATH=. python -m pytest -q tests/test_promises.py
"""

import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, ROOT, TRAIN, cli_env, first_epoch_of, free_port, metric_rows, paused_save, run_cli
from fake_cifar10 import CIFAR_CLASSES, cifar_archive, cifar_members, md5_lists
from torchvision.io import write_png

from alexnet_dist.checkpoint import complete_checkpoints, read_state, read_weights
from alexnet_dist.data import fake

# fp32 and a schedule blind to num_epochs (bit-exact comparisons), a checkpoint at every epoch end
EXACT = QUICK + ["--init", "kaiming", "--schedule", "plateau", "--mixed_precision", "no", "--checkpoint_minutes", "0"]


def printed(stdout: str, title: str = "test (tta none)") -> str:
    """The 'TITLE accuracy X% (n/N images)' line of a run's report."""
    found = re.search(re.escape(title) + r" accuracy [\d.]+% \(\d+/\d+ images\)", stdout)
    assert found, f"no '{title} accuracy' in:\n{stdout[-3000:]}"
    return found.group(0)


def write_image_folder(root: Path, split: str, imageset, classes, count: int) -> list:
    """The first `count` images of `imageset` as PNGs under root/split/<class>/; their paths."""
    paths = []
    for index in range(count):
        folder = root / split / classes[int(imageset.labels[index])]
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{index}.png")
        write_png(imageset.images[index], str(paths[-1]))
    return paths


class Launched:
    """A process whose output is read as it comes, so that a test waits for a line instead of sleeping blindly."""

    def __init__(self, command: list, cwd, env: dict, own_group: bool = False):
        """`own_group`: in a process group of its own, as a terminal's foreground job (Ctrl-C: os.killpg)."""
        self.process = subprocess.Popen(command, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=own_group)
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
        self.process.kill()
        self.process.wait()
        for reader in self.readers:
            reader.join(timeout=10)
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


def launch(args, cwd, env=None, script=TRAIN) -> Launched:
    return Launched([sys.executable, str(script), *map(str, args)], cwd, env or cli_env())


def launch_ranks(args, cwd, processes: int = 2, script=TRAIN) -> list:
    """Each rank as its own process (the environment torchrun would set), so that each one's status is seen."""
    port = free_port()
    return [launch(args, cwd, cli_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                                      LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                   script=script)
            for rank in range(processes)]


FULL_DISK = """\
import errno, os, pathlib, sys
import torch
from alexnet_dist.cli import main

write_text, save = pathlib.Path.write_text, torch.save

def full_disk(path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

def checkpoint_part(path, *args, **kwargs):  # the main process's own part of a checkpoint
    return full_disk(path) if path.name == "trainer_state.json" else write_text(path, *args, **kwargs)

def final_weights(obj, f, *args, **kwargs):  # the final weights' temporary file: the disk fills up part way
    if pathlib.Path(f).name.startswith(".model.tmp"):
        pathlib.Path(f).write_bytes(b"half a weights file")
        full_disk(f)
    return save(obj, f, *args, **kwargs)

if {checkpoint}:
    pathlib.Path.write_text = checkpoint_part
else:
    torch.save = final_weights
main(sys.argv[1:])
"""


@pytest.mark.parametrize("part", ["checkpoint", "final weights"])
def test_a_file_the_main_process_cannot_write_stops_every_rank_with_one_line(part, tmp_path):
    """A full disk on the main process's part of a save, or on the final weights: both ranks stop at once (not at
    the collective timeout), with status 1 and one line from the main process; no checkpoint is published after
    the failure and no half-written weights file is left."""
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK.format(checkpoint=part == "checkpoint"))
    ranks = launch_ranks(QUICK + ["--run_dir", "run", "--save", "model.pth"], tmp_path, script=script)
    codes = [rank.finish() for rank in ranks]  # 300 s at most: a rank left at a collective would wait 30 minutes
    assert codes == [1, 1], [rank.stderr for rank in ranks]
    line = ranks[0].stderr.rstrip().splitlines()[-1]
    if part == "checkpoint":
        assert line.startswith("could not save the checkpoint run/checkpoints/step-0000005 (OSError: [Errno 28] No "
                               "space")
        assert "--resume latest" in line
        assert not complete_checkpoints(tmp_path / "run" / "checkpoints")
    else:
        assert line.startswith("could not write the weights model.pth (OSError: [Errno 28] No space left on device")
        assert line.endswith("the run stopped")
        assert [path.name for path in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-0000005"]
    assert "Traceback" not in ranks[0].stderr + ranks[1].stderr
    assert "could not" not in ranks[1].stderr  # only the main process prints
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith((".model", "model"))]


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


# ---------------------------------------------------------------- CIFAR-10, downloaded by the main process


class ArchiveServer:
    """The archive on a loopback HTTP server, in a thread; `requests` lists the paths asked for."""

    def __init__(self, archive: bytes):
        self.requests = []
        requests = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(archive)))
                self.end_headers()
                self.wfile.write(archive)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cifar-10-python.tar.gz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


LOOPBACK_TRAIN = """\
import sys
from torchvision.datasets import CIFAR10
for name, value in {attributes!r}.items():
    setattr(CIFAR10, name, value)
from alexnet_dist.cli import main
main(sys.argv[1:])
"""


def torchvision_pointed_at(url: str, archive: bytes, members: dict) -> dict:
    """The class attributes of torchvision's CIFAR10 that make it download and check this archive."""
    return {"url": url, "tgz_md5": hashlib.md5(archive).hexdigest(), **md5_lists(members)}


def test_cifar10_is_downloaded_once_by_the_main_process_while_the_other_rank_waits(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    members = cifar_members()
    archive = cifar_archive(members)
    server = ArchiveServer(archive)
    try:
        attributes = torchvision_pointed_at(server.url, archive, members)
        for name, value in attributes.items():
            monkeypatch.setattr(CIFAR10, name, value)
        CIFAR10(str(tmp_path / "one_download"), train=True, download=True)  # what one download asks the server
        one_download = list(server.requests)
        server.requests.clear()
        wrapper = tmp_path / "train_from_loopback.py"  # the patch must reach the training processes
        wrapper.write_text(LOOPBACK_TRAIN.format(attributes=attributes))
        result = run_cli(["--dataset", "cifar10", "--data_dir", "data", "--logger", "none", "--num_epochs", "1",
                          "--batch_size", "32", "--tta", "none"], cwd=tmp_path, script=wrapper, processes=2,
                         env=cli_env(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1"))
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert server.requests == one_download  # one rank downloaded, once (torchvision probes for redirects first)
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    assert "180 training / 20 validation images, 5 steps per epoch" in result.stdout  # 200 images less val_size 0.1
    assert printed(result.stdout).endswith("/40 images)")
    assert all(f"  {name} " in result.stdout for name in CIFAR_CLASSES)  # class names from batches.meta
    assert len(list((tmp_path / "runs").iterdir())) == 1


# ---------------------------------------------------------------- the weight average (--ema)


def test_weight_average_is_saved_evaluated_logged_and_resumed_bit_for_bit(tmp_path):
    flags = EXACT + ["--ema", "0.9"]
    straight = run_cli(flags + ["--num_epochs", "2", "--run_dir", "straight", "--keep_checkpoints", "2",
                                "--save", "straight.pth"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    first_epoch_of(tmp_path / "straight", tmp_path / "resumed")
    resumed = run_cli(
        flags + ["--num_epochs", "2", "--run_dir", "resumed", "--resume", "latest", "--save", "resumed.pth"],
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from resumed/checkpoints/step-0000005" in resumed.stdout
    average, final = (read_weights(tmp_path / name)["state_dict"] for name in ("straight_ema.pth", "straight.pth"))
    again = read_weights(tmp_path / "resumed_ema.pth")["state_dict"]
    assert all(torch.equal(average[name], again[name]) for name in average)  # the resume restored the average exactly
    assert not all(torch.equal(average[name], final[name]) for name in average)  # and it is not the final weights
    validation = {
        run: [
            row.get("Accuracy/Validation_EMA") for row in metric_rows(tmp_path / run) if "Accuracy/Validation" in row
        ]
        for run in ("straight", "resumed")
    }
    assert len(validation["straight"]) == 2 and None not in validation["straight"]
    assert validation["resumed"] == validation["straight"]
    evaluation = run_cli(
        [
            "--dataset",
            "fake",
            "--train=False",
            "--load_model_path",
            "straight_ema.pth",
            "--mixed_precision",
            "no",
            "--tta",
            "none",
        ],
        cwd=tmp_path,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    figures = printed(straight.stdout, "test, averaged weights, (tta none)").split(" accuracy ")[1]
    assert printed(evaluation.stdout) == f"test (tta none) accuracy {figures}"  # what training said of the average


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


# ---------------------------------------------------------------- accelerate launch with a config file


def accelerate_launch(config: Path, args: list, cwd, options=()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *options, "--config_file", str(config), str(TRAIN),
               *args]
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)


def test_bad_input_under_accelerate_launch_is_the_one_line_then_the_launchers_traceback_or_with_q_the_line_only(
        tmp_path):
    """What docs/distributed.md says a user sees: the script's line and exit status 2 reach Accelerate's launcher,
    which adds a CalledProcessError traceback and exits 1; `accelerate launch -q` exits 1 after the line alone."""
    line = "error: --val_size must be in [0.0, 1.0), got -0.1"
    loud = accelerate_launch(ROOT / "configs" / "cpu.yaml", ["--val_size", "-0.1"], tmp_path)
    assert loud.returncode == 1 and line in loud.stderr.splitlines(), loud.stderr
    assert "subprocess.CalledProcessError" in loud.stderr.split(line, 1)[1]
    quiet = accelerate_launch(ROOT / "configs" / "cpu.yaml", ["--val_size", "-0.1"], tmp_path, options=["-q"])
    assert quiet.returncode == 1 and quiet.stderr.strip().splitlines()[-1] == line, quiet.stderr
    assert "Traceback" not in quiet.stderr and not list(tmp_path.iterdir())


def test_ctrl_c_under_accelerate_launch_names_both_signals_and_gives_the_command_to_paste(tmp_path):
    """Ctrl-C in a terminal reaches the whole foreground group: the script gets SIGINT, then the launcher's SIGTERM
    (and SIGKILL 5 s after that). The message says so, and the command it prints is the launcher's, as typed."""
    config = ROOT / "configs" / "cpu.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    flags = [*QUICK, "--num_epochs", "30", "--log_freq", "1", "--run_dir", "run"]
    run = Launched([*launcher, str(TRAIN), *flags], tmp_path, cli_env(), own_group=True)
    run.wait_for(lambda: "step 2: training loss" in run.stdout, "step 2 printed")
    os.killpg(run.process.pid, signal.SIGINT)
    status = run.finish()  # the launcher's own: 130 when it handled the Ctrl-C, 1 when the script had stopped first
    assert status == 130 or (status == 1 and "returned non-zero exit status 130" in run.stderr), run.stderr
    # the launcher's SIGTERM follows the terminal's SIGINT; on a loaded machine it may be handled first, or come late
    said = re.search(r"stopped by (?:SIGINT(?: \(then SIGTERM\))?|SIGTERM \(then SIGINT\)) after optimizer "
                     r"step (\d+); checkpoint (\S+); continue with: (.*)", run.stderr)
    assert said, run.stderr
    step, checkpoint, command = int(said.group(1)), said.group(2), said.group(3)
    assert checkpoint == f"run/checkpoints/step-{step:07d}" and complete_checkpoints(tmp_path / "run" / "checkpoints")
    executable = shlex.split(command)[0]
    assert os.path.samefile(executable if os.sep in executable else shutil.which(executable), sys.executable)
    assert shlex.split(command)[1:] == [*launcher[1:], str(TRAIN), *flags, "--resume", checkpoint]


def test_accelerate_config_file_runs_and_an_explicit_precision_flag_wins(tmp_path):
    shipped = (ROOT / "configs" / "cpu.yaml").read_text()
    assert "mixed_precision: 'no'" in shipped
    bf16 = tmp_path / "cpu_bf16.yaml"
    bf16.write_text(shipped.replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    # the flag says the opposite of the config, or (None) the config's bf16 applies
    for config, flag in ((ROOT / "configs" / "cpu.yaml", "bf16"), (bf16, "no"), (bf16, None)):
        result = accelerate_launch(config, QUICK + (["--mixed_precision", flag] if flag else []), tmp_path)
        flag = flag or "bf16"
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if line.startswith("global batch"))
        assert "= 1 process(es)" in line and f"precision {flag};" in line, (config.name, line)
        # accelerate launch set OMP_NUM_THREADS=1 (as it does for a CPU-only job); the run uses every usable core
        assert f"CPU ({len(os.sched_getaffinity(0))} thread" in line, line
        printed(result.stdout)  # trained to the end


# ---------------------------------------------------------------- the stream loader


FOLDER = [
    "--dataset",
    "folder",
    "--data_dir",
    "images",
    "--batch_size",
    "32",
    "--num_epochs",
    "1",
    "--logger",
    "none",
    "--mixed_precision",
    "no",
    "--tta",
    "none",
]


def test_stream_loader_trains_from_files_and_is_chosen_when_the_split_does_not_fit(tmp_path, monkeypatch):
    import alexnet_dist.data
    import alexnet_dist.training
    from alexnet_dist.cli import main
    from alexnet_dist.loaders import StreamLoader

    train, test, classes = fake()
    write_image_folder(tmp_path / "images", "train", train, classes, 200)
    write_image_folder(tmp_path / "images", "test", test, classes, 40)
    cache = tmp_path / "images" / ".alexnet_dist_cache"
    streamed = run_cli(FOLDER + ["--loader", "stream", "--save", "stream.pth"], cwd=tmp_path)
    assert streamed.returncode == 0, streamed.stderr
    assert "180 training / 20 validation images" in streamed.stdout and printed(streamed.stdout).endswith(
        "/40 images)"
    )
    assert not cache.exists()  # nothing decoded up front
    # --loader auto when the split does not fit: in this process, where the memory budget can be made tiny
    monkeypatch.setattr(alexnet_dist.data, "memory_budget", lambda device: 1000)
    made, make_loader = [], alexnet_dist.training.make_loader

    def recorded(*args, **kwargs):
        made.append(make_loader(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(alexnet_dist.training, "make_loader", recorded)
    main(FOLDER + ["--loader", "auto", "--num_workers", "0", "--save", "auto.pth"])
    # training, validation, the fit's sample of the training split, test
    assert len(made) == 4 and all(isinstance(loader, StreamLoader) for loader in made)
    assert not cache.exists()


def test_cuda_graphs_stay_off_with_the_stream_loader_on_data_in_memory():
    """--loader stream on generated (or CIFAR-10) images streams them too, so auto must leave the graphs off;
    preflight decides it, here for a stand-in of one GPU."""
    from types import SimpleNamespace

    from alexnet_dist.cli import parse_flags
    from alexnet_dist.preflight import preflight

    one_gpu = SimpleNamespace(device=torch.device("cuda"), num_processes=1, process_index=0, is_main_process=True)
    flags = QUICK + ["--cuda_graphs", "auto", "--mixed_precision", "bf16"]
    graphs = {
        loader: preflight(parse_flags(flags + ["--loader", loader]), one_gpu).graphs for loader in ("device", "stream")
    }
    assert graphs == {"device": True, "stream": False}


def test_an_unreadable_image_met_while_streaming_stops_every_rank_naming_it(tmp_path):
    train, _, classes = fake()
    paths = write_image_folder(tmp_path / "images", "train", train, classes, 64)
    paths[17].write_bytes(b"not a png")  # read only when training reaches it: --loader stream decodes nothing up front
    broken = str(paths[17].relative_to(tmp_path))
    ranks = launch_ranks(
        FOLDER + ["--loader", "stream", "--val_size", "0", "--batch_size", "16"], tmp_path
    )  # every image used
    codes = [rank.finish() for rank in ranks]
    assert codes == [2, 2], [rank.stderr for rank in ranks]
    assert f"error: unreadable image in the data set: {broken} (1 such file(s))" in ranks[0].stderr
    assert sum(rank.stderr.count(broken) for rank in ranks) == 1, [rank.stderr for rank in ranks]


# ---------------------------------------------------------------- test-time views in evaluation and predictions


def test_evaluation_and_predictions_use_the_test_time_views_asked_for(tmp_path):
    from test_engine import hand_cut_views

    from alexnet_dist.data import read_image, resize_images
    from alexnet_dist.model import alexnet

    train, _, classes = fake()
    paths = write_image_folder(tmp_path / "images", "train", train, classes, 1000)  # no test/: the validation split
    # 10 steps that leave the three modes apart on 300 validation images
    flags = FOLDER + [
        "--fraction_of_data",
        "0.25",
        "--val_size",
        "0.3",
        "--num_epochs",
        "2",
        "--lr",
        "0.01",
        "--init",
        "kaiming",
    ]
    trained = run_cli(flags + ["--save", "model.pth"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    finals = {
        mode: re.search(rf"final validation accuracy, final weights, tta {mode}: ([\d.]+)%", trained.stdout).group(1)
        for mode in ("none", "flip", "ten")
    }
    assert len(set(finals.values())) == 3, f"{finals}: pick flags where the modes differ, or this checks little"
    for mode, expected in finals.items():
        evaluation = run_cli(flags + ["--train=False", "--load_model_path", "model.pth", "--tta", mode], cwd=tmp_path)
        assert evaluation.returncode == 0, evaluation.stderr
        assert "evaluating on the validation split instead" in evaluation.stdout
        assert printed(evaluation.stdout, f"validation (tta {mode})").startswith(
            f"validation (tta {mode}) accuracy {expected}%"
        )
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    for path in paths[:6]:
        (chosen / path.name).write_bytes(path.read_bytes())
    files = sorted(chosen.iterdir())
    weights = read_weights(tmp_path / "model.pth")
    model = alexnet(num_classes=10)
    model.load_state_dict(weights["state_dict"])
    model.eval()
    views = hand_cut_views(
        resize_images(torch.stack([read_image(path) for path in files]), (70, 70)), (64, 64), (0.5,) * 3, (0.5,) * 3
    )
    lines = {}
    for mode, used in (("none", 1), ("ten", 10)):
        result = run_cli(
            [
                "--predict",
                "chosen",
                "--load_model_path",
                "model.pth",
                "--tta",
                mode,
                "--top_k",
                "10",
                "--mixed_precision",
                "no",
                "--predict_json",
                f"{mode}.json",
            ],
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        lines[mode] = [line for line in result.stdout.splitlines() if line.startswith("chosen/")]
        with torch.no_grad():
            expected = sum(torch.softmax(model(view), dim=1) for view in views[:used]) / used
        predicted = json.loads((tmp_path / f"{mode}.json").read_text())
        assert [Path(row["file"]).name for row in predicted] == [path.name for path in files]
        for row, probabilities in zip(predicted, expected):
            for top in row["top"]:
                assert abs(top["probability"] - float(probabilities[classes.index(top["class"])])) < 1e-5, (mode, row)
    assert len(lines["none"]) == 6 and lines["none"] != lines["ten"]


# ---------------------------------------------------------------- PCA colour noise and cutout


def test_colour_noise_and_cutout_change_training_batches_only():
    from accelerate import Accelerator

    from alexnet_dist.cli import parse_flags
    from alexnet_dist.training import loader_factory

    train, held_out, _ = fake()
    accelerator = Accelerator(cpu=True)
    evaluation, training = {}, {}
    for name, extra in (("plain", []), ("noisy", ["--pca_color", "0.1", "--cutout", "16"])):
        make = loader_factory(parse_flags(QUICK + extra), accelerator, 32, train)
        loader = make(held_out)
        evaluation[name] = [
            view for images, _, _ in loader.eval_batches(64) for view in loader.augmentation.views(images, 10)
        ]
        training[name] = next(make(train).train_epoch(0))[0]
    assert len(evaluation["noisy"]) == 40 and all(
        torch.equal(a, b) for a, b in zip(evaluation["plain"], evaluation["noisy"])
    )
    # training: a square of zeros (the mean colour, which no pixel of the plain batch hits) of 8 x 8 to 16 x 16
    # pixels...
    cut = (training["noisy"] == 0).all(dim=1)
    assert not (training["plain"] == 0).all(dim=1).any()
    assert all(64 <= int(pixels) <= 256 for pixels in cut.sum(dim=(1, 2)))
    # ...and elsewhere one colour shift per image and channel
    shift = training["noisy"] - training["plain"]
    outside = [shift[image, channel][~cut[image]] for image in range(len(shift)) for channel in range(3)]
    assert max(float(values.max() - values.min()) for values in outside) < 1e-4
    assert min(float(values.abs().max()) for values in outside) > 0
    # a whole run with them: test_tracking.py::test_tensorboard_events_hold_the_three_curves


# ---------------------------------------------------------------- stop signals


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


@pytest.mark.parametrize("layout", [[], ["--parallel", "columns", "--groups", "2"]], ids=["data", "columns"])
def test_sigint_to_torchrun_stops_both_ranks_after_the_same_step(layout, tmp_path):
    """Ctrl-C reaches torchrun only (its workers run in their own sessions); it forwards SIGINT to every rank. The
    same with the two columns on the two ranks: they stop together and save the whole network."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
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
    run = Launched(command, tmp_path, cli_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300"))
    run.wait_for(lambda: "step 2: training loss" in run.stdout, "step 2 printed")
    run.process.send_signal(signal.SIGINT)
    run.finish()  # torchrun's own status after a signal is its business (1)
    assert [(tmp_path / f"exit-{rank}").read_text() for rank in (0, 1)] == ["130", "130"], run.stderr
    step = int(re.search(r"stopped by SIGINT after optimizer step (\d+);", run.stderr).group(1))
    assert step % 5 == 0  # the ranks compare notes at epoch ends (5 steps) and every 10 steps
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [path.name for path in saved] == [f"step-{step:07d}"] and read_state(saved[0])["global_step"] == step
    assert all((saved[0] / f"random_states_{rank}.pkl").is_file() for rank in (0, 1))  # both ranks saved that step
    if layout:  # the whole network's weights and momenta, gathered from the pair, not column 0's half
        weights = torch.load(saved[0] / "pytorch_model.bin", weights_only=True)
        momenta = torch.load(saved[0] / "optimizer.bin", weights_only=True)["state"]
        assert weights["features.0.weight"].shape[0] == 96 and momenta[0]["momentum_buffer"].shape[0] == 96


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
                    cwd=tmp_path)
    assert timed.returncode == 0, timed.stderr
    assert [path.name for path in complete_checkpoints(tmp_path / "timed" / "checkpoints")] == [
        f"step-{step:07d}" for step in range(1, 6)]
    default = run_cli(QUICK + ["--keep_checkpoints", "10", "--run_dir", "default"], cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert [path.name for path in complete_checkpoints(tmp_path / "default" / "checkpoints")] == ["step-0000005"]
