"""Files written whole or not at all, and paths checked for writing before a run spends time."""

import os
from pathlib import Path

from .config import UsageError


def atomic_write(path, write) -> Path:
    """`write(temporary_path)` beside `path`, then one rename: a crash never leaves half a file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def check_writable(flag: str, path: Path):
    """Fail now, not after training, when `path` cannot be written: its nearest existing folder must be one."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file path such as {path}/model.pth")
    parent = unwritable_folder(path.parent)
    if parent is not None:
        raise UsageError(f"{flag} {path} cannot be written ({parent} is not a writable folder)")


def unwritable_folder(folder: Path) -> Path | None:
    """The nearest existing path at or above `folder` when it is not a writable folder (so `folder` cannot be
    made and written), else None."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    return None if folder.is_dir() and os.access(folder, os.W_OK) else folder
