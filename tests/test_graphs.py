"""The CUDA-graph step's safety net, on the CPU: the CUDA calls it makes are replaced by stand-ins, so
what is tested is its own logic (falling back to eager steps, keeping the recorded learning rate)."""

import contextlib

import pytest
import torch
from accelerate import Accelerator

from alexnet_dist.config import Config
from alexnet_dist.engine import build_optimizer, build_scheduler
from alexnet_dist.step import GraphedStep, Step
from alexnet_dist.model import alexnet


class FakeStream:
    def wait_stream(self, other):
        pass


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph; `replay` fails when asked to."""

    fail_replay = False

    def replay(self):
        if FakeGraph.fail_replay:
            raise RuntimeError("CUDA error: operation failed during replay")


def failing_capture(graph, **options):
    raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


@contextlib.contextmanager
def silent_capture(graph, **options):
    """Runs the recorded code, then undoes its update: a real capture records the kernels without running them."""
    assert options == {"capture_error_mode": "thread_local"}
    tensors = [t for t in BUILT["model"].parameters()] + [
        state["momentum_buffer"] for state in BUILT["optimizer"].optimizer.state.values()]
    saved = [t.detach().clone() for t in tensors]
    yield
    with torch.no_grad():
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)


BUILT = {}


@pytest.fixture
def cuda_stand_ins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    FakeGraph.fail_replay = False
    return monkeypatch


def build(step_class, lr_on_device):
    cfg = Config.from_flags({"logger": "none", "batch_size": 8, "num_epochs": 1, "warmup_epochs": 0.5, "lr": 0.002})
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = alexnet(init="kaiming", dropout=0.0)
    optimizer = build_optimizer(model, cfg, accelerator.device, lr_on_device=lr_on_device)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=6)
    model, optimizer = accelerator.prepare(model, optimizer)
    BUILT.update(model=model, optimizer=optimizer)
    return step_class(accelerator, model, optimizer, torch.nn.CrossEntropyLoss()), model, scheduler


def batches(count=6):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 64, 64, generator=generator), torch.randint(10, (8,), generator=generator))
            for _ in range(count)]


def train(step, scheduler):
    losses = []
    for images, labels in batches():
        loss, _ = step(images, labels)
        scheduler.step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("failure", ["capture", "first replay"])
def test_a_failing_graph_leaves_an_eager_run_that_trains_the_same(cuda_stand_ins, capsys, failure):
    if failure == "capture":
        cuda_stand_ins.setattr(torch.cuda, "graph", failing_capture)
    else:
        cuda_stand_ins.setattr(torch.cuda, "graph", silent_capture)
        FakeGraph.fail_replay = True
    graphed, graphed_model, graphed_scheduler = build(GraphedStep, lr_on_device=True)
    graphed_losses = train(graphed, graphed_scheduler)
    eager, eager_model, eager_scheduler = build(Step, lr_on_device=False)
    eager_losses = train(eager, eager_scheduler)
    lines = [line for line in capsys.readouterr().out.splitlines() if "CUDA graphs off" in line]
    assert len(lines) == 1 and "RuntimeError" in lines[0] and "more detail" not in lines[0]
    assert graphed.eager and graphed.graph is None
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, a), (_, b) in zip(graphed_model.state_dict().items(), eager_model.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_a_replaced_learning_rate_goes_back_into_the_recorded_tensor(cuda_stand_ins):
    cuda_stand_ins.setattr(torch.cuda, "graph", silent_capture)
    step, _, _ = build(GraphedStep, lr_on_device=True)
    data = batches(GraphedStep.warmup + 2)
    for images, labels in data[: GraphedStep.warmup + 1]:  # the last one records
        step(images, labels)
    group = step.optimizer.param_groups[0]
    recorded = step.recorded_lr[0]
    assert group["lr"] is recorded
    group["lr"] = 0.0123  # what a scheduler that assigns a float (ReduceLROnPlateau) leaves behind
    step(*data[-1])
    assert group["lr"] is recorded and recorded.item() == pytest.approx(0.0123)
    assert not step.eager and step.replays == 2


def test_auto_graphs_stay_off_with_the_stream_loader():
    from types import SimpleNamespace

    from alexnet_dist.step import use_cuda_graphs

    one_gpu = SimpleNamespace(device=torch.device("cuda"), num_processes=1, mixed_precision="bf16")
    cfg = Config.from_flags({"logger": "none"})
    assert use_cuda_graphs(cfg, one_gpu) and not use_cuda_graphs(cfg, one_gpu, streaming=True)
    assert not use_cuda_graphs(cfg, SimpleNamespace(device=torch.device("cuda"), num_processes=2, mixed_precision="bf16"))
    forced = Config.from_flags({"logger": "none", "cuda_graphs": "true"})
    assert use_cuda_graphs(forced, one_gpu, streaming=True)  # asked for: the user's choice


def test_graph_check_script_runs_its_checks(cuda_stand_ins):
    """The GPU script's own code, run on the CPU with the stand-ins: every check builds, trains and reports
    (its verdicts need a real GPU; here a replay does nothing)."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("graph_check", ROOT / "scripts" / "graph_check.py")
    graph_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_check)
    cuda_stand_ins.setattr(torch.cuda, "graph", silent_capture)
    cuda_stand_ins.setattr(graph_check, "BATCH", 8)
    accelerator = Accelerator(cpu=True)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 64, 64, generator=generator), torch.randint(10, (8,), generator=generator))
               for _ in range(GraphedStep.warmup + 2)]

    def track(setup_init):
        def init(self, *args, **kwargs):
            setup_init(self, *args, **kwargs)
            BUILT.update(model=self.model, optimizer=self.optimizer)
        return init

    cuda_stand_ins.setattr(graph_check.Setup, "__init__", track(graph_check.Setup.__init__))
    for check in (graph_check.check_exact, graph_check.check_dropout, graph_check.check_dropout_mean,
                  graph_check.check_plateau, graph_check.check_ema):
        result = check(accelerator, batches)
        assert isinstance(result["passed"], bool) and "error" not in result, (check.__name__, result)
