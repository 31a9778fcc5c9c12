"""The loaders: the stream loader (files decoded as training reaches them) and the training-only augmentations (PCA
colour noise, cutout)."""


import torch
from conftest import FOLDER, QUICK, launch_ranks, run_cli, write_image_folder

from alexnet_dist.data import fake

# ---------------------------------------------------------------- the stream loader




def test_stream_loader_trains_from_files_and_is_chosen_when_the_split_does_not_fit(tmp_path, monkeypatch):
    import alexnet_dist.data
    import alexnet_dist.training
    from alexnet_dist.cli import main
    from alexnet_dist.loaders import StreamLoader

    train, test, classes = fake()
    write_image_folder(tmp_path / "images", "train", train, classes, 200)
    write_image_folder(tmp_path / "images", "test", test, classes, 40)
    cache = tmp_path / "images" / ".alexnet_dist_cache"
    streamed = run_cli(FOLDER + ["--loader", "stream", "--save", "stream.pth"], cwd=tmp_path, in_process=True)
    assert streamed.returncode == 0, streamed.stderr
    assert "180 training / 20 validation images" in streamed.stdout and streamed.accuracy()[2] == 40
    assert not cache.exists()  # nothing decoded up front
    # --loader auto when the split does not fit: in this process, where the memory budget can be made tiny
    monkeypatch.setattr(alexnet_dist.data, "memory_budget", lambda device: 1000)
    made, make_loader = [], alexnet_dist.training.make_loader

    def recorded(*args, **kwargs):
        made.append(make_loader(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(alexnet_dist.training, "make_loader", recorded)
    main(FOLDER + ["--loader", "auto", "--num_workers", "0", "--save", "auto.pth"])
    # training, validation, the fit's sample of the training split, test
    assert len(made) == 4 and all(isinstance(loader, StreamLoader) for loader in made)
    assert not cache.exists()


def test_cuda_graphs_stay_off_with_the_stream_loader_on_data_in_memory():
    """--loader stream on generated (or CIFAR-10) images streams them too, so auto must leave the graphs off;
    preflight decides it, here for a stand-in of one GPU."""
    from types import SimpleNamespace

    from alexnet_dist.cli import parse_flags
    from alexnet_dist.preflight import preflight

    one_gpu = SimpleNamespace(device=torch.device("cuda"), num_processes=1, process_index=0, is_main_process=True)
    flags = QUICK + ["--cuda_graphs", "auto", "--mixed_precision", "bf16"]
    graphs = {
        loader: preflight(parse_flags(flags + ["--loader", loader]), one_gpu).graphs for loader in ("device", "stream")
    }
    assert graphs == {"device": True, "stream": False}


def test_an_unreadable_image_met_while_streaming_stops_every_rank_naming_it(tmp_path):
    train, _, classes = fake()
    paths = write_image_folder(tmp_path / "images", "train", train, classes, 64)
    paths[17].write_bytes(b"not a png")  # read only when training reaches it: --loader stream decodes nothing up front
    broken = str(paths[17].relative_to(tmp_path))
    ranks = launch_ranks(
        FOLDER + ["--loader", "stream", "--val_size", "0", "--batch_size", "16"], tmp_path
    )  # every image used
    codes = [rank.finish() for rank in ranks]
    assert codes == [2, 2], [rank.stderr for rank in ranks]
    assert f"error: unreadable image in the data set: {broken} (1 such file(s))" in ranks[0].stderr
    assert sum(rank.stderr.count(broken) for rank in ranks) == 1, [rank.stderr for rank in ranks]

# ---------------------------------------------------------------- PCA colour noise and cutout


def test_colour_noise_and_cutout_change_training_batches_only():
    from accelerate import Accelerator

    from alexnet_dist.cli import parse_flags
    from alexnet_dist.training import loader_factory

    train, held_out, _ = fake()
    accelerator = Accelerator(cpu=True)
    evaluation, training = {}, {}
    for name, extra in (("plain", []), ("noisy", ["--pca_color", "0.1", "--cutout", "16"])):
        make = loader_factory(parse_flags(QUICK + extra), accelerator, 32, train)
        loader = make(held_out)
        evaluation[name] = [
            view for images, _, _ in loader.eval_batches(64) for view in loader.augmentation.views(images, 10)
        ]
        training[name] = next(make(train).train_epoch(0))[0]
    assert len(evaluation["noisy"]) == 40 and all(
        torch.equal(a, b) for a, b in zip(evaluation["plain"], evaluation["noisy"])
    )
    # training: a square of zeros (the mean colour, which no pixel of the plain batch hits) of 8 x 8 to 16 x 16
    # pixels...
    cut = (training["noisy"] == 0).all(dim=1)
    assert not (training["plain"] == 0).all(dim=1).any()
    assert all(64 <= int(pixels) <= 256 for pixels in cut.sum(dim=(1, 2)))
    # ...and elsewhere one colour shift per image and channel
    shift = training["noisy"] - training["plain"]
    outside = [shift[image, channel][~cut[image]] for image in range(len(shift)) for channel in range(3)]
    assert max(float(values.max() - values.min()) for values in outside) < 1e-4
    assert min(float(values.abs().max()) for values in outside) > 0
    # a whole run with them: test_tracking.py::test_tensorboard_events_hold_the_three_curves
