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
    assert figures["device"] == "CPU (1 thread)" and figures["batch_size"] == 16 and figures["windows"] == 2
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


def test_a_ratio_whose_windows_reach_across_one_is_called_inconclusive(capsys):
    from alexnet_dist.bench import print_result, ratio

    assert ratio([1.2, 1.5, 1.3]) == {"median": 1.3, "min": 1.2, "max": 1.5, "conclusive": True}
    assert ratio([0.7, 0.9])["conclusive"] and not ratio([0.9, 1.0, 1.1])["conclusive"]
    figures = {"device": "CPU", "torch": "x", "batch_size": 256, "precision": "bf16", "cuda_graphs": False,
               "compile": "false", "windows": 3, "steps": 8, "seed_workers": 0, "cifar10_training_images": 45_000,
               "seconds_25_epochs": 100.0, "default_over_seed": ratio([1.4, 1.5, 1.6]),
               "default_over_ceiling": ratio([0.95, 0.98, 1.02]),
               **{f"{name}_images_per_s": {"median": 1.0, "min": 1.0, "max": 1.0}
                  for name in ("seed", "default", "ceiling")}}
    print_result(figures, "table")
    lines = capsys.readouterr().out.splitlines()
    assert "b/a = 1.50  [1.40-1.60]" in lines
    assert "b/c = 0.98  [0.95-1.02]  inconclusive: the windows' range reaches across 1" in lines
