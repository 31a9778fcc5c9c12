"""The GPU session script rehearsed on the CPU: whatever happens, OUT holds what the device tool can
bring back (at most 8 files, 2 folders deep, under 16 MiB each) and a summary of every stage."""

import json
import subprocess
import sys

import pytest
from conftest import PAPER_WIDTH, ROOT, cli_env

pytestmark = pytest.mark.slow  # minutes each: CI runs them with make test-slow

SCRIPT = ROOT / "scripts" / "gpu_session.py"
MiB = 1024 * 1024


def rehearse(tmp_path, part, *extra, budget=400):
    out, work = tmp_path / f"{part}-out", tmp_path / f"{part}-work"
    result = subprocess.run([sys.executable, str(SCRIPT), part, str(out), "--rehearse", "--work", str(work),
                             "--budget", str(budget), *extra], cwd=tmp_path, env=cli_env(**PAPER_WIDTH),
                            capture_output=True, text=True, timeout=budget + 120)
    print(result.stdout[-3000:], result.stderr[-3000:])
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8 and {path.name for path in files} <= {"summary.json", "results.tar.gz"}
    assert all(path.stat().st_size < 16 * MiB for path in files)
    assert all(len(path.relative_to(out).parts) <= 3 for path in files)
    assert not list(work.rglob("checkpoints/step-*")) and not list(out.rglob("*.pth"))  # deleted when each run ended
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["out_contract"]["ok"] and summary["elapsed_seconds"] <= budget
    return result, summary, {stage["name"]: stage for stage in summary["stages"]}


def test_smoke_rehearsal_reports_every_stage(tmp_path):
    result, summary, stages = rehearse(tmp_path, "smoke")
    assert result.returncode == 0
    assert list(stages) == ["default_command", "graph_check", "bench", "scaling_model",  # what matters most first
                            "parallel_layouts"]
    assert stages["graph_check"]["status"] == "skipped"  # no GPU here: the check says so and the rest goes on
    assert stages["bench"]["status"] == "ok" and stages["bench"]["figures"]["default_images_per_s"]["median"] > 0
    scaling = stages["scaling_model"]  # the rehearsal: this CPU's layer times, 1 and 2 devices
    assert scaling["status"] == "ok" and set(scaling["figures"]["layouts"]["hybrid"]) == {"1", "2"}
    layouts = stages["parallel_layouts"]["figures"]["layouts"]  # on the CPU the comparison runs (gloo)
    assert set(layouts) == {"columns", "data", "data_bf16", "one"}
    assert layouts["data"]["bytes_per_step"] == 2 * layouts["data_bf16"]["bytes_per_step"] > 0
    command = stages["default_command"]
    assert command["status"] == "ok" and "launch launch/train.py" in command["command"]
    assert "--logger wandb" in command["command"]  # wandb imports here: W&B offline, as a user runs it
    assert 0 < command["train_seconds"] < command["seconds"]
    breakdown = command["time_breakdown"]  # the run's own account of the whole command's time
    assert 0 < breakdown["time/training"] < breakdown["time/total"] <= command["seconds"]
    assert set(command["final"]) >= {"Accuracy/Validation_final/tta_none", "Accuracy/Test"}


def test_sweep_rehearsal_survives_a_failing_and_a_hanging_run(tmp_path):
    # four runs at once on the machine's cores: each may take its 120 s default and more on a loaded 2-core machine
    result, summary, stages = rehearse(tmp_path, "sweep", "--inject", "bad_flag,hang", "--run_timeout", "240",
                                       budget=600)
    assert result.returncode == 0
    assert stages["w1_bad_flag"]["status"] == "failed" and "no_such_flag" in stages["w1_bad_flag"]["log_tail"]
    assert stages["w1_hang"]["status"] == "timeout" and stages["w1_hang"]["seconds"] < 30
    assert stages["w1_base"]["status"] == "ok" and stages["w1_pytorch_init"]["status"] == "ok"
    assert stages["best_seed1"]["status"] == "ok" and summary["best_so_far"]["flags"]
    listing = subprocess.run(["tar", "tzf", str(tmp_path / "sweep-out" / "results.tar.gz")], capture_output=True,
                             text=True).stdout.split()
    assert "runs/w1_base/metrics.jsonl" in listing and "logs/w1_hang.log" in listing


def test_the_budget_ends_the_script_in_time(tmp_path):
    """A budget too small for the runs: they are cut off, and the summary and archive still come back."""
    result, summary, stages = rehearse(tmp_path, "sweep", "--inject", "hang", budget=25)
    assert result.returncode == 0
    assert all(stage["status"] in ("ok", "timeout") for stage in stages.values())
    assert stages["w1_hang"]["status"] == "timeout"  # the injected hang was cut off
    assert (tmp_path / "sweep-out" / "results.tar.gz").exists()
