"""Checkpoints, resume, clean stops and kills, through the real entry point on generated data."""

import json
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import (
    RESUMABLE,
    TRAIN,
    assert_same_weights,
    cli_env,
    copy_run_folder,
    first_epoch_of,
    launch,
    metric_rows,
    paused_save,
    replace_file,
    run_cli,
)

from alexnet_dist.checkpoint import complete_checkpoints, read_state

KAIMING = RESUMABLE  # 5 steps per epoch


def weights(path) -> dict:
    return torch.load(path)["state_dict"]


def test_resume_is_bit_identical_on_one_process_and_the_wandb_run_keeps_its_id(tmp_path):
    """Stopped on purpose after one epoch, then resumed with more epochs: the weights a straight run ends with, and
    (W&B offline in the stopped run, none in the straight one) one W&B run id across both launches."""
    straight = run_cli(KAIMING + ["--num_epochs", "2", "--save", "straight.pth"], cwd=tmp_path, in_process=True)
    assert straight.returncode == 0, straight.stderr
    env = cli_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb_dir"))
    short = KAIMING + ["--logger", "wandb", "--run_dir", "short"]
    first = run_cli(short + ["--num_epochs", "1"], cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    longer = run_cli(short + ["--num_epochs", "2", "--resume", "latest", "--save", "longer.pth"], cwd=tmp_path,
                     env=env)
    assert longer.returncode == 0, longer.stderr
    assert "resumed from short/checkpoints/step-0000005: epoch 2, step 0" in longer.stdout
    assert_same_weights(weights(tmp_path / "straight.pth"), weights(tmp_path / "longer.pth"), exact=True)
    run_id = json.loads((tmp_path / "short" / "tracker.json").read_text())["wandb_id"]
    offline = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(path.name.endswith(f"-{run_id}") for path in offline), (run_id, offline)
    assert f"wandb sync {offline[-1]}" in longer.stdout
    # after a kill, with the same metrics rows as a straight run: the kill-point test below


def test_resume_on_two_processes_is_bit_identical(tmp_path):
    """Dropout and augmentation on: each rank's own random streams come back from the checkpoint."""
    (tmp_path / "a").mkdir()
    straight = run_cli([*KAIMING, "--num_epochs", "2", "--run_dir", "run", "--keep_checkpoints", "2"],
                       cwd=tmp_path / "a", processes=2, rank_weights=True).ok()
    first_epoch_of(tmp_path / "a" / "run", tmp_path / "b" / "run")
    second = run_cli([*KAIMING, "--num_epochs", "2", "--run_dir", "run", "--resume", "latest"], cwd=tmp_path / "b",
                     processes=2, rank_weights=True).ok()
    assert "resumed from run/checkpoints/step-0000005" in second.stdout  # the first epoch's, not trained again
    for rank in (0, 1):
        assert_same_weights(straight.rank_weights(rank), second.rank_weights(rank), exact=True)


@pytest.mark.xdist_group("trained")  # on the worker that made the module's `trained` runs
def test_resume_refuses_what_changes_the_training_unless_told(tmp_path, trained):
    run = copy_run(trained, "fake_run", tmp_path)  # one epoch of KAIMING: its checkpoint is step-0000005
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    resume = KAIMING + ["--num_epochs", "2", "--run_dir", "fake_run", "--resume", "latest", "--batch_size", "16"]
    refused = run_cli(resume, cwd=tmp_path, in_process=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith(
        "error: --resume fake_run/checkpoints/step-0000005: these flags change what is"
    )
    assert "batch_size: 32 -> 16" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    new_optimizer = ["--lr", "0.1", "--momentum", "0.5", "--weight_decay", "0"]  # saved: 0.05, 0.9, 5e-4
    allowed = run_cli(resume + ["--allow_config_change"] + new_optimizer, cwd=tmp_path, in_process=True)
    assert allowed.returncode == 0, allowed.stderr
    assert "global batch 16 = 1 process(es)" in allowed.stdout  # the new batch size took effect
    newest = complete_checkpoints(run / "checkpoints")[-1]
    assert read_state(newest)["config"]["batch_size"] == 16
    # and so did the optimizer's: the values it stepped with (plateau: no lr reduction within one epoch)
    [group] = torch.load(newest / "optimizer.bin", weights_only=False)["param_groups"]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (pytest.approx(0.1), 0.5, 0.0)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    """SIGTERM once the first epoch's checkpoint exists: a checkpoint of the step under way, status 143, the command
    that resumes; resumed (to the end of the epoch it was stopped in, so as not to train 28 more), the run ends
    on that epoch's last step."""
    flags = KAIMING + ["--run_dir", "run", "--log_freq", "1"]
    run = launch(flags + ["--num_epochs", "30"], tmp_path)
    folder = tmp_path / "run" / "checkpoints"
    run.wait_for(lambda: complete_checkpoints(folder), "the first checkpoint", timeout=600)  # in epoch 2 now
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.stderr
    err = run.stderr
    assert "stopped by SIGTERM after optimizer step" in err and "--resume run/checkpoints/step-" in err
    newest = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert f"--resume {newest.relative_to(tmp_path)}" in err
    stopped_at = read_state(newest)["global_step"]
    epochs = stopped_at // 5 + 1  # the epoch under way at the stop (or the next, if it fell on an epoch's end)
    resumed = run_cli(flags + ["--num_epochs", epochs, "--resume", "latest"],
                      cwd=tmp_path, in_process=True)  # plateau: allowed
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {newest.relative_to(tmp_path)}" in resumed.stdout
    assert read_state(complete_checkpoints(tmp_path / "run" / "checkpoints")[-1])["global_step"] == 5 * epochs


def test_kills_at_set_points_always_resume_from_a_valid_checkpoint(tmp_path):
    """SIGKILL right after a checkpoint appears (twice), and in the middle of writing one (held open by a launch
    script that delays its rename; twice); every resume finds a valid checkpoint and the run ends as an
    uninterrupted one, bit for bit, with the same metrics rows and figures. The checkpoints fall mid-epoch
    (--checkpoint_steps 1) and the schedule is the default warm-up then linear decay, so a resume that restarted
    the epoch's data or the schedule would end elsewhere; the log points (every 4 steps) and the epochs span the
    kills, so a resume that forgot the training sums before its checkpoint would log other losses and accuracies."""
    default_schedule = [value if value != "plateau" else "warmup_linear" for value in KAIMING] + ["--log_freq", "4"]
    # the straight run checkpoints at epoch ends only: the killed one's checkpoint at every step must not change
    # what it learns or logs either
    straight = run_cli(default_schedule + ["--num_epochs", "3", "--run_dir", "straight", "--save", "straight.pth"],
                       cwd=tmp_path, in_process=True)
    assert straight.returncode == 0, straight.stderr
    flags = default_schedule + ["--num_epochs", "3", "--checkpoint_steps", "1", "--keep_checkpoints", "1"]
    flags += ["--run_dir", "run", "--save", "killed.pth"]
    folder = tmp_path / "run" / "checkpoints"
    last_step = 0
    for trial in range(4):
        during_save = trial % 2 == 1
        script = paused_save(tmp_path, 30) if during_save else TRAIN
        run = launch(flags + (["--resume", "latest"] if trial else []), tmp_path, script=script)
        if during_save:  # the temporary folder holds the whole state and the run sleeps before renaming it
            run.wait_for(lambda: any((path / "trainer_state.json").exists() for path in folder.glob(".tmp-*")),
                         "a checkpoint's save", timeout=600)
        else:
            run.wait_for(lambda: any(int(p.name.split("-")[1]) > last_step for p in complete_checkpoints(folder)),
                         "a newer checkpoint", timeout=600)
        run.kill()
        assert list(folder.glob(".tmp-*")) or not during_save  # the kill landed inside the save
        saved = complete_checkpoints(folder)
        assert saved, f"trial {trial}: no complete checkpoint left"
        state = read_state(saved[-1])
        torch.load(saved[-1] / "pytorch_model.bin", weights_only=True)  # loads: not half-written
        assert last_step <= state["global_step"] <= 15
        last_step = state["global_step"]
    finished = run_cli(flags + ["--resume", "latest"], cwd=tmp_path, in_process=True)
    assert finished.returncode == 0, finished.stderr
    assert read_state(complete_checkpoints(folder)[-1])["global_step"] == 15  # 3 epochs x 5 steps, as uninterrupted
    assert_same_weights(weights(tmp_path / "straight.pth"), weights(tmp_path / "killed.pth"), exact=True)
    rows = metric_rows(tmp_path / "run")
    assert [row["step"] for row in rows if "Accuracy/Train" in row] == [5, 10, 15]  # each epoch once
    assert [row["step"] for row in rows if "train_seconds" in row] == [15]
    assert [row["step"] for row in rows if "Loss/Train" in row] == [4, 8, 12]

    def figures(run_dir):  # every row and value but the timings
        return [{key: value for key, value in row.items() if "second" not in key and not key.startswith("time/")}
                for row in metric_rows(run_dir)]

    # nothing logged twice, nothing lost, no figure changed: the straight run's rows and values
    assert figures(tmp_path / "run") == figures(tmp_path / "straight")


def test_skip_nonfinite_through_the_cli_finishes_and_counts_what_it_skipped(tmp_path):
    """lr 1e6 makes every loss non-finite after the first steps: with --skip_nonfinite the run still ends (status 0),
    its weights are finite (no bad step was applied), and the epochs say how many micro-batches were skipped. At the
    paper's width: with fc1 and fc2 of 512 neurons a step of finite loss overflowed a weight to inf (the guard
    watches the loss, not the gradients or the weights)."""
    result = run_cli(KAIMING + ["--num_epochs", "2", "--lr", "1e6", "--skip_nonfinite", "--save", "model.pth"],
                     cwd=tmp_path, in_process=True, paper_width=True)
    assert result.returncode == 0, result.stderr
    skipped = [int(n) for n in re.findall(r"(\d+) non-finite losses skipped so far", result.stdout)]
    assert skipped and skipped[-1] > 0 and skipped == sorted(skipped)
    assert all(torch.isfinite(tensor).all() for tensor in weights(tmp_path / "model.pth").values())


@pytest.mark.xdist_group("trained")  # on the worker that made the module's `trained` runs
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, trained):
    run = copy_run(trained, "fake_run", tmp_path)  # one epoch of KAIMING: its checkpoint is step-0000005
    diverging = KAIMING + ["--num_epochs", "3", "--run_dir", "fake_run"]
    result = run_cli(diverging + ["--resume", "latest", "--lr", "1e6", "--allow_config_change"],
                     cwd=tmp_path, in_process=True)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert (
        message.startswith("the loss became non-finite at optimizer step ")
        and "fake_run/checkpoints/step-0000005" in message
    )
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-0000005"]


OPTIMIZERS = {
    "fused SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skipping_nonfinite_steps_leaves_no_trace_with_any_optimizer(name):
    """--skip_nonfinite through the training loop: a NaN batch's step changes nothing (weights, optimizer state),
    so the run ends exactly as one that only ever saw the good batch."""
    from alexnet_dist.engine import Meter, NonfiniteGuard
    from alexnet_dist.speedups import Speedups
    from alexnet_dist.training import GivenBatches, Steps, Trainer, train

    def trainer(batches, skip):
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(4, 2)
        model, optimizer = accelerator.prepare(model, OPTIMIZERS[name](model.parameters()))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return Trainer(
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            criterion=torch.nn.CrossEntropyLoss(),
            loader=GivenBatches(batches),
            make_loader=None,
            average=None,
            meter=Meter(accelerator),
            guard=NonfiniteGuard(accelerator, skip),
            speedups=Speedups(accelerator, optimizer),
        )

    bad, good = (
        (torch.full((3, 4), float("nan")), torch.zeros(3, dtype=torch.int64)),
        (torch.ones(3, 4), torch.zeros(3, dtype=torch.int64)),
    )
    skipping, reference = trainer([bad, good], skip=True), trainer([good], skip=False)
    initial = [p.detach().clone() for p in skipping.model.parameters()]
    after_each = []
    train(
        skipping,
        Steps([0], each_step=lambda: after_each.append([p.detach().clone() for p in skipping.model.parameters()])),
    )
    train(reference, Steps([0]))
    assert all(torch.equal(a, b) for a, b in zip(after_each[0], initial))  # the NaN step was skipped
    assert skipping.meter.nonfinite() == (1, 1)  # and counted
    assert all(torch.equal(a, b) for a, b in zip(skipping.model.parameters(), reference.model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(skipping.model.parameters(), initial))
    unguarded = trainer([bad, good], skip=False)
    train(unguarded, Steps([0]))
    assert not all(torch.isfinite(p).all() for p in unguarded.model.parameters())  # what the guard prevents


# ---------------------------------------------------------------- bad input around checkpoints and data


@pytest.fixture(scope="session")  # one worker runs the tests that read it (xdist_group "trained"): made once
def trained(tmp_path_factory):
    """A 1-epoch fake-data run with its checkpoint, and a 1-epoch run on a 2-class image folder."""
    from torchvision.io import write_png

    root = tmp_path_factory.mktemp("trained")
    assert run_cli(KAIMING + ["--num_epochs", "1", "--run_dir", "fake_run"], cwd=root, in_process=True).returncode == 0
    for label in ("cat", "dog"):
        (root / "two" / "train" / label).mkdir(parents=True)
        for index in range(20):
            write_png(
                torch.full((3, 32, 32), 60 + 100 * (label == "dog"), dtype=torch.uint8),
                str(root / "two" / "train" / label / f"{index}.png"),
            )
    folder_run = run_cli(
        [
            "--dataset",
            "folder",
            "--data_dir",
            "two",
            "--batch_size",
            "8",
            "--num_epochs",
            "1",
            "--logger",
            "none",
            "--run_dir",
            "folder_run",
            "--schedule",
            "plateau",
        ],
        cwd=root, in_process=True,
    )
    assert folder_run.returncode == 0, folder_run.stderr
    yield root
    shutil.rmtree(root, ignore_errors=True)


def copy_run(trained, name, tmp_path) -> Path:
    return copy_run_folder(trained / name, tmp_path / name)


def damage_weights(run: Path):
    path = complete_checkpoints(run / "checkpoints")[-1] / "pytorch_model.bin"
    replace_file(path, path.read_bytes()[:1000])


def damage_state(run: Path):
    replace_file(complete_checkpoints(run / "checkpoints")[-1] / "trainer_state.json", b"{not json")


RESUME = KAIMING + ["--num_epochs", "2", "--run_dir", "fake_run", "--resume", "latest"]
CHECKPOINT_CASES = [  # (name, prepare(trained, tmp_path), argv, expected message)
    (
        "truncated checkpoint",
        lambda t, p: damage_weights(copy_run(t, "fake_run", p)),
        RESUME,
        "cannot be loaded (RuntimeError): it is damaged; resume from an older checkpoint",
    ),
    (
        "damaged state file",
        lambda t, p: damage_state(copy_run(t, "fake_run", p)),
        RESUME,
        "trainer_state.json is damaged",
    ),
    (
        "other architecture",
        lambda t, p: copy_run(t, "fake_run", p),
        RESUME + ["--groups", "2"],
        "was trained with groups=1 on 10 classes, this run builds groups=2 for 10 classes",
    ),
    (
        "other data set and class count",
        lambda t, p: copy_run(t, "folder_run", p),
        RESUME[:-4] + ["--num_epochs", "2", "--run_dir", "folder_run", "--resume", "latest", "--batch_size", "8"],
        "was trained with groups=1 on 2 classes, this run builds groups=1 for 10 classes",
    ),
    (
        "other data fraction",
        lambda t, p: copy_run(t, "fake_run", p),
        RESUME + ["--fraction_of_data", "0.3"],
        "was trained on 180 training images, this run has 294: not the same data",
    ),
    (
        "no checkpoint in the folder",
        lambda t, p: (p / "empty").mkdir(),
        KAIMING + ["--resume", "empty"],
        "empty/checkpoints holds no complete checkpoint",
    ),
    ("no run to resume", lambda t, p: None, KAIMING + ["--resume", "latest"], "no run under runs/ has a checkpoint"),
    (
        "existing run directory",
        lambda t, p: (p / "taken").mkdir() or (p / "taken" / "notes.txt").write_text("mine"),
        KAIMING + ["--run_dir", "taken"],
        "--run_dir taken already exists",
    ),
    (
        "partial CIFAR-10 archive",
        lambda t, p: (p / "data").mkdir() or (p / "data" / "cifar-10-python.tar.gz").write_bytes(b"x"),
        ["--dataset", "cifar10", "--data_dir", "data"],
        "is corrupt or partly downloaded (its checksum is wrong): delete it",
    ),
    (
        "unreadable image",
        lambda t, p: (
            shutil.copytree(t / "two", p / "two") and (p / "two" / "train" / "cat" / "x.jpg").write_bytes(b"x")
        ),
        ["--dataset", "folder", "--data_dir", "two", "--batch_size", "8"],
        "two/train/cat/x.jpg: cannot be read as an image",
    ),
    (
        "cache folder that cannot be written",
        lambda t, p: shutil.copytree(t / "two", p / "two") and (p / "blocker").write_text(""),
        ["--dataset", "folder", "--data_dir", "two", "--batch_size", "8", "--cache_dir", "blocker/cache"],
        "cannot write the decoded-image cache in blocker/cache",
    ),
]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.mark.xdist_group("trained")  # one worker runs them all: the module's `trained` runs are made once
@pytest.mark.parametrize("name,prepare,argv,message", CHECKPOINT_CASES, ids=[case[0] for case in CHECKPOINT_CASES])
def test_bad_checkpoint_and_data_input(name, prepare, argv, message, trained, tmp_path, capsys):
    from alexnet_dist.cli import main

    prepare(trained, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--logger", "none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert snapshot(tmp_path) == before  # nothing written, nothing lost


PASTE = "run/checkpoints/step-0000003"
LAUNCHES = [  # (environment, this process's argv, its parent's command line, what the stop message says)
    ({}, ["launch/train.py", "--num_epochs", "30", "--resume", "latest"], ["bash"],
     "continue with: {python} launch/train.py --num_epochs 30 --resume " + PASTE),
    ({}, ["{bin}/alexnet-dist-train", "--data_dir", "my data", "--resume=x"], ["bash"],
     "continue with: alexnet-dist-train --data_dir 'my data' --resume " + PASTE),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, ["launch/train.py", "--num_epochs", "25"],
     ["{python}", "{bin}/accelerate", "launch", "-q", "--config_file", "configs/cpu.yaml", "launch/train.py",
      "--num_epochs", "25"],
     "continue with: accelerate launch -q --config_file configs/cpu.yaml launch/train.py --num_epochs 25 --resume "
     + PASTE),
    ({"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, ["/abs/launch/train.py", "--seed", "1"],
     ["/elsewhere/python3", "-m", "torch.distributed.run", "--nproc_per_node", "2", "/abs/launch/train.py", "--seed",
      "1"],
     "continue with: /elsewhere/python3 -m torch.distributed.run --nproc_per_node 2 /abs/launch/train.py --seed 1 "
     "--resume " + PASTE),
    ({"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, ["launch/train.py", "--seed", "1"],
     ["torchrun", "--nnodes", "2", "launch/train.py", "--seed", "1"],
     "continue with the same launcher (on every node) and: launch/train.py --seed 1 --resume " + PASTE),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, ["launch/train.py", "--seed", "1"], ["bash", "wrapper.sh"],
     "continue with the same launcher (on every node) and: launch/train.py --seed 1 --resume " + PASTE),
]


@pytest.mark.parametrize("environment,argv,parent,expected", LAUNCHES,
                         ids=["python", "console script", "accelerate", "torchrun", "two nodes", "unknown launcher"])
def test_the_stop_message_gives_a_command_to_paste_with_its_launcher(environment, argv, parent, expected, tmp_path,
                                                                      monkeypatch):
    """The launcher's command line is its process's (/proc), which ends with this process's arguments."""
    from alexnet_dist.resume import how_to_continue

    bin_folder = tmp_path / "bin"  # what PATH finds: the console scripts, and this interpreter under its name
    bin_folder.mkdir()
    for name in ("accelerate", "alexnet-dist-train"):
        (bin_folder / name).touch(mode=0o755)
    python = bin_folder / Path(sys.executable).name
    python.symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_folder))
    for name in ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                 "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "executable", str(python))

    def filled(items):
        return [item.format(bin=bin_folder, python=python) for item in items]

    said = how_to_continue(filled(argv), Path(PASTE), filled(parent))
    assert said == expected.format(python=python.name)


def test_the_stop_names_every_signal_it_received_in_order():
    """Ctrl-C under `accelerate launch` on one process: the terminal's SIGINT, then the launcher's SIGTERM (seen
    by hand, and in test_stops.py); the first one stops the run and sets the exit status."""
    from alexnet_dist.runtime import StopSignals

    stop = StopSignals(Accelerator(cpu=True))
    try:
        stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGTERM, None)
        assert (stop.name(), stop.received) == ("SIGINT (then SIGTERM)", signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            stop._handle(signal.SIGINT, None)
    finally:
        stop.restore()
