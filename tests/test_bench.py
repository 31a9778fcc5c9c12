"""A smoke run of the benchmark: a few steps, figures written and plausible (not a timing test)."""

import json
import subprocess
import sys

import pytest
from conftest import cli_env


def test_bench_runs_and_writes_its_figures(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_dist.bench",
            "--steps",
            "1",
            "--windows",
            "2",
            "--batch_size",
            "16",
            "--val_size",
            "0.2",
            "--init",
            "kaiming",
            "--json_path",
            "bench.json",
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["device"] == "CPU" and figures["batch_size"] == 16 and figures["windows"] == 2
    assert figures["flags"] == {"batch_size": 16, "val_size": 0.2, "init": "kaiming"}  # the flags reach the figures
    assert figures["cifar10_training_images"] == 40_000  # 50,000 less the 20% validation split
    default = figures["default_images_per_s"]
    assert default["min"] <= default["median"] <= default["max"]
    assert figures["seconds_25_epochs"] == pytest.approx(25 * 40_000 / default["median"])
    assert set(figures["default_over_seed"]) == {"median", "min", "max", "conclusive"}
    assert figures["time"]["time/total"] >= figures["time"]["time/training"] > 0
    assert "b/a = " in result.stdout and "where the" in result.stdout


def test_bench_refuses_bad_flags_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "alexnet_dist.bench", "--batch_size", "0"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and result.stderr.strip() == "error: --batch_size must be at least 1, got 0"
