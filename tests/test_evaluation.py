"""Evaluation through the real entry point: the weight average (--ema) saved, evaluated and resumed, and the test-time
views (--tta) of evaluation and predictions."""

import json
import re
from pathlib import Path

import torch
from conftest import (
    FOLDER,
    RESUMABLE,
    assert_same_weights,
    first_epoch_of,
    metric_rows,
    narrow_network,
    run_cli,
    write_image_folder,
)

from alexnet_dist.checkpoint import read_weights
from alexnet_dist.data import fake

# ---------------------------------------------------------------- the weight average (--ema)


def test_weight_average_is_saved_evaluated_logged_and_resumed_bit_for_bit(tmp_path):
    flags = RESUMABLE + ["--ema", "0.9"]
    straight = run_cli(flags + ["--num_epochs", "2", "--run_dir", "straight", "--keep_checkpoints", "2",
                                "--save", "straight.pth"], cwd=tmp_path, in_process=True)
    assert straight.returncode == 0, straight.stderr
    first_epoch_of(tmp_path / "straight", tmp_path / "resumed")
    resumed = run_cli(
        flags + ["--num_epochs", "2", "--run_dir", "resumed", "--resume", "latest", "--save", "resumed.pth"],
        cwd=tmp_path, in_process=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from resumed/checkpoints/step-0000005" in resumed.stdout
    average, final = (read_weights(tmp_path / name)["state_dict"] for name in ("straight_ema.pth", "straight.pth"))
    again = read_weights(tmp_path / "resumed_ema.pth")["state_dict"]
    assert_same_weights(average, again, exact=True)  # the resume restored the average exactly
    assert not all(torch.equal(average[name], final[name]) for name in average)  # and it is not the final weights
    validation = {
        run: [
            row.get("Accuracy/Validation_EMA") for row in metric_rows(tmp_path / run) if "Accuracy/Validation" in row
        ]
        for run in ("straight", "resumed")
    }
    assert len(validation["straight"]) == 2 and None not in validation["straight"]
    assert validation["resumed"] == validation["straight"]
    evaluate = ["--dataset", "fake", "--train=False", "--load_model_path", "straight_ema.pth", "--mixed_precision",
                "no", "--tta", "none"]
    evaluation = run_cli(evaluate, cwd=tmp_path, in_process=True).ok()
    assert evaluation.accuracy() == straight.accuracy("test, averaged weights, (tta none)")  # what training said

# ---------------------------------------------------------------- test-time views in evaluation and predictions


def test_evaluation_and_predictions_use_the_test_time_views_asked_for(tmp_path):
    from test_engine import hand_cut_views

    from alexnet_dist.data import read_image, resize_images
    from alexnet_dist.model import alexnet

    train, _, classes = fake()
    paths = write_image_folder(tmp_path / "images", "train", train, classes, 1000)  # no test/: the validation split
    # 10 steps that leave the three modes apart on 300 validation images
    flags = FOLDER + ["--fraction_of_data", "0.25", "--val_size", "0.3", "--num_epochs", "2", "--lr", "0.03", "--init",
                      "kaiming"]
    trained = run_cli(flags + ["--save", "model.pth"], cwd=tmp_path, in_process=True)
    assert trained.returncode == 0, trained.stderr
    finals = {
        mode: re.search(rf"final validation accuracy, final weights, tta {mode}: ([\d.]+)%", trained.stdout).group(1)
        for mode in ("none", "flip", "ten")
    }
    assert len(set(finals.values())) == 3, f"{finals}: pick flags where the modes differ, or this checks little"
    for mode, expected in finals.items():
        evaluation = run_cli(flags + ["--train=False", "--load_model_path", "model.pth", "--tta", mode],
                             cwd=tmp_path, in_process=True)
        assert evaluation.returncode == 0, evaluation.stderr
        assert "evaluating on the validation split instead" in evaluation.stdout
        assert evaluation.accuracy(f"validation (tta {mode})")[0] == expected
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    for path in paths[:6]:
        (chosen / path.name).write_bytes(path.read_bytes())
    files = sorted(chosen.iterdir())
    weights = read_weights(tmp_path / "model.pth")
    with narrow_network():  # the width the run trained
        model = alexnet(num_classes=10)
    model.load_state_dict(weights["state_dict"])
    model.eval()
    views = hand_cut_views(
        resize_images(torch.stack([read_image(path) for path in files]), (70, 70)), (64, 64), (0.5,) * 3, (0.5,) * 3
    )
    lines = {}
    for mode, used in (("none", 1), ("ten", 10)):
        result = run_cli(
            [
                "--predict",
                "chosen",
                "--load_model_path",
                "model.pth",
                "--tta",
                mode,
                "--top_k",
                "10",
                "--mixed_precision",
                "no",
                "--predict_json",
                f"{mode}.json",
            ],
            cwd=tmp_path, in_process=True,
        )
        assert result.returncode == 0, result.stderr
        lines[mode] = [line for line in result.stdout.splitlines() if line.startswith("chosen/")]
        with torch.no_grad():
            expected = sum(torch.softmax(model(view), dim=1) for view in views[:used]) / used
        predicted = json.loads((tmp_path / f"{mode}.json").read_text())
        assert [Path(row["file"]).name for row in predicted] == [path.name for path in files]
        for row, probabilities in zip(predicted, expected):
            for top in row["top"]:
                assert abs(top["probability"] - float(probabilities[classes.index(top["class"])])) < 1e-5, (mode, row)
    assert len(lines["none"]) == 6 and lines["none"] != lines["ten"]
