"""Launching: what every rank of a launch agrees on and how a launch ends, through the real entry point: accelerate
launch with a config file, a file the main process cannot write, CIFAR-10 downloaded once by the main process."""

import hashlib
import http.server
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import (
    QUICK,
    ROOT,
    TRAIN,
    Result,
    Running,
    cli_env,
    launch_ranks,
    run_cli,
)
from fake_cifar10 import CIFAR_CLASSES, cifar_archive, cifar_members, md5_lists

from alexnet_dist.checkpoint import complete_checkpoints

# ---------------------------------------------------------------- accelerate launch with a config file


def accelerate_launch(config: Path, args: list, cwd, options=()) -> Result:
    command = [sys.executable, "-m", "accelerate.commands.launch", *options, "--config_file", str(config), str(TRAIN),
               *args]
    done = subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    return Result(command, Path(cwd), done.returncode, done.stdout, done.stderr)


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
    run = Running([*launcher, str(TRAIN), *flags], tmp_path, cli_env(), own_group=True)
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
    # the flag says the opposite of the config, or (None) the config's bf16 applies; the fp32 launch trains to the
    # end, the bf16 ones (slow on a CPU without native bf16) stop once they have said what they run
    for config, flag in ((bf16, "no"), (ROOT / "configs" / "cpu.yaml", "bf16"), (bf16, None)):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, TRAIN, *QUICK,
                   *(["--mixed_precision", flag] if flag else [])]
        run = Running(command, tmp_path, cli_env(), own_group=True)
        if flag == "no":
            assert run.finish() == 0, run.stderr
        else:
            run.wait_for(lambda: "global batch" in run.stdout, "the batch breakdown")
            run.kill()
        line = next(line for line in run.stdout.splitlines() if line.startswith("global batch"))
        assert "= 1 process(es)" in line and f"precision {flag or 'bf16'};" in line, (config.name, line)
        # accelerate launch set OMP_NUM_THREADS=1 (as it does for a CPU-only job); the run uses every usable core
        assert f"CPU ({len(os.sched_getaffinity(0))} thread" in line, line
        if flag == "no":
            Result(command, tmp_path, 0, run.stdout, run.stderr).accuracy()  # trained to the end


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
    assert result.accuracy()[2] == 40
    assert all(f"  {name} " in result.stdout for name in CIFAR_CLASSES)  # class names from batches.meta
    assert len(list((tmp_path / "runs").iterdir())) == 1
