"""scripts/scaling_model.py: its communication formulas, the bytes it counts from the network and the layers each
device runs, against values worked out by hand from the architecture (model.py's layer shapes at crop 64, batch 256);
one device's step as the baseline; bad flags refused. Nothing here is timed: a stand-in clock gives the layer times."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import PAPER_WIDTH, ROOT, cli_env

spec = importlib.util.spec_from_file_location("scaling_model", ROOT / "scripts" / "scaling_model.py")
scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling)

LINK = scaling.Link("test", 100.0, 5.0)  # 100 GB/s a direction, 5 us a hop
MS, US = 1e-3, 1e-6

# parameters by hand: conv (in x out x k x k + out), linear (in x out + out); fc1 reads 256 maps x 6 x 6 = 9216
CONVS_ONE_COLUMN = (3 * 64 * 11 * 11 + 64) + (64 * 192 * 5 * 5 + 192) + (192 * 384 * 3 * 3 + 384) + (
    384 * 256 * 3 * 3 + 256) + (256 * 256 * 3 * 3 + 256)
# --groups 2: conv2, conv4 and conv5 grouped (each output reads half the inputs)
CONVS_TWO_COLUMNS = (3 * 96 * 11 * 11 + 96) + (48 * 256 * 5 * 5 + 256) + (256 * 384 * 3 * 3 + 384) + (
    192 * 384 * 3 * 3 + 384) + (192 * 256 * 3 * 3 + 256)
FC1, FC2, FC3 = 9216 * 4096 + 4096, 4096 * 4096 + 4096, 4096 * 10 + 10
# crop 64: conv1 (64 + 2 x 2 - 11) / 4 + 1 = 15, pooled (15 - 3) / 2 + 1 = 7, conv2 keeps 7, pooled 3: conv3 reads
# 256 maps of 3 x 3; conv5's pooled map is 1 x 1, repeated 36 times by the 6 x 6 pooling before fc1
CONV2_MAPS, CONV5_MAPS, FC2_INPUT, LOGITS = 256 * 3 * 3, 256, 4096, 10


class StandIn:
    """A clock that measures nothing: a stage takes 1 ms forward and 2 ms backward per image, an update 10 ms."""

    def stage(self, stage, batch):
        return batch * MS, 2 * batch * MS

    def update(self, stages):
        return 10 * MS


@pytest.fixture(scope="module")
def networks():
    return scaling.Network(1, None), scaling.Network(2, None)


def sizes(plan, kind) -> list:
    return [collective.size for collective in plan.collectives if collective.kind == kind]


def test_the_ring_formulas_give_the_hand_computed_times():
    # 1 GB all-reduced by 2 devices at 100 GB/s: each sends and receives 1 GB: 10 ms, and 2 hops of latency
    assert scaling.all_reduce_seconds(1e9, 2, LINK) == pytest.approx(10 * MS + 2 * 5 * US)
    assert scaling.all_reduce_seconds(1e9, 4, LINK) == pytest.approx(15 * MS + 6 * 5 * US)  # 2 x 3/4 GB, 6 hops
    assert scaling.all_reduce_seconds(1e9, 2, LINK, buckets=3) == pytest.approx(10 * MS + 3 * 2 * 5 * US)
    assert scaling.gather_seconds(1e9, 4, LINK) == pytest.approx(7.5 * MS + 3 * 5 * US)  # 3/4 GB, 3 hops
    assert scaling.all_reduce_seconds(1e9, 1, LINK) == scaling.gather_seconds(1e9, 1, LINK) == 0
    assert scaling.Collective("all_reduce", 1e9, 4).bytes_sent() == pytest.approx(1.5e9)
    assert scaling.Collective("reduce_scatter", 1e9, 4).bytes_sent() == pytest.approx(0.75e9)


def test_data_all_reduces_every_gradient_in_three_buckets(networks):
    one_column, _ = networks
    whole = CONVS_ONE_COLUMN + FC1 + FC2 + FC3
    assert whole == 57_044_810
    plan = scaling.data_plan(one_column, StandIn(), 2)
    # DDP's buckets, filled from the last layer: fc3 and fc2 pass 1 MiB, fc1 alone, the convolutions (9.9 MB)
    assert [(c.kind, c.size, c.devices, c.buckets, c.hidden) for c in plan.collectives] == [
        ("all_reduce", whole * 4, 2, 3, True)]
    assert scaling.data_plan(one_column, StandIn(), 2, gradient_bytes=2).collectives[0].size == whole * 2
    assert (plan.forward, plan.backward) == pytest.approx((9 * 128 * MS, 9 * 2 * 128 * MS))  # 9 stages, 128 images
    step = plan.step(LINK)
    communication = whole * 4 / 100e9 + 3 * 2 * 5 * US
    assert step["step_s"] == pytest.approx(plan.forward + plan.backward + 10 * MS + communication)
    assert step["overlapped_step_s"] == pytest.approx(plan.forward + plan.backward + 10 * MS)  # wholly hidden
    slow = scaling.Link("slow", 0.05, 5.0)  # 4.6 s of all-reduce: longer than the backward pass (2.3 s)
    communication = whole * 4 / 0.05e9 + 3 * 2 * 5 * US
    assert plan.step(slow)["overlapped_step_s"] == pytest.approx(plan.forward + communication + 10 * MS)


def test_columns_exchange_their_activations_within_the_pair(networks):
    _, two_columns = networks
    plan = scaling.columns_plan(two_columns, StandIn(), 2)
    images = 256
    gathered = [images * values * 4 for values in (CONV2_MAPS, CONV5_MAPS, FC2_INPUT)]
    assert gathered[0] == 2_359_296  # conv3 reads both columns' pooled conv2 maps: 256 x 3 x 3 fp32 an image
    assert sizes(plan, "all_gather") == gathered + [2 * 8]  # and the pair's dropout seeds
    assert sizes(plan, "reduce_scatter") == gathered
    assert sizes(plan, "all_reduce") == [images * LOGITS * 4]  # the logits, summed over the pair
    assert all(c.devices == 2 and not c.hidden for c in plan.collectives)
    # each column sends its half of every gathered activation forward, the peer's half of its gradient backward:
    # what the benchmark counted as it passed (docs/results/parallel/layouts_cpu.json)
    assert plan.bytes_sent() == sum(gathered) + images * LOGITS * 4 + 8 == 6_825_992
    eight = scaling.columns_plan(two_columns, StandIn(), 8)  # 4 pairs of 64 images; each column's gradients
    column = (CONVS_TWO_COLUMNS + FC1 + FC2 + FC3 - 10) // 2 + 10  # column 0 also holds fc3's bias
    assert sizes(eight, "all_gather")[0] == 64 * CONV2_MAPS * 4
    assert all(c.devices == 2 for c in eight.collectives if c.kind != "all_reduce")  # within the pair
    assert [(c.size, c.devices, c.hidden) for c in eight.collectives if c.kind == "all_reduce"] == [
        (64 * LOGITS * 4, 2, False), (column * 4, 4, True)]  # the logits in the pair, the gradients over 4 pairs
    assert scaling.columns_plan(two_columns, StandIn(), 3) is None


def test_the_bf16_count_keeps_conv2s_normalised_maps_in_fp32(networks):
    """Under bf16 autocast on the CPU the normalised conv2 maps stay fp32, the rest travels in 2 bytes (columns.Traffic
    counted 9,180,160 bytes a step and process this way at f930d04, when fc1's 9,216 pooled values travelled:
    docs/results/parallel/parallel_cpu.json); DDP's buckets 227,636,776 (--groups 2), as counted then."""
    two_columns = scaling.Network(2, torch.bfloat16)
    assert scaling.columns_plan(two_columns, StandIn(), 2).bytes_sent() == 256 * (
        CONV2_MAPS * 4 + (CONV5_MAPS + FC2_INPUT + LOGITS) * 2) + 8 == 4_592_648
    assert scaling.data_plan(two_columns, StandIn(), 2).bytes_sent() == 227_636_776


def test_hybrid_gathers_conv5s_maps_and_reduce_scatters_fc2(networks):
    """conv5's 256 values an image travel (each device pools them to fc1's input, hybrid.py), and the 8-byte seeds of
    fc1's masks; for 2 processes of the two-column network the bytes are what the benchmark counted as they passed
    (13,973,040 a step and process: docs/results/parallel/layouts_cpu.json)."""
    one_column, two_columns = networks
    plan = scaling.hybrid_plan(one_column, StandIn(), 4)
    assert sizes(plan, "all_gather") == [256 * 256 * 4, 256 * 4096 * 4, 8 * 4]
    assert sizes(plan, "reduce_scatter") == [256 * 256 * 4, 256 * 4096 * 4]
    assert sizes(plan, "all_reduce") == [(CONVS_ONE_COLUMN + FC3 + 4096) * 4]  # convolutions, fc3, fc2's bias
    assert all(c.devices == 4 for c in plan.collectives)
    # the convolutions, fc3 and the loss on 64 images; the fc1 and fc2 slices on all 256
    assert plan.forward == pytest.approx((7 * 64 + 2 * 256) * MS)
    assert scaling.hybrid_plan(two_columns, StandIn(), 2).bytes_sent() == 13_973_040


def test_each_device_runs_its_own_share_of_the_layers(networks):
    one_column, two_columns = networks
    column = scaling.column_stages(two_columns.model)
    assert sum(p.numel() for p in scaling.parameters(column)) == (CONVS_TWO_COLUMNS + FC1 + FC2 + FC3 - 10) // 2 + 10
    shapes = {stage.name: stage.shape for stage in column}
    assert shapes["conv2"] == (48, 7, 7) and shapes["conv3"] == (256, 3, 3) and shapes["fc3"] == (2048,)
    own, sliced = scaling.hybrid_stages(one_column.stages, 4)
    assert [stage.name for stage in sliced] == ["fc1", "fc2"]
    assert [sum(p.numel() for p in stage.layers.parameters()) for stage in sliced] == [
        9216 * 1024 + 1024, 1024 * 4096 + 4096]
    assert sum(p.numel() for p in scaling.parameters(own)) == CONVS_ONE_COLUMN + FC3


def test_one_device_is_the_baseline(networks):
    one_column, two_columns = networks
    layouts = scaling.plans(one_column, two_columns, StandIn(), [1, 2, 8])
    assert set(layouts) == {"data", "data_bf16", "columns", "hybrid"}
    table = scaling.predict(layouts, scaling.LINKS)
    for layout, by_count in table.items():
        one = by_count[1]
        assert one["collectives"] == 0 and one["bytes_sent_per_device"] == 0
        for figures in one["links"].values():
            assert figures["speedup"] == figures["overlapped_speedup"] == 1 and figures["communication_s"] == 0
        assert all(0 < by_count[8]["links"][link]["speedup"] < 8 for link in by_count[8]["links"])


def test_the_gpu_estimate_counts_each_layers_flops(networks):
    """At 1 TFLOP/s and no floor a pass takes its multiply-adds x 2 picoseconds: conv1 at batch 256 has 15 x 15
    outputs of 64 kernels over 3 x 11 x 11 inputs (backward: the weights' gradient alone, no image gradient);
    fc1 (the 36 pooled copies: 9216 inputs) has 9216 x 4096 (backward: the input's and the weights' gradients)."""
    one_column, _ = networks
    estimate = scaling.Estimate(1.0, 0.0, 1.0)
    by_name = {stage.name: stage for stage in one_column.stages}
    conv1 = 2 * 256 * 15 * 15 * 64 * 3 * 11 * 11 / 1e12
    assert estimate.stage(by_name["conv1"], 256) == pytest.approx((conv1, conv1))
    fc1 = 2 * 256 * 9216 * 4096 / 1e12
    assert estimate.stage(by_name["fc1"], 256) == pytest.approx((fc1, 2 * fc1))
    assert scaling.Estimate(1.0, 20.0, 1.0).stage(by_name["loss"], 256) == (20 * US, 20 * US)  # the floor
    assert scaling.Estimate(1.0, 20.0, 2.0).update(one_column.stages) == pytest.approx(
        20 * US + 20 * 57_044_810 / 2e12)  # weight, gradient and momentum read, weight and momentum written


def test_the_clock_times_every_pass_the_plans_ask_for(networks):
    """The first pass of the plans asks (and gets zeros), the clock times every pass in rounds, the second pass gets
    the medians: here fc3 and the loss on 4 images, and the update of fc3's parameters, once after a warm-up."""
    one_column, _ = networks
    tail = [stage for stage in one_column.stages if stage.name in ("fc3", "loss")]
    clock = scaling.Clock("cpu", None, repeats=1)
    asked = []

    def make(clock):
        asked.append([clock.stage(stage, 4) for stage in tail] + [clock.update(tail)])
        return asked[-1]

    times = scaling.measured(clock, make)
    assert asked[0] == [(0.0, 0.0), (0.0, 0.0), 0.0] and len(asked) == 2
    assert all(forward > 0 and backward > 0 for forward, backward in times[:2]) and times[2] > 0
    assert len(clock.times) == 3


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--counts", "1,3"], "--counts must include 1 and divide the batch of 256 and the 4096 hidden neurons"),
    (["--counts", "2,4"], "--counts must include 1"),
    (["--counts", "1,two"], "--counts must be integers separated by commas, got '1,two'"),
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (["--statistic", "mean"], "argument --statistic: invalid choice: 'mean'"),
    (["--cpu_link", "fast"], "--cpu_link must be GBPS,US with GBPS > 0 and US >= 0, got 'fast'"),
    (["--cpu_link", "0,10"], "--cpu_link must be GBPS,US"),
    (["--assume_gpu", "150,20"], "--assume_gpu must be TFLOPS,US,TBPS with TFLOPS > 0, US >= 0, TBPS > 0"),
    (["--check", "missing.json"], "--check missing.json is not a JSON file written by scripts/parallel_bench.py"),
    (["--check", "notes.txt"], "--check notes.txt is not a JSON file written by scripts/parallel_bench.py"),
    (["--json_path", "notes.txt/scaling.json"], "--json_path notes.txt/scaling.json cannot be written ("),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_bad_flags_are_refused(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(scaling.UsageError) as refused:
        scaling.parse_flags(argv)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--device", "cuda"], "--device cuda: no GPU is visible to PyTorch here; use --device cpu"),  # none is, here
])
def test_a_bad_flag_ends_the_script_in_one_line_with_status_2(argv, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "scaling_model.py"), *argv, "--json_path",
                             "scaling.json", "--plot_path", "scaling.png"], cwd=tmp_path, env=cli_env(**PAPER_WIDTH),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_the_commands_the_documents_show_parse(monkeypatch):
    """Read as tests/test_docs.py reads the documents' commands (continuation lines joined, comments dropped)."""
    from test_docs import DOCUMENTS, in_order, segments

    monkeypatch.chdir(ROOT)
    shown = [(f"{document.relative_to(ROOT)}:{number}", words[words.index("scripts/scaling_model.py") + 1:])
             for document in DOCUMENTS for number, code in in_order(document) for words in segments(code)
             if "scripts/scaling_model.py" in words]
    assert len(shown) >= 3, shown
    for where, argv in shown:
        try:
            scaling.parse_flags(argv)
        except scaling.UsageError as error:
            pytest.fail(f"{where}: scripts/scaling_model.py {' '.join(argv)}\n  error: {error}")
