"""What README.md and docs/*.md show holds in a fresh clone: commands parse, name paths that exist, select tests; links
resolve.

A command counts when it runs launch/train.py (directly, or through accelerate launch, torchrun, srun, python,
`make train ARGS="..."` or launch/slurm.sh), the console script alexnet-dist-train, or `python -m
alexnet_dist.bench`, in a code block or an inline code span. Its flags must parse into a valid Config (nothing is
trained), and every repository path it names must be in a clone or be one that the run, `make`, or a command the
document shows before it (`mkdir`, `tar -C`) creates; a `--data_dir` a run reads (every dataset but the downloaded
cifar10 and the generated fake) must be so too. A `pytest` command must name tests that exist and a `-k` that selects
one. A link or image must lead to a file of the repository (an anchor, to a heading of it); README.md, the package's
long description on a package index, links to the repository only absolutely.
"""

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from alexnet_dist import bench, cli
from alexnet_dist.config import UsageError

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# top-level folders a run or `make` creates (checkpoints/: the default --save); data/ only as what --dataset cifar10
# downloads into (--data_dir), checked apart
CREATED = {"runs", "checkpoints", ".venv", "wandb"}
# the repository's address: README.md's links are absolute, to its main branch
REPOSITORY = "https://github.com/alexnet-dist/alexnet-dist"
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


# top-level folders .gitignore keeps out of a clone (data/, runs/, ...): what is in them locally is not in a clone
IGNORED = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
           if line.strip().endswith("/") and "*" not in line}


def in_a_clone(path: str) -> bool:
    return Path(path).parts[0] not in IGNORED and (ROOT / path).exists()


def made_by(words: list) -> set:
    """The folders a shell command makes: `mkdir [-p] DIR...` (and DIR's parents), `tar ... -C DIR`."""
    if not words:
        return set()
    if Path(words[0]).name == "mkdir":
        folders = [word for word in words[1:] if not word.startswith("-")]
    elif Path(words[0]).name == "tar":
        folders = [after for before, after in zip(words, words[1:]) if before in ("-C", "--directory")]
        folders += [word.split("=", 1)[1] for word in words if word.startswith("--directory=")]
    else:
        return set()
    made = set()
    for folder in folders:
        path = Path(folder)
        made |= {str(path), *(str(parent) for parent in path.parents if str(parent) != ".")}
    return made


def in_order(document: Path) -> list:
    """(line number, code) of the document's code lines and spans, in the order a reader meets them."""
    return sorted(snippets(document.read_text()), key=lambda found: found[0])


def shown_commands() -> list:
    """(where, the command as shown, what it runs, the words before its arguments, its arguments, the folders the
    document's commands before it make)."""
    commands = []
    for document in DOCUMENTS:
        made = set()
        for number, code in in_order(document):
            where = f"{document.relative_to(ROOT)}:{number}"
            try:
                parts = segments(code)
            except ValueError:  # quotes that do not close: prose in a span (don't), or a broken command
                if re.search(r"launch/train\.py|alexnet-dist-train|alexnet_dist\.bench|make train", code):
                    commands.append((where, code, "broken", [], [], frozenset(made)))
                continue
            for words in parts:
                if target(words):
                    commands.append((where, code, *target(words), frozenset(made)))
                made |= made_by(words)
    return commands


COMMANDS = shown_commands()


def repository_paths(words: list) -> list:
    """(path, whether the run or `make` creates it) for the words that name a path inside the repository."""
    tops = {path.name for path in ROOT.iterdir()} | CREATED | IGNORED
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


@pytest.mark.parametrize("where,shown,kind,launcher,arguments,made", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_shown_command_parses_and_names_paths_that_exist(where, shown, kind, launcher, arguments, made,
                                                            monkeypatch, capsys):
    assert kind != "broken", f"{where}: {shown}\n  its quotes do not close"
    monkeypatch.chdir(ROOT)  # the documents' commands run from the repository's root
    parse = bench.parse_flags if kind == "bench" else cli.parse_flags
    cfg = None
    try:
        cfg = parse(arguments)
    except UsageError as error:
        pytest.fail(f"{where}: {shown}\n  error: {error}")
    except SystemExit as exit_info:  # --help exits 0; Fire's own complaints exit 2
        assert exit_info.code == 0, f"{where}: {shown}\n  {capsys.readouterr().err}"
    missing = [path for path, created in repository_paths(launcher + arguments)
               if not created and not in_a_clone(path) and str(Path(path)) not in made]
    assert not missing, f"{where}: {shown}\n  names {missing}: not in a clone, and no command before it makes them"
    if kind == "train" and cfg is not None and cfg.train and cfg.dataset not in ("cifar10", "fake"):
        # cifar10 is downloaded into data_dir and fake is generated; a folder must be there before the run
        data = str(Path(cfg.data_dir))
        assert in_a_clone(data) or data in made, (
            f"{where}: {shown}\n  reads --data_dir {cfg.data_dir}, which a clone does not hold and no command the "
            "document shows before it makes"
        )


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


# ---------------------------------------------------------------- pytest commands


def pytest_commands() -> list:
    """(where, the command as shown, its words after `pytest`) of every pytest command the documents show."""
    found = []
    for document in DOCUMENTS:
        for number, code in in_order(document):
            try:
                parts = segments(code)
            except ValueError:
                continue
            for words in parts:
                names = [Path(word).name for word in words]
                if "pytest" in names:
                    found.append((f"{document.relative_to(ROOT)}:{number}", code, words[names.index("pytest") + 1:]))
    return found


PYTEST_COMMANDS = pytest_commands()


def known_tests(path: Path) -> dict:
    """{test name: the names pytest's -k matches it by (its own, its class's, its module's, its folder's, its marks')}
    of a test module, read without importing it; parametrized ids are left out."""
    found = {}

    def marks(node) -> set:
        return {decorator.attr if isinstance(decorator, ast.Attribute) else getattr(decorator, "id", "")
                for decorator in (d.func if isinstance(d, ast.Call) else d for d in node.decorator_list)}

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            found[node.name] = {node.name, path.name, path.parent.name, *marks(node)}
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for method in node.body:
                if isinstance(method, ast.FunctionDef) and method.name.startswith("test"):
                    found[f"{node.name}::{method.name}"] = {method.name, node.name, path.name, path.parent.name,
                                                            *marks(node), *marks(method)}
    return found


def selects(expression: str, names: set) -> bool:
    """Whether pytest's -k EXPRESSION selects a test known by `names` (its matcher: a case-insensitive substring);
    False when pytest's evaluator (not public) cannot be used, which leaves the question to pytest itself."""
    def matches(part: str) -> bool:
        return any(part.lower() in name.lower() for name in names)

    try:
        from _pytest.mark.expression import Expression

        return Expression.compile(expression).evaluate(matches)
    except Exception:
        return False


@pytest.mark.parametrize("where,shown,arguments", PYTEST_COMMANDS, ids=[c[0] for c in PYTEST_COMMANDS])
def test_a_shown_pytest_command_selects_tests(where, shown, arguments):
    """Its files and FILE::TEST ids exist, and its -k selects at least one test of them (read from their source; a
    match found nowhere there is asked of pytest itself, which also sees parametrized ids)."""
    paths = [word for word in arguments if not word.startswith("-") and (word.endswith(".py") or "::" in word)]
    for path in paths:
        file, _, name = path.partition("::")
        assert (ROOT / file).is_file(), f"{where}: {shown}\n  {file} does not exist"
        assert not name or name.split("[")[0] in known_tests(ROOT / file), (
            f"{where}: {shown}\n  {file} has no test {name}")
    expressions = [after for before, after in zip(arguments, arguments[1:]) if before == "-k"]
    expressions += [word[2:] for word in arguments if word.startswith("-k") and len(word) > 2]
    files = sorted({ROOT / path.partition("::")[0] for path in paths}) or sorted((ROOT / "tests").glob("test_*.py"))
    for expression in expressions:
        if any(selects(expression, names) for file in files for names in known_tests(file).values()):
            continue
        collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                    "-k", expression, *map(str, files)], cwd=ROOT, capture_output=True, text=True)
        assert collected.returncode == 0, f"{where}: {shown}\n  -k {expression!r} selects no test:\n{collected.stdout}"


# ---------------------------------------------------------------- links


def outside_code(text: str) -> list:
    """The document's lines with code blocks and inline code spans blanked (line numbers kept)."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            lines.append("")
        elif fence or line.startswith("    "):
            lines.append("")
        else:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def headings(document: Path) -> set:
    """The anchors GitHub gives the document's headings: lowercase, punctuation dropped, spaces as hyphens."""
    slugs, seen, fence = set(), {}, False
    for line in document.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            slugs.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return slugs


INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
DEFINITION = re.compile(r"^ {0,3}\[([^\]]+)\]:\s+<?(\S+?)>?(?:\s.*)?$")
REFERENCE = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])+)\]\[([^\]]*)\]")
IN_REPOSITORY = re.compile(re.escape(REPOSITORY) + r"/(?:blob|tree|raw)/main/(.*)")


def links() -> list:
    """(where, the link's target) of every link, image and link definition of the documents, outside code."""
    found = []
    for document in DOCUMENTS:
        for number, line in enumerate(outside_code(document.read_text()), 1):
            where = f"{document.relative_to(ROOT)}:{number}"
            definition = DEFINITION.match(line)
            targets = [definition.group(2)] if definition else INLINE_LINK.findall(line)
            found += [(where, target) for target in targets]
    return found


LINKS = links()


def test_the_documents_have_links():
    assert len(LINKS) >= 30 and any(where.startswith("README.md") for where, _ in LINKS), LINKS


@pytest.mark.parametrize("where,link", LINKS, ids=[f"{where} {link}" for where, link in LINKS])
def test_a_link_leads_to_a_file_of_the_repository(where, link):
    """A relative link (or an absolute one into this repository's main branch) names a file or folder the repository
    holds, and its anchor a heading of that document. README.md is the package's long description too, which a
    package index shows away from the repository: its links into the repository are absolute."""
    document = ROOT / where.split(":")[0]
    if re.match(r"[a-z]+:", link) and not IN_REPOSITORY.match(link):
        return  # another site, or mail
    absolute = IN_REPOSITORY.match(link)
    if document.name == "README.md" and document.parent == ROOT:
        assert absolute, f"{where}: {link}\n  README.md links into the repository as {REPOSITORY}/blob/main/PATH"
    path, _, anchor = (absolute.group(1) if absolute else link).partition("#")
    file = (ROOT / path) if absolute else (document.parent / path if path else document)
    assert file.resolve().is_relative_to(ROOT) and file.exists(), f"{where}: {link}\n  leads to no repository file"
    if anchor and file.suffix == ".md":
        assert anchor in headings(file), f"{where}: {link}\n  {file.relative_to(ROOT)} has no heading #{anchor}"


def test_every_reference_link_is_defined():
    """`[text][name]` needs a `[name]: target` line in the same document, else it shows as plain brackets."""
    undefined = []
    for document in DOCUMENTS:
        lines = outside_code(document.read_text())
        defined = {match.group(1).lower() for line in lines for match in [DEFINITION.match(line)] if match}
        undefined += [f"{document.relative_to(ROOT)}:{number}: [{name or text}]"
                      for number, line in enumerate(lines, 1)
                      for text, name in REFERENCE.findall(line) if (name or text).lower() not in defined]
    assert not undefined, undefined


def test_no_document_line_is_longer_than_120_characters():
    """But table rows (a row cannot wrap: the flag tables are written from the config's help texts) and what a
    ```text block quotes (a printed line, as printed)."""
    long = []
    for document in DOCUMENTS:
        fence = None
        for number, line in enumerate(document.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fence = line.strip()[3:].strip() if fence is None else None
            elif len(line) > 120 and not line.startswith("|") and fence != "text":
                long.append(f"{document.relative_to(ROOT)}:{number} ({len(line)})")
    assert not long, long


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
