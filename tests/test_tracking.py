"""Trackers, the run directory's metrics and plots, and predictions, through the real entry point."""

import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, cli_env, metric_rows, narrow_network, run_cli
from PIL import Image
from torchvision.io import write_png

from alexnet_dist.data import fake


def wandb_summary(path: Path) -> dict:
    """The summary of an offline W&B run, read from its .wandb log (LevelDB-style blocks of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, position, parts, summary = path.read_bytes(), 7, [], {}
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        parts = [chunk] if kind in (1, 2) else parts + [chunk]
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            if record.WhichOneof("record_type") == "summary":
                summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.summary.update})
    return summary


def test_offline_wandb_run_holds_the_final_accuracies(tmp_path):
    env = cli_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb_dir"))
    began = time.monotonic()
    result = run_cli(
        QUICK
        + [
            "--logger",
            "wandb",
            "--log_freq",
            "1",
            "--run_name",
            "offline-test",
            "--num_epochs",
            "3",
            "--init",
            "kaiming",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    summary = wandb_summary(runs[0])
    _, correct, total = result.accuracy()
    assert summary["Accuracy/Test"] == pytest.approx(correct / total)  # what the run printed
    last = json.loads(next((tmp_path / "runs").iterdir()).joinpath("metrics.jsonl").read_text().splitlines()[-1])
    wall = time.monotonic() - began
    for key in ("Accuracy/Test", "Accuracy/Validation_final/tta_ten", "Accuracy/Train_fit", "time/total",
                "time/training"):
        assert summary[key] == pytest.approx(last[key])  # the same as the run's own metrics file
    # the fit: every training image (fewer than the sample's 5,000) without augmentation or dropout
    fit = re.search(r"fit: final weights on (\d+) training images \(centre crop, no dropout\): ([\d.]+)%",
                    result.stdout)
    assert int(fit.group(1)) == 180
    assert float(fit.group(2)) == pytest.approx(100 * last["Accuracy/Train_fit"], abs=0.005)
    # the breakdown: its parts add up to its total, which is the process's time, within what the test saw
    parts = [value for key, value in last.items() if key.startswith("time/") and key != "time/total"]
    assert len(parts) == 9 and sum(parts) == pytest.approx(last["time/total"], abs=0.01)
    assert 0 < last["time/training"] < last["time/total"] <= wall
    validation = [
        json.loads(line)
        for line in next((tmp_path / "runs").iterdir()).joinpath("metrics.jsonl").read_text().splitlines()
        if "Accuracy/Validation" in line and "final" not in line
    ]
    assert len(validation) == 3  # the summary keeps the best epoch's validation accuracy, not the last one
    assert summary["Accuracy/Validation"] == {
        "max": pytest.approx(max(row["Accuracy/Validation"] for row in validation))
    }
    assert "Loss/Train" in summary and "images_per_second" in summary and summary["optimizer_step"] == 15
    # the end-of-run pictures: a predictions table (seeded sample + confident mistakes) and the confused pairs
    files = runs[0].parent / "files"
    assert summary["test/predictions/_type"] == "table-file" and 100 <= summary["test/predictions/nrows"] <= 110
    rows = json.loads((files / summary["test/predictions/path"]).read_text())
    assert rows["columns"] == ["image", "true", "predicted", "probability", "top-3"]
    assert all(row[1].startswith("pattern") and 0 < row[3] <= 1 for row in rows["data"])
    for name in ("test/most_confused_pairs", "test/confusion_matrix_image"):
        assert summary[f"{name}/_type"] == "image-file" and (files / summary[f"{name}/path"]).is_file()
    assert (next((tmp_path / "runs").iterdir()) / "ConfusedPairs.png").is_file()
    assert result.stdout.count("wandb sync") == 1 and str(runs[0].parent) in result.stdout


def test_tensorboard_events_hold_the_three_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # with the paper's colour noise and cutout on: a run with them ends with its test accuracy (what they do to a
    # batch: test_loaders.py::test_colour_noise_and_cutout_change_training_batches_only)
    noisy = ["--pca_color", "0.1", "--cutout", "16"]
    result = run_cli(QUICK + noisy + ["--logger", "tensorboard", "--log_freq", "1", "--run_dir", "tb"],
                     cwd=tmp_path, in_process=True)
    assert result.returncode == 0, result.stderr
    events = list((tmp_path / "tb" / "alexnet-cifar10").glob("events.out.tfevents.*"))  # <run_dir>/<project>/
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"Loss/Train", "Accuracy/Train", "Accuracy/Validation"} <= set(tags)
    assert len(accumulator.Scalars("Loss/Train")) == 5  # one per optimizer step at log_freq 1
    _, correct, total = result.accuracy()
    assert accumulator.Scalars("Accuracy/Test")[-1].value == pytest.approx(correct / total)
    assert {"test/confusion_matrix_image", "test/most_confused_pairs"} <= set(accumulator.Tags()["images"])


def test_run_directory_metrics_plots_and_the_plot_command(tmp_path):
    without_wandb_mode = {key: value for key, value in cli_env().items() if key != "WANDB_MODE"}
    result = run_cli(QUICK + ["--num_epochs", "2", "--log_freq", "2", "--run_dir", "run"], cwd=tmp_path,
                     env=without_wandb_mode)
    assert result.returncode == 0, result.stderr
    assert not [path for path in tmp_path.rglob("*") if "wandb" in path.name]  # --logger none: no W&B files
    run = tmp_path / "run"
    rows = metric_rows(run)
    assert [row["step"] for row in rows if "Loss/Train" in row] == [2, 4, 6, 8, 10]
    assert [row["epoch"] for row in rows if "Accuracy/Validation" in row] == [1, 2]
    assert json.loads((run / "config.json").read_text())["num_epochs"] == 2
    pictures = ["LossTrain.png", "AccuracyTrain.png", "AccuracyValidation.png", "ConfusionMatrix.png"]
    for name in pictures:
        with Image.open(run / name) as image:
            image.verify()
    for name in pictures[:3]:
        (run / name).unlink()
    redraw = subprocess.run(
        [sys.executable, "-m", "alexnet_dist.plot", str(run)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert redraw.returncode == 0, redraw.stderr
    assert all((run / name).exists() for name in pictures[:3])
    assert "LossTrain.png: 1 run(s)" in redraw.stdout
    (tmp_path / "other").mkdir()  # a second run folder: the first epoch's rows of this one
    first_epoch = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 5]
    (tmp_path / "other" / "metrics.jsonl").write_text("\n".join(first_epoch) + "\n")
    overlay = subprocess.run(
        [sys.executable, "-m", "alexnet_dist.plot", str(run), "other", "--out", "compare"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert overlay.returncode == 0 and (tmp_path / "compare" / "LossTrain.png").exists()
    assert all(f"{name}: 2 run(s)" in overlay.stdout for name in pictures[:3])  # both runs drawn in every curve
    missing = subprocess.run(
        [sys.executable, "-m", "alexnet_dist.plot", "nowhere"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1


def test_two_processes_make_one_tracker_run(tmp_path):
    env = cli_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb_dir"))
    result = run_cli(QUICK + ["--logger", "wandb"], cwd=tmp_path, processes=2, env=env)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))) == 1
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_evaluation_and_predictions_use_the_preprocessing_the_weights_were_trained_with(tmp_path):
    """Weights trained with another resize, crop, mean and std, and a normalisation that acts (--lrn_alpha 2),
    evaluated and used for predictions without those flags: both follow the weights file, as a preprocessing and
    network written out here by hand do. The training run's own test accuracy, in ten views, is the hand-cut views'
    too. Predictions skip a file that is not an image and give the --top_k most probable classes, most probable
    first."""
    preprocessing = {"resize": (72, 72), "random_crop": (66, 66), "mean": (0.3, 0.4, 0.5), "std": (0.2, 0.25, 0.3)}
    flags = [f"--{name}={','.join(map(str, value))}" for name, value in preprocessing.items()]
    trained = run_cli(
        QUICK + flags + ["--init", "kaiming", "--num_epochs", "2", "--mixed_precision", "no", "--save", "model.pth",
                         "--tta", "ten", "--lr", "0.03", "--lrn_alpha", "2", "--val_size", "0.1", "--fraction_of_data",
                         "0.4"],  # 24 steps on 360 images: weights whose modes differ on the test images
        cwd=tmp_path, in_process=True,
    )
    assert trained.returncode == 0, trained.stderr
    _, test, classes = fake()
    for index in range(40):
        for split in ("train", "test"):
            folder = tmp_path / "images" / split / classes[int(test.labels[index])]
            folder.mkdir(parents=True, exist_ok=True)
            write_png(test.images[index], str(folder / f"{index:02d}.png"))
    # by hand: resize 72 (bilinear, antialiased, rounded to uint8), the centre 66 x 66, (x / 255 - mean) / std
    from alexnet_dist.model import alexnet

    with narrow_network():  # the width the run trained
        model = alexnet(num_classes=len(classes), dropout=0.0, lrn_alpha=2.0)
    model.load_state_dict(torch.load(tmp_path / "model.pth")["state_dict"])
    resized = (
        torch.nn.functional.interpolate(test.images.float(), size=(72, 72), mode="bilinear", antialias=True)
        .round()
        .clamp(0, 255)
    )
    mean, std = (torch.tensor(preprocessing[name]).view(1, 3, 1, 1) for name in ("mean", "std"))
    # the test-time views of the 66 x 66 crop: the centre, then (ten) the four corners, each with its mirror
    crops = [resized[:, :, top : top + 66, left : left + 66] for top, left in ((3, 3), (0, 0), (0, 6), (6, 0), (6, 6))]
    views = [view for crop in crops for view in (crop, crop.flip(-1))]
    with torch.no_grad():
        probabilities = [torch.softmax(model.eval()((view / 255 - mean) / std), dim=1) for view in views]
    # the report as the run prints it after its title: the accuracy, then each class's, from the predictions made here
    def report(used: int) -> str:
        right = (sum(probabilities[:used]) / used).argmax(dim=1) == test.labels
        lines = [f"accuracy {100 * right.float().mean():.2f}% ({right.sum()}/{len(right)} images)"]
        for index, name in enumerate(classes):
            mine = right[test.labels == index]
            lines.append(f"  {name:<8}  {100 * mine.float().mean():6.2f}%  ({len(mine)} images)")
        return "\n".join(lines)

    assert report(1) != report(10), "pick flags where the two modes differ, or this checks little"
    assert f"test (tta ten) {report(10)}" in trained.stdout
    broken = tmp_path / "images" / "test" / classes[0] / "broken.png"
    broken.write_bytes(b"not a png")
    for tta, used, top_k in (("none", 1, 3), ("ten", 10, 10)):
        expected = sum(probabilities[:used])[:40] / used
        plain = ["--load_model_path", "model.pth", "--mixed_precision", "no", "--tta", tta]
        prediction = run_cli(
            ["--predict", "images/test", "--predict_json", f"{tta}.json", "--top_k", top_k, *plain],
                cwd=tmp_path, in_process=True
        )
        assert prediction.returncode == 0, prediction.stderr
        predictions = json.loads((tmp_path / f"{tta}.json").read_text())
        assert len(predictions) == 40
        for entry in predictions:
            probabilities_given = [top["probability"] for top in entry["top"]]
            assert len(probabilities_given) == top_k and probabilities_given == sorted(probabilities_given)[::-1]
            predicted = {top["class"]: top["probability"] for top in entry["top"]}
            hand = dict(zip(classes, expected[int(Path(entry["file"]).stem)].tolist()))
            assert predicted == pytest.approx({name: hand[name] for name in predicted}, abs=1e-4), (tta, entry["file"])
            left_out = [probability for name, probability in hand.items() if name not in predicted]
            assert max(left_out, default=0.0) <= min(probabilities_given) + 1e-4  # the k most probable, none skipped
        if broken.exists():
            assert f"skipped images/test/{classes[0]}/broken.png" in prediction.stdout
            broken.unlink()  # evaluation refuses a folder with a file that is not an image
        correct = int((expected.argmax(dim=1) == test.labels[:40]).sum())
        evaluation = run_cli(["--train=False", "--dataset", "folder", "--data_dir", "images", *plain],
                             cwd=tmp_path, in_process=True)
        assert evaluation.returncode == 0, evaluation.stderr
        assert f"test (tta {tta}) accuracy {100 * correct / 40:.2f}% ({correct}/40 images)" in evaluation.stdout


def test_predictions_refuse_weights_of_another_network(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    (tmp_path / "a.png").write_bytes(b"")
    result = run_cli(["--predict", "a.png", "--load_model_path", "other.pth"], cwd=tmp_path, in_process=True)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: --load_model_path other.pth holds the weights of another network, not AlexNet's"
    )
