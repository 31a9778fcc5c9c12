"""--parallel columns (columns.py): the paper's two columns on a pair of CPU processes (gloo). What it cannot run is
refused in one line; tests/test_layouts.py trains it, on 2 and 4 processes, to what one process learns with
--groups 2, and crosses its weights files and checkpoints with the other layouts'."""

import pytest
from conftest import assert_refused_in_one_line, run_cli

COLUMNS = ["--parallel", "columns"]


@pytest.mark.parametrize(
    "processes, flags, message",
    [
        (1, COLUMNS + ["--groups", "2"], "--parallel columns puts the two columns on a pair of processes: launch an "
                                         "even number of processes, got 1"),
        (1, COLUMNS + ["--groups", "1"], "--parallel columns splits the paper's two-column network over a pair of "
                                         "processes: add --groups 2"),
        (4, COLUMNS + ["--groups", "2", "--batch_size", "33"], "--batch_size 33 does not split evenly into 2 pair(s) "
                                                               "of column processes x 1 accumulation step(s)"),
    ],
    ids=["odd processes", "groups 1", "batch over pairs"],
)
def test_bad_column_layouts_are_refused_in_one_line(processes, flags, message, tmp_path):
    result = run_cli(["--dataset", "fake", "--logger", "none", "--num_epochs", "1", *flags], cwd=tmp_path,
                     processes=processes, in_process=processes == 1)
    assert_refused_in_one_line(result, processes, message, tmp_path)


