import pytest
import torch
import torchvision

from alexnet_dist.model import MAX_SINGLE_POSITION, MIN_INPUT, alexnet


def count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("groups", [1, 2])
def test_output_shapes(size, groups):
    model = alexnet(num_classes=7, groups=groups).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_one_column_matches_torchvision_parameter_count():
    # LRN has no parameters, so the seed's network counts what torchvision's AlexNet counts
    assert count(alexnet(num_classes=10)) == count(torchvision.models.alexnet(num_classes=10)) == 57_044_810


def test_two_columns_have_the_papers_sixty_million_parameters():
    def conv(c_in, c_out, k, groups=1):
        return c_in // groups * c_out * k * k + c_out

    def linear(n_in, n_out):
        return n_in * n_out + n_out

    expected = (conv(3, 96, 11) + conv(96, 256, 5, 2) + conv(256, 384, 3) + conv(384, 384, 3, 2)
                + conv(384, 256, 3, 2) + linear(256 * 36, 4096) + linear(4096, 4096) + linear(4096, 1000))
    assert count(alexnet(num_classes=1000, groups=2)) == expected == 60_965_224


def test_two_columns_do_not_mix_inside_grouped_layers():
    model = alexnet(groups=2)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]


def test_paper_init_biases_and_weights():
    torch.manual_seed(0)
    model = alexnet(init="paper")
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    ones = [convs[1], convs[3], convs[4], linears[0], linears[1]]
    zeros = [convs[0], convs[2], linears[2]]
    assert all(torch.all(layer.bias == 1) for layer in ones)
    assert all(torch.all(layer.bias == 0) for layer in zeros)
    assert abs(linears[0].weight.std().item() - 0.01) < 1e-3


def test_kaiming_init_keeps_the_signal_alive():
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    default = alexnet().features(images).std().item()
    kaiming = alexnet(init="kaiming").features(images).std().item()
    assert kaiming > 5 * default


def test_dropout_is_configurable_and_paper_default():
    dropouts = [m.p for m in alexnet().classifier if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.5, 0.5]
    assert [m.p for m in alexnet(dropout=0.0).classifier if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]


def test_smallest_input():
    model = alexnet().eval()
    assert model(torch.randn(1, 3, MIN_INPUT, MIN_INPUT)).shape == (1, 10)
    with pytest.raises(ValueError, match="at least 63x63"):
        model(torch.randn(1, 3, MIN_INPUT - 1, 80))


def test_seeded_outputs_are_reproducible():
    outputs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = alexnet().eval()
        outputs.append(model(torch.ones(1, 3, 64, 64)))
    assert torch.equal(*outputs)


def test_single_position_shortcut_matches_the_pooled_classifier():
    """At 64x64 conv5 leaves 1x1 maps: without dropout the folded first linear layer gives the same outputs
    and gradients; with dropout in training the full layer runs (a mask per repeated copy, as in the seed)."""
    torch.manual_seed(0)
    model = alexnet(dropout=0.0)
    images = torch.randn(4, 3, 64, 64)
    features = torch.flatten(model.avgpool(model.features(images)), 1)
    assert model.features(images).shape[-2:] == (1, 1)
    reference = model.classifier(features)
    reference.square().sum().backward()
    reference_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    shortcut = model(images)
    shortcut.square().sum().backward()
    assert torch.allclose(shortcut, reference, rtol=1e-4, atol=1e-6)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, reference_grads[name], rtol=1e-3, atol=1e-7), name


def test_training_with_dropout_keeps_one_mask_per_repeated_copy():
    torch.manual_seed(0)
    model = alexnet(dropout=0.5).train()
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    full = model(images)
    torch.manual_seed(1)
    features = torch.flatten(model.avgpool(model.features(images)), 1)
    assert torch.allclose(full, model.classifier(features), rtol=1e-4, atol=1e-6)


class FixedMask(torch.nn.Module):
    """A stand-in for the dropout before the first linear layer: a mask chosen by hand, scaled by 1 / (1 - p)."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep, self.widths, self.p = keep, [], 0.5

    def forward(self, x):
        self.widths.append(x.shape[1])
        return x * self.keep[:, : x.shape[1]] * 2  # p = 0.5


def test_first_linear_once_drops_each_feature_with_one_mask_across_its_pooled_copies():
    """With first_linear_once the dropout sees the 256 features once per image, and the result is the seed's
    network (the full first layer on the 36 pooled copies) with each feature's mask repeated over its 36 copies;
    without it the dropout sees the 9216 copies, each with its own mask."""
    torch.manual_seed(0)
    once = alexnet(dropout=0.5, first_linear_once=True).train()
    seed = alexnet(dropout=0.5).train()
    seed.load_state_dict(once.state_dict())
    images = torch.randn(3, 3, 64, 64)
    per_feature = torch.rand(3, 256) < 0.5
    once.classifier[0] = FixedMask(per_feature)
    torch.manual_seed(1)  # the same mask for the second dropout (a real one) in both networks
    output = once(images)
    assert once.classifier[0].widths == [256]
    # by hand: flatten orders the pooled 256 x 6 x 6 map feature by feature, so feature c holds positions 36c..36c+35
    seed.classifier[0] = FixedMask(per_feature.repeat_interleave(36, dim=1))
    torch.manual_seed(1)
    assert torch.allclose(output, seed(images), rtol=1e-4, atol=1e-5)
    assert seed.classifier[0].widths == [9216]
    once.classifier[0] = FixedMask(torch.ones(3, 256, dtype=torch.bool))
    torch.manual_seed(1)
    assert not torch.allclose(output, once(images))  # the mask acted: keeping every feature gives other outputs


def test_the_flag_reaches_the_model():
    from accelerate import Accelerator

    from alexnet_dist.cli import parse_flags
    from alexnet_dist.training import build_model

    for flags, once in (([], False), (["--first_linear_once"], True)):
        model = build_model(parse_flags(["--logger", "none", *flags]), Accelerator(cpu=True), num_classes=10)
        assert model.first_linear_once is once


def test_the_shortcut_serves_every_crop_up_to_94_pixels_and_no_larger(monkeypatch):
    """By hand: a 94-pixel side gives 22 -> 10 (pool) -> 10 -> 4 (pool) -> 4 -> 1 (pool), so conv5 leaves 1x1;
    95 gives 23 -> 11 -> 11 -> 5 -> 5 -> 2. Evaluation folds the first linear layer exactly where the map is 1x1."""
    torch.manual_seed(0)
    model = alexnet().eval()
    calls = []
    shortcut = model._classify_single_position
    monkeypatch.setattr(model, "_classify_single_position", lambda x: calls.append(x.shape) or shortcut(x))
    assert MAX_SINGLE_POSITION == 94  # what --first_linear_once allows
    for side, folded in ((63, True), (94, True), (95, False)):
        images = torch.randn(2, 3, side, side)
        calls.clear()
        with torch.no_grad():
            output = model(images)
            reference = model.classifier(torch.flatten(model.avgpool(model.features(images)), 1))
        assert bool(calls) == folded, side
        assert torch.allclose(output, reference, rtol=1e-4, atol=1e-6), side
