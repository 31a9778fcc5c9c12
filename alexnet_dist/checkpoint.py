"""Weights files: written atomically, read back with a one-line error for anything that does not fit.

A weights file (`save`, `load_model_path`) is the model's plain state_dict plus what is needed to
use it alone: the configuration it was trained with and the class names. Plain state_dicts (the
seed's files) load too.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from .config import UsageError
from .files import atomic_write
from .model import architecture, layer_name
from .runtime import stop_together

WEIGHTS_FORMAT = "alexnet-dist weights 1"


def save_weights(path, model, config: dict, classes) -> None:
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    atomic_write(
        path,
        lambda temporary: torch.save(
            {
                "format": WEIGHTS_FORMAT,
                "state_dict": state_dict,
                "config": config,
                "classes": list(classes),
                "architecture": architecture(model),
            },
            temporary,
        ),
    )


def read_weights(path) -> dict:
    """{'state_dict', 'config', 'classes', 'architecture'} of a weights file (config and classes may be None)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--load_model_path {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(
            f"--load_model_path {path} is not a weights file ({type(error).__name__}: torch.load failed)"
        ) from None
    if isinstance(payload, dict) and payload.get("format") == WEIGHTS_FORMAT:
        return payload
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        arch = _infer_architecture(payload)
        if arch is None:
            raise UsageError(f"--load_model_path {path} holds the weights of another network, not AlexNet's")
        return {"state_dict": payload, "config": None, "classes": None, "architecture": arch}
    raise UsageError(f"--load_model_path {path} is not a weights file (no AlexNet state_dict in it)")


def _infer_architecture(state_dict: dict) -> dict | None:
    try:
        conv1, conv2 = state_dict["features.0.weight"], state_dict["features.4.weight"]
        logits = state_dict[f"{layer_name('fc3')}.weight"]
        return {"groups": conv1.shape[0] // conv2.shape[1], "num_classes": logits.shape[0]}
    except (KeyError, IndexError, ZeroDivisionError):
        return None


def describe(arch: dict | None) -> str:
    if arch is None:
        return "another network"
    return f"groups={arch['groups']} and {arch['num_classes']} classes"


def check_architecture(payload: dict, wanted: dict, path):
    """A weights file of another architecture or class count is refused, naming both."""
    if payload["architecture"] != wanted:
        raise UsageError(
            f"--load_model_path {path} holds weights for {describe(payload['architecture'])}, "
            f"this run builds AlexNet with {describe(wanted)}"
        )


def load_weights(model, path, payload: dict | None = None) -> dict:
    """Load a weights file (read already: `payload`) into `model`; another architecture or class count is refused."""
    payload = payload or read_weights(path)
    wanted = architecture(model)
    check_architecture(payload, wanted, path)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UsageError(f"--load_model_path {path} does not fit AlexNet with {describe(wanted)}: {first}") from None
    return payload


# ---------------------------------------------------------------- training state

STATE_FILE = "trainer_state.json"
REQUIRED_FILES = (STATE_FILE, "pytorch_model.bin", "optimizer.bin")


# Not Accelerate's ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N): its save_state deletes
# the oldest checkpoints before it writes the new one, and writes checkpoint_<save count> in place, so a kill
# leaves a half-written newest folder (with total_limit=1, and no other); it keeps no best checkpoint.
class Checkpoints:
    """Full training states in RUN_DIR/checkpoints/step-<global step>/, each complete or absent.

    Every rank writes its part (the main process the model and optimizer, each rank its RNG state)
    into a temporary folder; the main process renames it once all are done, so a crash at any
    moment leaves the previous checkpoints intact and no half-written one under a valid name.
    The last `keep` checkpoints are kept, and the one with the best validation accuracy.
    """

    def __init__(self, accelerator, folder: Path, keep: int):
        self.accelerator, self.folder, self.keep = accelerator, Path(folder), keep

    def save(self, state: dict) -> Path:
        accelerator = self.accelerator
        final = self.folder / f"step-{state['global_step']:07d}"
        temporary = self.folder / f".tmp-{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        accelerator.wait_for_everyone()

        def write():  # every rank its RNG state; the main process the model, optimizer and trainer state
            accelerator.save_state(str(temporary), safe_serialization=False)
            if accelerator.is_main_process:
                (temporary / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

        def publish():
            if accelerator.is_main_process:
                if final.exists():
                    _remove(final)
                os.replace(temporary, final)
                self.prune()

        for action in (write, publish):  # each ends in an agreement: a rank that failed (a full disk) stops all
            try:
                action()
                error = None
            except Exception as failure:
                error = (f"could not save the checkpoint {final} ({type(failure).__name__}: {failure}); the run "
                         f"stopped; its complete checkpoints are in {self.folder}: free space and continue with "
                         "--resume latest")
            stop_together(accelerator, error, code=1)
        return final

    def prune(self):
        saved = complete_checkpoints(self.folder)
        scores = {path: read_state(path).get("val_accuracy") for path in saved}
        scored = [path for path in saved if scores[path] is not None]
        best = max(scored, key=lambda path: scores[path], default=None)
        for path in saved[: -self.keep]:
            if path != best:
                _remove(path)

    def clean(self, newer_than: int):
        """Before resuming: remove what a crash left (temporary and half-deleted folders), and the
        checkpoints past the resumed one, which the resumed run replaces."""
        if self.accelerator.is_main_process and self.folder.is_dir():
            for leftover in list(self.folder.glob(".tmp-*")) + list(self.folder.glob(".trash-*")):
                shutil.rmtree(leftover, ignore_errors=True)
            for path in complete_checkpoints(self.folder):
                if int(path.name.split("-")[1]) > newer_than:
                    _remove(path)
        self.accelerator.wait_for_everyone()


def _remove(path: Path):
    trash = path.with_name(f".trash-{path.name}")
    os.replace(path, trash)  # atomic: never a half-deleted folder under a checkpoint's name
    shutil.rmtree(trash, ignore_errors=True)


def complete_checkpoints(folder: Path) -> list:
    """Checkpoint folders under `folder`, oldest first (by global step)."""
    if not Path(folder).is_dir():
        return []
    return sorted(path for path in Path(folder).glob("step-*") if (path / STATE_FILE).is_file())


def read_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint; UsageError if the checkpoint is incomplete or damaged."""
    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise UsageError(f"--resume {path} is not a complete checkpoint (no {missing[0]})")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not {"global_step", "epoch", "step_in_epoch", "config"} <= set(state):
            raise ValueError
    except (ValueError, OSError):
        raise UsageError(f"--resume {path}: {STATE_FILE} is damaged; resume from an older checkpoint") from None
    return state
