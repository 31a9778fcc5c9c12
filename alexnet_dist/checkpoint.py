"""Weights files: written atomically, read back with a one-line error for anything that does not fit.

A weights file (`save`, `load_model_path`) is the model's plain state_dict plus what is needed to
use it alone: the configuration it was trained with and the class names. Plain state_dicts (the
seed's files) load too.
"""

import os
from pathlib import Path

import torch

from .config import UsageError
from .model import architecture

WEIGHTS_FORMAT = "alexnet-dist weights 1"


def atomic_save(obj, path) -> None:
    """torch.save to a temporary name beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_weights(path, model, config: dict, classes) -> None:
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    atomic_save({"format": WEIGHTS_FORMAT, "state_dict": state_dict, "config": config, "classes": list(classes),
                 "architecture": architecture(model)}, path)


def read_weights(path) -> dict:
    """{'state_dict', 'config', 'classes', 'architecture'} of a weights file (config and classes may be None)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--load_model_path {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--load_model_path {path} is not a weights file ({type(error).__name__}: torch.load failed)") from None
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
        return {"groups": conv1.shape[0] // conv2.shape[1], "num_classes": state_dict["classifier.6.weight"].shape[0]}
    except (KeyError, IndexError, ZeroDivisionError):
        return None


def describe(arch: dict | None) -> str:
    if arch is None:
        return "another network"
    return f"groups={arch['groups']} and {arch['num_classes']} classes"


def load_weights(model, path) -> dict:
    """Load a weights file into `model`; a file for another architecture or class count is refused."""
    payload = read_weights(path)
    wanted = architecture(model)
    if payload["architecture"] != wanted:
        raise UsageError(
            f"--load_model_path {path} holds weights for {describe(payload['architecture'])}, "
            f"this run builds AlexNet with {describe(wanted)}"
        )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UsageError(f"--load_model_path {path} does not fit AlexNet with {describe(wanted)}: {first}") from None
    return payload
