"""`make train` / `make test` set up .venv once, and again when what it was built from changes (TORCH included)."""

import shutil
import subprocess

import pytest
from conftest import ROOT

# stands in for python3: `-m venv DIR` makes DIR/bin/python, which only records the pip commands it is given
FAKE_PYTHON = """\
#!/bin/sh
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "$*" >> "%s/installs.log"\\n' "$PWD" > "$3/bin/python"
chmod +x "$3/bin/python"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_installs_again_when_torch_changes_and_only_then(tmp_path):
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path)
    (tmp_path / "fake_python").write_text(FAKE_PYTHON)
    (tmp_path / "fake_python").chmod(0o755)

    def setup(*settings) -> list:
        """The torch requirements each `make setup` installed."""
        log = tmp_path / "installs.log"
        log.unlink(missing_ok=True)
        subprocess.run(["make", "setup", "PYTHON=./fake_python", *settings], cwd=tmp_path, check=True,
                       capture_output=True)
        lines = log.read_text().splitlines() if log.exists() else []
        return [word for line in lines for word in line.split() if word.startswith("torch==")]

    assert setup() == ["torch==2.14.1"]
    assert setup() == []  # nothing changed
    assert setup("TORCH=torch==2.5.1 torchvision==0.20.1") == ["torch==2.5.1"]
    assert setup("TORCH=torch==2.5.1 torchvision==0.20.1") == []
    assert setup() == ["torch==2.14.1"]  # back to the default
