"""`make train` / `make test` set up .venv once, and again when what it was built from changes (TORCH included);
`make train` starts Accelerate's launcher with every setting given."""

import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

# stands in for python3: `-m venv DIR` makes DIR/bin/python, which only records the pip commands it is given
FAKE_PYTHON = """\
#!/bin/sh
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "$*" >> "%s/installs.log"\\n' "$PWD" > "$3/bin/python"
chmod +x "$3/bin/python"
"""


# launched in place of launch/train.py: the precision --mixed_precision auto picks, under the launcher's settings, on
# a CPU that multiplies bf16 natively
PRECISION_PROBE = """\
from alexnet_dist import runtime

runtime.cpu_has_native_bf16 = lambda: True
print("precision", runtime.resolve_precision("auto", on_cpu=True))
"""


def launcher_options(folder, *settings) -> list:
    """The options `make train` gives accelerate launch (before the script), as `make -n` shows them."""
    shown = subprocess.run(["make", "-n", "train", *settings], cwd=folder, capture_output=True, text=True, check=True)
    line = next(line for line in shown.stdout.splitlines() if "accelerate launch" in line)
    return shlex.split(line.split("accelerate launch", 1)[1].split("launch/train.py", 1)[0])


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_train_starts_the_launcher_without_its_warning_and_the_script_picks_the_precision(tmp_path):
    """Every setting Accelerate would default (and list in a warning, the first thing a new user would read) is
    given; its precision 'no' reaches the script as "not set", so --mixed_precision auto still picks bf16 on a CPU
    that has it. A process per GPU where there are several."""
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path)
    assert launcher_options(tmp_path, "GPUS=4")[-3:] == ["--multi_gpu", "--num_processes", "4"]
    options = launcher_options(tmp_path, "GPUS=0")
    assert options[-2:] == ["--num_processes", "1"]
    (tmp_path / "probe.py").write_text(PRECISION_PROBE)
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *options, "probe.py"],
                              cwd=tmp_path, env=cli_env(HF_HOME=str(tmp_path / "hf")),  # no accelerate config here
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr
    assert "had defaults used instead" not in launched.stderr, launched.stderr
    assert launched.stdout.splitlines() == ["precision bf16"], launched.stdout


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
