"""A smoke run of the benchmark: a few steps, figures written and plausible (not a timing test)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import PAPER_WIDTH, ROOT, cli_env


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
        env=cli_env(**PAPER_WIDTH),
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


@pytest.mark.parametrize("argv,message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--windows", "0"], "--windows must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--seed_workers", "-1"], "--seed_workers must be at least 0, got -1"),
    (["--json_path", "notes.txt/bench.json"], "--json_path notes.txt/bench.json cannot be written ("),
    (["--noflip", "--windows", "0"], "--windows must be at least 1"),  # --noflip is a training flag here too
])
def test_bench_refuses_bad_flags_in_one_line(argv, message, tmp_path):
    (tmp_path / "notes.txt").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "alexnet_dist.bench", *argv],
        cwd=tmp_path,
        env=cli_env(**PAPER_WIDTH),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {message}"), result.stderr
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_bench_takes_the_training_flags_as_train_py_does():
    from alexnet_dist.cli import parse_flags
    from alexnet_dist.config import from_fire

    assert from_fire({"noflip": True, "batch_size": 64}).flip is False
    assert from_fire({"noflip": True}, dataset="fake").to_dict() == parse_flags(["--noflip", "--dataset", "fake"]
                                                                                  ).to_dict()


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


@pytest.mark.parametrize("argv", [["--help"], ["--device", "cpu", "--help"], ["-h"]])
def test_help_lists_the_benchmarks_flags_and_the_training_flags_wherever_it_stands(argv, capsys):
    from alexnet_dist.bench import parse_flags

    with pytest.raises(SystemExit) as exit_info:
        parse_flags(argv)
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    names = ("steps", "windows", "seed_workers", "json_path", "batch_size", "device")  # its own, then training's
    assert all(f"--{name}" in shown for name in names)


def test_the_benchmarks_flags_parse_without_measuring(tmp_path):
    from alexnet_dist.bench import parse_flags

    opts = parse_flags(["--steps", "1", "--windows", "2", "--noflip", "--json_path", str(tmp_path / "b.json")])
    assert (opts.steps, opts.windows, opts.cfg.flip, opts.cfg.num_epochs) == (1, 2, False, 4)
    assert opts.flags == {"flip": False} and not list(tmp_path.iterdir())  # nothing written yet


@pytest.mark.slow  # 4 processes of the paper's two-column network on the machine's cores: about a minute
def test_parallel_bench_counts_the_columns_bytes_on_four_processes(tmp_path):
    """scripts/parallel_bench.py, two pairs of columns: each process sends its pair's exchanges for 128 images (half
    the 6,825,984 bytes of activations of one pair on 256, docs/results/parallel/layouts_cpu.json, and its 8-byte
    dropout seed) and all-reduces its column's 28,454,602 gradients (column 0 holds fc3's bias) with the other pair's
    holder of that column, over DDP's own group. Counted over every process, the launch aborted."""
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "parallel_bench.py", "--processes", "4", "--layouts", "columns",
         "--rounds", "1", "--windows", "1", "--steps", "1", "--json_path", "four.json"],
        cwd=tmp_path, env=cli_env(**PAPER_WIDTH), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "four.json").read_text())
    assert figures["layouts"]["columns"]["bytes_per_step"] == 28_454_602 * 4 + 6_825_984 // 2 + 8
