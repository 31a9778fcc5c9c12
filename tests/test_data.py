import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_cifar10 import CIFAR_CLASSES, cifar_members, md5_lists
from PIL import Image
from torchvision.io import write_jpeg, write_png

from alexnet_dist import data as data_module
from alexnet_dist.config import Config, UsageError
from alexnet_dist.data import ImageSet, fake, load_data, split_indices
from alexnet_dist.loaders import make_loader
from alexnet_dist.transforms import Augmentation, colour_pca, draw_plan

CPU = torch.device("cpu")


def label_coded(count=96, classes=6, size=40) -> ImageSet:
    """Images whose every pixel is 10 + 40 * label, so any crop or flip still shows its label."""
    labels = torch.arange(count) % classes
    images = (10 + 40 * labels).to(torch.uint8)[:, None, None, None].expand(count, 3, size, size).contiguous()
    return ImageSet(labels, images)


def loader_for(imageset, rank=0, world=1, batch_size=16, micro_batch=16, stream=False, crop=(32, 32), resize=(40, 40)):
    """make_loader with a crop smaller than the CLI allows (fast tests): the flags as plain attributes."""
    flags = SimpleNamespace(resize=resize, random_crop=crop, flip=True, seed=3, translate=0, pca_color=0.0,
                            batch_size=batch_size, loader="stream" if stream else "device", num_workers=0)
    return make_loader(imageset, Augmentation(crop, (0.0,) * 3, (1.0,) * 3, CPU), CPU, flags, micro_batch, rank, world)


@pytest.mark.parametrize("stream", [False, True])
def test_labels_stay_aligned_after_augmentation(stream):
    loader = loader_for(label_coded(), stream=stream)
    batches = list(loader.train_epoch(0))
    assert len(batches) == 96 // 16
    for images, labels in batches:
        assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
        decoded = ((images * 255).round().long()[:, 0, 0, 0] - 10) // 40
        assert torch.equal(decoded, labels)


@pytest.mark.parametrize("stream", [False, True])
def test_loading_leaves_the_global_random_state_to_dropout(stream):
    """On the CPU, dropout draws from the global generator: a loader that drew from it too (a DataLoader seeds its
    workers so) would shift the masks of a run resumed mid-epoch against an unbroken one."""
    loader = loader_for(label_coded(), stream=stream)
    before = torch.get_rng_state()
    list(loader.train_epoch(0, 2))  # from step 2, as a resumed run
    list(loader.eval_batches(32))
    assert torch.equal(torch.get_rng_state(), before)


def test_crops_and_flips_match_slicing():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 12, 10), dtype=torch.uint8)
    augmentation = Augmentation((7, 6), (0.0,) * 3, (1.0,) * 3, CPU)
    top, left = torch.randint(0, 6, (8,)), torch.randint(0, 5, (8,))
    flip = torch.tensor([True, False] * 4)
    out = augmentation.crop_flip(images, top, left, flip)
    for i in range(8):
        expected = images[i, :, top[i]:top[i] + 7, left[i]:left[i] + 6]
        assert torch.equal(out[i], expected.flip(-1) if flip[i] else expected)


def test_evaluation_transform_is_deterministic_centre_crop():
    images = torch.randint(0, 256, (4, 3, 70, 70), dtype=torch.uint8)
    augmentation = Augmentation((64, 64), (0.5,) * 3, (0.5,) * 3, CPU)
    first, second = next(augmentation.views(images, 1)), next(augmentation.views(images, 1))
    assert torch.equal(first, second)
    expected = (images[..., 3:67, 3:67].float() / 255 - 0.5) / 0.5
    assert torch.allclose(first, expected, atol=1e-6)


def test_training_transform_is_random_but_seeded():
    plans = [draw_plan(500, (70, 70), (64, 64), True, seed, epoch) for seed, epoch in [(0, 0), (0, 1), (0, 0)]]
    assert not torch.equal(plans[0].top, plans[1].top)
    assert not torch.equal(plans[0].order, plans[1].order)
    assert torch.equal(plans[0].top, plans[2].top) and torch.equal(plans[0].flip, plans[2].flip)
    assert 0 < plans[0].flip.float().mean() < 1 and plans[0].top.max() == 6
    no_flip = draw_plan(500, (70, 70), (64, 64), False, 0, 0)
    assert not no_flip.flip.any()


def test_ranks_and_micro_steps_share_each_epoch_without_overlap():
    imageset = ImageSet(torch.arange(100), torch.zeros(100, 3, 40, 40, dtype=torch.uint8))
    seen = []
    for rank in range(2):
        loader = loader_for(imageset, rank=rank, world=2, batch_size=32, micro_batch=8)
        seen += [labels for _, labels in loader.train_epoch(0)]
    seen = torch.cat(seen)
    assert len(seen) == 96 and len(set(seen.tolist())) == 96  # 3 steps of 32, each image once
    single = torch.cat([labels for _, labels in loader_for(imageset, batch_size=32, micro_batch=32).train_epoch(0)])
    assert sorted(seen.tolist()) == sorted(single.tolist())


def test_evaluation_shards_cover_every_image_once():
    imageset = ImageSet(torch.arange(23), torch.zeros(23, 3, 40, 40, dtype=torch.uint8))
    counted = []
    for rank in range(3):  # shards of 8, 8 and 7 images
        batches = list(loader_for(imageset, rank=rank, world=3).eval_batches(3))
        # every rank runs the same shapes (the split layouts exchange activations), the last batch not padded to 3
        assert [len(labels) for _, labels, _ in batches] == [3, 3, 2]
        counted += [label for _, labels, valid in batches for label in labels[:valid].tolist()]
    assert sorted(counted) == list(range(23))


def test_split_is_disjoint_reproducible_and_without_replacement():
    train, val = split_indices(1000, 0.1, 0.5, seed=7)
    assert len(val) == 100 and len(train) == 450
    assert not set(train.tolist()) & set(val.tolist())
    assert len(set(train.tolist())) == len(train)
    again_train, again_val = split_indices(1000, 0.1, 0.5, seed=7)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    other_train, _ = split_indices(1000, 0.1, 0.5, seed=8)
    assert not torch.equal(train, other_train)
    assert len(split_indices(1000, 0.0, 1.0, seed=0)[1]) == 0


def test_fake_data_is_deterministic_and_labelled():
    first, second = fake(), fake()
    assert torch.equal(first[0].images, second[0].images) and torch.equal(first[0].labels, second[0].labels)
    assert first[0].images.shape == (1000, 3, 32, 32) and first[0].images.dtype == torch.uint8
    assert set(first[0].labels.tolist()) == set(range(10))


# ---------------------------------------------------------------- data sets on disk


def write_folder(root: Path, split: str, per_class=3, classes=("cat", "dog"), sizes=((32, 32),)):
    for label, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = sizes[i % len(sizes)]
            image = torch.full((3, height, width), 30 + 100 * label, dtype=torch.uint8)
            if i % 2:
                write_png(image, str(folder / f"{i}.png"))
            else:
                write_jpeg(image, str(folder / f"{i}.jpg"), quality=95)


def folder_config(root, **flags):
    return Config.from_flags({"dataset": "folder", "data_dir": str(root), "val_size": 0.0, "num_workers": 0,
                              "batch_size": 2, **flags})


def test_folder_with_test_split(tmp_path):
    write_folder(tmp_path, "train")
    write_folder(tmp_path, "test", per_class=2)
    data = load_data(folder_config(tmp_path), CPU, writer=True)
    assert data.classes == ["cat", "dog"]
    assert len(data.train) == 6 and len(data.test) == 4 and data.val is None
    assert data.train.images.shape == (6, 3, 32, 32)
    means = data.train.images.float().mean(dim=(1, 2, 3))
    assert torch.equal((means > 80).long(), data.train.labels)  # labels follow the class folders


def test_folder_without_test_split_says_so(tmp_path):
    write_folder(tmp_path, "train", sizes=((32, 32), (20, 48)))
    data = load_data(folder_config(tmp_path, resize=70, random_crop=64), CPU, writer=True)
    assert data.test is None and "no test/" in data.test_note
    assert data.train.images.shape == (6, 3, 70, 70)  # mixed sizes are resized when decoded


def test_folder_cache_is_reused_and_never_stale(tmp_path, monkeypatch):
    write_folder(tmp_path, "train")
    first = load_data(folder_config(tmp_path), CPU, writer=True).train.images
    assert list((tmp_path / ".alexnet_dist_cache").glob("images-*.pt"))

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data_module, "_decode_all", no_decoding)
    assert torch.equal(load_data(folder_config(tmp_path), CPU, writer=True).train.images, first)

    def decodes_again(config) -> bool:
        try:
            load_data(config, CPU, writer=True)
        except AssertionError:
            return True
        return False

    image = sorted((tmp_path / "train").rglob("*.*"))[0]
    stat = image.stat()
    assert decodes_again(folder_config(tmp_path, resize=72))  # another resize
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the same bytes, touched
    assert decodes_again(folder_config(tmp_path))
    image.write_bytes(image.read_bytes() + b"\0")  # another size, with the old modification time put back
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert decodes_again(folder_config(tmp_path))
    image.write_bytes(image.read_bytes()[:-1])  # as it was: the cache is valid again
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not decodes_again(folder_config(tmp_path))
    write_folder(tmp_path, "train", per_class=4)  # new files change the key
    assert decodes_again(folder_config(tmp_path))


def test_unwritable_cache_folder_is_refused_before_decoding(tmp_path, monkeypatch):
    write_folder(tmp_path, "train")
    (tmp_path / "blocker").write_text("")

    def no_decoding(*args):
        raise AssertionError("decoded every image before finding that the cache cannot be written")

    monkeypatch.setattr(data_module, "_decode_all", no_decoding)
    with pytest.raises(UsageError, match="cache in .*blocker/cache .*blocker is not a writable folder"):
        load_data(folder_config(tmp_path, cache_dir=str(tmp_path / "blocker" / "cache")), CPU, writer=True)
    assert not (tmp_path / "blocker").is_dir()


def test_bad_flags_of_a_folder_run_are_refused_before_any_image_is_decoded(tmp_path, monkeypatch, capsys):
    """--save, --resume and --load_model_path are checked on the file list: a folder of 50,000 JPEGs is not
    decoded, nor its cache written, for a run that is then refused."""
    from alexnet_dist.checkpoint import save_weights
    from alexnet_dist.cli import main
    from alexnet_dist.model import alexnet

    write_folder(tmp_path / "images", "train")
    (tmp_path / "notes.txt").write_text("")
    save_weights(tmp_path / "five.pth", alexnet(num_classes=5), {}, list("abcde"))  # this folder has 2 classes

    def no_decoding(*args):
        raise AssertionError("decoded the images before refusing the flags")

    monkeypatch.setattr(data_module, "_decode_all", no_decoding)
    monkeypatch.chdir(tmp_path)
    folder = ["--dataset", "folder", "--data_dir", "images", "--logger", "none", "--batch_size", "2", "--val_size",
              "0"]
    for flags, message in [
        (["--save", "notes.txt/model.pth"], "notes.txt/model.pth cannot be written"),
        (["--resume", "nowhere"], "--resume nowhere"),
        (["--load_model_path", "five.pth"], "groups=1 and 5 classes"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(folder + flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["five.pth", "images", "notes.txt"]  # no run folder
    assert os.listdir(tmp_path / "images") == ["train"]  # no cache


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_data(folder_config(tmp_path / "missing"), CPU, writer=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no train/ folder"):
        load_data(folder_config(tmp_path / "empty"), CPU, writer=True)
    write_folder(tmp_path / "broken", "train")
    bad = tmp_path / "broken" / "train" / "cat" / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UsageError, match="bad.jpg"):
        load_data(folder_config(tmp_path / "broken"), CPU, writer=True)


def test_16_bit_images_are_scaled_to_8_bits_not_wrapped(tmp_path):
    from alexnet_dist.data import read_image

    levels = np.array([[0, 128, 129, 1000, 32896, 65535]], dtype=np.uint16)  # a 16-bit greyscale PNG
    Image.fromarray(levels).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 1, 6)
    assert image[0, 0].tolist() == [0, 0, 1, 4, 128, 255]  # value * 255 / 65535, rounded: 1000 is 4, not 1000 % 256


def test_cifar10_batches_on_disk_are_read_and_checked(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    members = cifar_members(per_batch=4)
    for name, data in members.items():
        (folder / name).write_bytes(data)
    for name, value in md5_lists(members).items():  # torchvision checks every file against the real data set's md5s
        monkeypatch.setattr(CIFAR10, name, value)
    cfg = Config.from_flags({"data_dir": str(tmp_path), "val_size": 0.25, "batch_size": 4})
    data = load_data(cfg, CPU, writer=True)
    assert len(data.train) == 15 and len(data.val) == 5 and data.classes == CIFAR_CLASSES
    # the format: a row of 3072 bytes is the red, green and blue 32 x 32 planes; the test split keeps the file's order
    test_batch = pickle.loads(members["test_batch"], encoding="latin1")
    assert torch.equal(data.test.images, torch.from_numpy(test_batch["data"]).reshape(4, 3, 32, 32))
    assert data.test.labels.tolist() == test_batch["labels"]
    (folder / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(UsageError) as error:
        load_data(Config.from_flags({"data_dir": str(tmp_path), "batch_size": 4}), CPU, writer=True)
    assert str(error.value).startswith(f"{folder} is incomplete or corrupt") and f"delete {folder} " in str(
        error.value
    )


def test_translation_mirrors_the_borders():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 10, 10), dtype=torch.uint8)
    augmentation = Augmentation((8, 8), (0.0,) * 3, (1.0,) * 3, CPU)
    top, left = torch.tensor([-3, 0, 5, -1, 2, 4]), torch.tensor([2, -3, 5, 0, -2, 1])
    out = augmentation.crop_flip(images, top, left, torch.zeros(6, dtype=torch.bool))
    padded = torch.nn.functional.pad(images.float(), (3, 3, 3, 3), mode="reflect").to(torch.uint8)
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, top[i] + 3 : top[i] + 11, left[i] + 3 : left[i] + 11])
    plan = draw_plan(2000, (70, 70), (64, 64), True, 0, 0, translate=5)
    assert plan.top.min() == -5 and plan.top.max() == 11


def test_cutout_blanks_one_square_to_the_mean():
    images = torch.full((3, 3, 20, 20), 200, dtype=torch.uint8)
    for side, channels_last in ((6, True), (5, False)):
        augmentation = Augmentation((16, 16), (0.5,) * 3, (0.5,) * 3, CPU, cutout=side, channels_last=channels_last)
        plan = draw_plan(3, (20, 20), (16, 16), False, 0, 0)
        plan.cut_y, plan.cut_x = torch.tensor([8, 0, 15]), torch.tensor([7, 9, 15])  # inside, top edge, corner
        out = augmentation.train(images, plan)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last  # the GPU's layout survives
        blank = out[:, 0] == 0  # 0 is the mean colour after normalising
        rows, cols = blank.any(dim=2), blank.any(dim=1)
        # rows [c - side // 2, c - side // 2 + side) of 0..15: clipped at the top (c = 0) and bottom (c = 15)
        assert rows.sum(dim=1).tolist() == [side, side - side // 2, 1 + side // 2]
        assert cols.sum(dim=1).tolist() == [side, side, 1 + side // 2]
        assert rows[0].nonzero().min() == 8 - side // 2
        assert all(blank[i].sum() == rows[i].sum() * cols[i].sum() for i in range(3))  # one rectangle each


def test_pca_colour_follows_the_data_covariance():
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(4000, 1, generator=generator)
    pixels = torch.cat([base, 0.5 * base, 0.1 * torch.rand(4000, 1, generator=generator)], dim=1)
    images = (pixels * 255).round().to(torch.uint8).T.reshape(3, 4000, 1, 1).permute(1, 0, 2, 3)
    basis = colour_pca(images)
    eigenvalues = basis.norm(dim=0)
    strongest = basis[:, eigenvalues.argmax()] / eigenvalues.max()
    assert abs(abs(strongest[1] / strongest[0]) - 0.5) < 0.02  # along (1, 0.5, ~0)
    covariance = torch.cov(pixels.T.double()).float()
    assert torch.allclose(eigenvalues.sort().values, torch.linalg.eigvalsh(covariance), rtol=0.05, atol=1e-4)
    augmentation = Augmentation((1, 1), (0.0,) * 3, (1.0,) * 3, CPU, colour_basis=basis)
    colour = torch.zeros(2, 3)
    colour[0, eigenvalues.argmax()] = 1.0
    shifted, plain = augmentation.normalise(images[:2], colour=colour), augmentation.normalise(images[:2])
    assert torch.allclose(shifted[0] - plain[0], basis[:, eigenvalues.argmax()].view(3, 1, 1), atol=1e-5)
    assert torch.equal(shifted[1], plain[1])


def test_ten_test_views_are_the_papers():
    images = torch.arange(10 * 12, dtype=torch.float32).view(1, 1, 10, 12).expand(1, 3, 10, 12).to(torch.uint8)
    augmentation = Augmentation((6, 6), (0.0,) * 3, (1.0 / 255,) * 3, CPU)
    views = [view[0, 0] for view in augmentation.views(images, 10)]
    source = images[0, 0].float()
    expected = [source[2:8, 3:9], source[:6, :6], source[:6, 6:], source[4:, :6], source[4:, 6:]]
    for index, crop in enumerate(expected):
        assert torch.equal(views[2 * index], crop) and torch.equal(views[2 * index + 1], crop.flip(-1))
    assert torch.equal(next(augmentation.views(images, 1))[0, 0], expected[0])
