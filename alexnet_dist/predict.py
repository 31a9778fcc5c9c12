"""Predict the classes of image files with saved weights: top-k classes and probabilities per image.

    python launch/train.py --predict photos/ --load_model_path checkpoints/model_X.pth [--top_k 3]
    python launch/train.py --predict [a.jpg,b.png] --load_model_path ... --predict_json predictions.json

Class names, the network and the preprocessing (resize, crop, mean, std) come from the weights
file (preflight.with_weights_settings); --tta picks the test-time views. An unreadable image is
reported by name and skipped.
"""

import json
from pathlib import Path

import torch

from .config import UsageError
from .data import IMAGE_EXTENSIONS, UnreadableImage, read_image, resize_images
from .engine import view_probabilities
from .files import write_text
from .layouts import choose_layout
from .runtime import stop_together
from .training import build_model
from .transforms import Augmentation


def image_paths(targets) -> list:
    """Files named directly, and the image files inside named folders (recursively, sorted)."""
    targets = targets if isinstance(targets, (list, tuple)) else [targets]
    paths = []
    for target in map(Path, map(str, targets)):
        if target.is_dir():
            paths += sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif target.exists():
            paths.append(target)
        else:
            raise UsageError(f"--predict {target} does not exist")
    if not paths:
        raise UsageError(f"--predict {', '.join(map(str, targets))} holds no image files")
    return paths


def predict(plan, accelerator) -> list:
    """[{file, top: [{class, probability}]}] for every readable image; printed and optionally saved."""
    cfg, paths, weights = plan.cfg, plan.predict_paths, plan.weights
    classes = weights["classes"] or [str(i) for i in range(weights["architecture"]["num_classes"])]
    # a layout that cuts the network refuses --predict (layouts.check_flags): the whole network predicts here
    layout = choose_layout(cfg, accelerator.num_processes)
    model, _ = layout.place(build_model(cfg, accelerator, len(classes), weights), cfg, accelerator, optimizer=False)
    model.eval()
    augmentation = Augmentation(cfg.random_crop, cfg.mean, cfg.std, accelerator.device,
                                channels_last=accelerator.device.type == "cuda")
    top_k = min(cfg.top_k, len(classes))
    predictions = []
    for start in range(0, len(paths), 64):
        batch, names = [], []
        for path in paths[start:start + 64]:
            try:
                batch.append(resize_images(read_image(path)[None], cfg.resize))
                names.append(path)
            except UnreadableImage as error:
                accelerator.print(f"skipped {error}")
        if not batch:
            continue
        images = torch.cat(batch).to(accelerator.device)
        with accelerator.autocast():
            probabilities = view_probabilities(model, augmentation, images, cfg.tta)
        values, indices = probabilities.topk(top_k, dim=1)
        for path, row_values, row_indices in zip(names, values.tolist(), indices.tolist()):
            top = [{"class": classes[i], "probability": round(p, 6)} for p, i in zip(row_values, row_indices)]
            predictions.append({"file": str(path), "top": top})
            accelerator.print(f"{path}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in top))
    if cfg.predict_json:
        error = None
        if accelerator.is_main_process:
            try:
                write_text(cfg.predict_json, json.dumps(predictions, indent=1) + "\n")
            except OSError as failure:
                error = f"--predict_json {cfg.predict_json} cannot be written ({failure.strerror})"
        stop_together(accelerator, error)  # every rank stops with the main process, not in a later collective
        accelerator.print(f"wrote {len(predictions)} predictions to {cfg.predict_json}")
    return predictions
