"""A CIFAR-10 in the real format (Python 2 pickles, an archive), small, with the md5s torchvision must check it by."""

import hashlib
import io
import pickle
import tarfile

import numpy as np

CIFAR_CLASSES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett"]


class Py2Text(str):
    """A Python 2 `str` in a pickle, as in CIFAR-10's own files: text when read with encoding='latin1'
    (torchvision)."""


class Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_text(self, text):
        data = text.encode("latin1")
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)

    dispatch[Py2Text] = save_py2_text


def py2_pickle(value) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(value)
    return buffer.getvalue()


def cifar_members(per_batch: int = 40) -> dict:
    """{file name: bytes} of the files in cifar-10-batches-py/, `per_batch` random images a batch."""
    generator = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        members[name] = py2_pickle(
            {
                Py2Text("batch_label"): Py2Text(name),
                Py2Text("labels"): [int(label) for label in generator.integers(0, 10, per_batch)],
                Py2Text("data"): generator.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            }
        )
    members["batches.meta"] = py2_pickle(
        {Py2Text("label_names"): [Py2Text(name) for name in CIFAR_CLASSES], Py2Text("num_vis"): 3072}
    )
    return members


def cifar_archive(members: dict) -> bytes:
    """cifar-10-python.tar.gz holding `members`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def md5_lists(members: dict) -> dict:
    """The class attributes of torchvision's CIFAR10 that make it accept these files, as another copy of the
    data set would need."""
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in members.items()}
    return {
        "train_list": [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)],
        "test_list": [["test_batch", md5["test_batch"]]],
        "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]},
    }
