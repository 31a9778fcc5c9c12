"""The end-of-run dashboard: the most confident mistakes in the predictions table, the most confused pairs."""

from types import SimpleNamespace

import torch
from accelerate import Accelerator

from alexnet_dist import dashboard


def test_most_confused_pairs_are_the_largest_off_diagonal_cells_largest_first():
    confusion = torch.tensor([[50, 3, 9, 0], [7, 40, 0, 1], [0, 12, 30, 2], [5, 0, 0, 60]])
    assert dashboard.most_confused(confusion, 4) == [(2, 1, 12), (0, 2, 9), (1, 0, 7), (3, 0, 5)]
    assert dashboard.most_confused(torch.diag(torch.tensor([5, 5])), 4) == []  # nothing confused, no pair


def test_the_table_holds_a_seeded_sample_and_the_most_confident_mistakes(monkeypatch, tmp_path):
    """Image i is filled with the value i, so a stand-in model can give it chosen probabilities: the mistakes'
    confidences are set by hand, and the three most confident must be in the table, most confident first."""
    count, classes = 30, ["a", "b", "c"]
    labels = torch.tensor([i % 3 for i in range(count)])
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 4, 4).contiguous()
    logits = torch.full((count, 3), -9.0)
    logits[torch.arange(count), labels] = 5.0  # right, confidently...
    mistakes = {4: 1.0, 7: 4.0, 11: 2.0, 17: 3.0, 23: 0.5}  # ...except these: image -> logit of a wrong class
    for image, value in mistakes.items():
        logits[image] = -9.0
        logits[image, (labels[image] + 1) % 3] = value
        logits[image, labels[image]] = 0.0
    class ByValue:
        def eval(self):
            return self

        def __call__(self, x):
            return logits[x[:, 0, 0, 0].long()]

    model = ByValue()
    augmentation = SimpleNamespace(views=lambda batch, count: iter([batch.float()]))
    loader = SimpleNamespace(sample_images=lambda pool, seed: (images, labels), augmentation=augmentation)
    monkeypatch.setattr(dashboard, "SAMPLE", 4)
    monkeypatch.setattr(dashboard, "MISTAKES", 3)
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    gallery = dashboard.gallery(model, loader, Accelerator(cpu=True), classes, "none", confusion, tmp_path, seed=0)
    by_confidence = sorted(mistakes, key=lambda image: -torch.softmax(logits[image], 0).max().item())[:3]
    assert by_confidence == [7, 17, 11]
    shown = [(row[1], row[2], row[3]) for row in gallery.rows]
    expected = [(classes[labels[i]], classes[(labels[i] + 1) % 3], round(torch.softmax(logits[i], 0).max().item(), 4))
                for i in by_confidence]
    assert all(row in shown for row in expected)
    extra = shown[4:]  # after the seeded sample: the confident mistakes it did not hold, in order
    assert extra == [row for row in expected if row not in shown[:4]]
    assert 4 <= len(gallery.rows) <= 7 and gallery.pairs_png is None  # an empty confusion: no pairs to draw


def test_the_confused_pairs_picture_shows_each_pair_s_own_mistakes_most_frequent_first(monkeypatch, tmp_path):
    """Image i is filled with the value i, so each drawn cell says which image it shows: the rows are the pairs
    in order of frequency, titled with their counts, each showing the first images of that exact mistake."""
    count, classes = 12, ["a", "b", "c"]
    labels = torch.tensor([0, 1, 0, 2, 2, 0, 1, 2, 0, 0, 1, 1])
    predicted = labels.clone()
    mistakes = {2: 1, 5: 1, 9: 1, 4: 0, 7: 0, 11: 2}  # image -> predicted class: a->b 3 times, c->a twice, b->c once
    for image, guess in mistakes.items():
        predicted[image] = guess
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    for true, guess in zip(labels.tolist(), predicted.tolist()):
        confusion[true, guess] += 1
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 4, 4).contiguous()
    figures = []
    new_figure = dashboard.new_figure
    monkeypatch.setattr(dashboard, "new_figure", lambda **kw: figures.append(new_figure(**kw)) or figures[-1])
    monkeypatch.setattr(dashboard, "PER_PAIR", 2)
    pairs = dashboard.most_confused(confusion, 4)
    path = dashboard.draw_pairs(pairs, images, labels, predicted, classes, tmp_path / "pairs.png")
    assert path.is_file()
    axes = figures[0].axes
    rows = [axes[row * 2 : row * 2 + 2] for row in range(len(axes) // 2)]
    assert [row[0].get_title(loc="left") for row in rows] == ["a -> b (3)", "c -> a (2)", "b -> c (1)"]
    shown = [[int(axis.get_images()[0].get_array()[0, 0, 0]) for axis in row if axis.get_images()] for row in rows]
    assert shown == [[2, 5], [4, 7], [11]]
