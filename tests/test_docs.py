"""Every command README.md and docs/*.md show for training or the benchmark parses, and names paths that exist.

A command counts when it runs launch/train.py (directly, or through accelerate launch, torchrun, srun, python,
`make train ARGS="..."` or launch/slurm.sh), the console script alexnet-dist-train, or `python -m
alexnet_dist.bench`, in a code block or an inline code span. Its flags must parse into a valid Config (nothing is
trained), and every repository path it names must exist or be one that the run, or `make`, creates.
"""

import re
import shlex
from pathlib import Path

import pytest
from conftest import ROOT

from alexnet_dist import bench, cli
from alexnet_dist.config import UsageError

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# top-level folders a run or `make` creates (checkpoints/: the default --save; data/: the default --data_dir)
CREATED = {"runs", "checkpoints", "data", ".venv", "wandb"}
# flags whose value is a file or folder the run writes
OUTPUTS = {"--save", "--run_dir", "--json_path", "--predict_json"}
SHELL = {"", "bash", "sh", "shell", "console"}  # the fences whose lines are commands (not ```text, ```yaml, ...)


def snippets(text: str) -> list:
    """(line number, text) of every shell code line (continuation lines joined) and every inline code span."""
    found, prose, fence, pending = [], [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        opens = line.lstrip().startswith("```")
        if opens:
            fence = line.strip()[3:].strip() if fence is None else None
        elif fence in SHELL or (fence is None and line.startswith("    ")):
            start, code = pending or (number, "")
            code += line.strip()
            pending = (start, code[:-1] + " ") if code.endswith("\\") else None
            if pending is None:
                found.append((start, code))
        prose.append("" if opens or fence is not None or line.startswith("    ") else line)  # numbering kept
    prose = "\n".join(prose)
    for span in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)*)`", prose):  # a span may wrap, not cross a blank line
        found.append((prose.count("\n", 0, span.start()) + 1, " ".join(span.group(1).split())))
    return found


def segments(code: str) -> list:
    """The simple commands of a shell line: split at ; && || | and redirections, comments dropped."""
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    parts, words = [], []
    for word in lexer:
        if word and set(word) <= set("();<>|&"):
            parts.append(words)
            words = []
        else:
            words.append(word)
    return [part for part in parts + [words] if part]


# what `make train` passes launch/train.py before $(ARGS), as its recipe in the Makefile says
MAKE_TRAIN_FLAGS = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "launch/train.py" in line
                        ).split("launch/train.py", 1)[1].replace("$(ARGS)", "").split()


def target(words: list) -> tuple | None:
    """(what it runs: 'train' or 'bench', the words before its arguments, its arguments), or None."""
    command = words[next((i for i, word in enumerate(words) if not re.match(r"\w+=", word)), len(words)):]
    if command[:2] == ["make", "train"]:
        given = [word.split("=", 1)[1] for word in command[2:] if word.startswith("ARGS=")]
        return "train", command[:2], [*MAKE_TRAIN_FLAGS, *shlex.split(given[0] if given else "")]
    for index, word in enumerate(words):
        if word.endswith(("launch/train.py", "launch/slurm.sh")) or Path(word).name == "alexnet-dist-train":
            return "train", words[: index + 1], words[index + 1:]
        if word == "-m" and words[index + 1: index + 2] == ["alexnet_dist.bench"]:
            return "bench", words[: index + 2], words[index + 2:]
    return None


def shown_commands() -> list:
    """(where, the command as shown, what it runs, the words before its arguments, its arguments)."""
    commands = []
    for document in DOCUMENTS:
        for number, code in snippets(document.read_text()):
            where = f"{document.relative_to(ROOT)}:{number}"
            try:
                parts = segments(code)
            except ValueError:  # quotes that do not close: prose in a span (don't), or a broken command
                if re.search(r"launch/train\.py|alexnet-dist-train|alexnet_dist\.bench|make train", code):
                    commands.append((where, code, "broken", [], []))
                continue
            commands += [(where, code, *target(words)) for words in parts if target(words)]
    return commands


COMMANDS = shown_commands()


def repository_paths(words: list) -> list:
    """(path, whether the run or `make` creates it) for the words that name a path inside the repository."""
    tops = {path.name for path in ROOT.iterdir()} | CREATED
    paths = []
    for previous, word in zip([None, *words], words):
        value = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word
        first = value.split("/")[0]
        if "/" in value and first in tops:
            paths.append((value, first in CREATED or previous in OUTPUTS or word.split("=")[0] in OUTPUTS))
        elif value in tops and not word.startswith("-"):
            paths.append((value, value in CREATED))
    return paths


def test_the_documents_show_commands():
    """The reader found them: one that found none would pass every document."""
    where = {command[0].split(":")[0] for command in COMMANDS}
    assert "README.md" in where and len(COMMANDS) >= 20, COMMANDS


@pytest.mark.parametrize("where,shown,kind,launcher,arguments", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_shown_command_parses_and_names_paths_that_exist(where, shown, kind, launcher, arguments, monkeypatch,
                                                            capsys):
    assert kind != "broken", f"{where}: {shown}\n  its quotes do not close"
    monkeypatch.chdir(ROOT)  # the documents' commands run from the repository's root
    parse = bench.parse_flags if kind == "bench" else cli.parse_flags
    try:
        parse(arguments)
    except UsageError as error:
        pytest.fail(f"{where}: {shown}\n  error: {error}")
    except SystemExit as exit_info:  # --help exits 0; Fire's own complaints exit 2
        assert exit_info.code == 0, f"{where}: {shown}\n  {capsys.readouterr().err}"
    missing = [path for path, created in repository_paths(launcher + arguments) if not created
               and not (ROOT / path).exists()]
    assert not missing, f"{where}: {shown}\n  names {missing}, which the repository does not hold"


SAMPLE = """\
Run `accelerate launch -q launch/train.py
--num_epochs 3` or the benchmark.

```bash
srun --ntasks 2 torchrun --nproc_per_node 2 launch/train.py --seed 1 \\
    --lr 0.1   # a comment
WANDB_MODE=offline make train ARGS="--dataset fake --num_epochs 2" && python -m alexnet_dist.bench --steps 1
```

```text
launch/train.py     the entry point (a listing, not a command)
```

    .venv/bin/alexnet-dist-train --help > help.txt
"""


def test_the_reader_finds_commands_in_every_form_the_documents_use():
    """Inline spans that wrap, continuation lines, comments, launcher prefixes, `make train ARGS=...`, `&&`,
    redirections; never a ```text listing."""
    found = [target(words) for _, code in snippets(SAMPLE) for words in segments(code) if target(words)]
    assert found == [
        ("train", ["srun", "--ntasks", "2", "torchrun", "--nproc_per_node", "2", "launch/train.py"],
         ["--seed", "1", "--lr", "0.1"]),
        ("train", ["make", "train"], ["--num_epochs", "25", "--dataset", "fake", "--num_epochs", "2"]),
        ("bench", ["python", "-m", "alexnet_dist.bench"], ["--steps", "1"]),
        ("train", [".venv/bin/alexnet-dist-train"], ["--help"]),
        ("train", ["accelerate", "launch", "-q", "launch/train.py"], ["--num_epochs", "3"]),
    ]


def recipe_rows() -> list:
    """(folder, row) for every table row of docs/results.md that links a run's raw files."""
    text = (ROOT / "docs" / "results.md").read_text()
    return [(found.group(1), line) for line in text.splitlines() if line.startswith("|")
            for found in [re.search(r"\]\(results/recipes/([^/)]+_seed\d+)/\)", line)] if found]


@pytest.mark.parametrize("folder,row", recipe_rows(), ids=[folder for folder, _ in recipe_rows()])
def test_a_results_row_shows_its_runs_own_figures(folder, row):
    """The three validation figures (centre / flip / ten views) and the wall time a row of docs/results.md shows
    are those of the metrics file in the folder it links (read by docs/results/recipes/table.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("table", ROOT / "docs" / "results" / "recipes" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    got = table.figures(ROOT / "docs" / "results" / "recipes" / folder)
    assert "{:.2f} / {:.2f} / {:.2f}%".format(*got["modes"]) in row
    assert f"| {got['wall']:,.0f} s" in row


def test_every_run_folder_has_a_row():
    """No run's raw files sit in docs/results/recipes/ without a row in docs/results.md."""
    folders = {path.parent.name for path in (ROOT / "docs" / "results" / "recipes").glob("*_seed*/metrics.jsonl")}
    assert folders == {folder for folder, _ in recipe_rows()}
