"""A smoke run of the benchmark: a few steps, figures written and plausible (not a timing test)."""

import json
import subprocess
import sys

from conftest import cli_env


def test_bench_runs_and_writes_its_figures(tmp_path):
    result = subprocess.run([sys.executable, "-m", "alexnet_dist.bench", "--steps", "1", "--windows", "1",
                             "--batch_size", "16", "--json_path", "bench.json"], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["device"] == "CPU" and figures["batch_size"] == 16
    for key in ("seed_images_per_s", "default_images_per_s", "ceiling_images_per_s"):
        assert figures[key] > 0
    assert figures["default_over_seed"] == figures["default_images_per_s"] / figures["seed_images_per_s"]
    assert "b/a = " in result.stdout


def test_bench_refuses_bad_flags_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "alexnet_dist.bench", "--batch_size", "0"], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.strip() == "error: --batch_size must be at least 1, got 0"
