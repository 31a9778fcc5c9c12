"""GPU check: the CUDA-graph training step computes what the eager step computes.

    python scripts/graph_check.py [--steps 12] [--json_path OUT.json]

Each check trains the same initial AlexNet on the same random batches through the training loop
(alexnet_dist.training.train), eagerly and with CUDA graphs (alexnet_dist.speedups), and compares
against a stated tolerance. Exit status 0 when every check passes, 1 when one fails, 3 when there is
no GPU (nothing to check). The checks:
  exact        dropout 0 (the folded classifier), a changing lr: losses and final weights agree
  dropout      dropout 0.5 at lr 0: two replays of one batch give different losses (and, as the
               control, equal losses at dropout 0), so the masks are redrawn on every replay
  dropout_mean dropout 0.5 over `steps` steps: the graphed mean loss is close to the eager one
  plateau      the lr that ReduceLROnPlateau sets reaches the graph: one replay's update shrinks ~10x
  ema          the weight average under graphs follows the eager one
  compile      torch.compile'd model recorded as a graph: losses agree with the compiled eager step
"""

import dataclasses
import json
import sys

import fire
import torch

from alexnet_dist.config import Config
from alexnet_dist.data import ImageSet
from alexnet_dist.runtime import build_accelerator
from alexnet_dist.speedups import Speedups
from alexnet_dist.training import GivenBatches, Steps, build_trainer, train

BATCH = 128
# bf16 autocast: the same kernels run in both paths, but cuDNN may pick other algorithms per run
LOSS_TOLERANCE = 0.02  # relative, per step
WEIGHT_TOLERANCE = 0.05  # largest weight difference / largest weight change in training
MEAN_LOSS_TOLERANCE = 0.05  # relative, mean loss over the steps with dropout
PLATEAU_RATIO = (5.0, 20.0)  # update size before / after lr /= 10


def weights(model) -> dict:
    return {name: value.detach().float().clone() for name, value in model.state_dict().items()}


class Setup:
    """The trainer of one trial, built as training builds it (alexnet_dist.training.build_trainer)."""

    def __init__(self, accelerator, graphs: bool, compile: bool = False, **flags):
        base = {"logger": "none", "batch_size": BATCH, "warmup_epochs": 0.5, "num_epochs": 1, "init": "kaiming"}
        self.cfg = Config.from_flags({**base, **flags})
        images = torch.zeros(12 * BATCH, 3, 32, 32, dtype=torch.uint8)  # only sets the schedule's epoch length
        trainer = build_trainer(
            self.cfg, accelerator, ImageSet(torch.zeros(12 * BATCH, dtype=torch.int64), images), 10, BATCH, graphs
        )
        if compile:  # what Accelerate's dynamo plugin does in prepare()
            trainer = dataclasses.replace(trainer, model=torch.compile(trainer.model))
        self.trainer, self.model, self.optimizer, self.scheduler = (
            trainer,
            trainer.model,
            trainer.optimizer,
            trainer.scheduler,
        )
        self.initial = weights(self.model)  # the same names as the trained weights, compiled or not

    def train(self, batches) -> list:
        """One loss per batch (one process: each batch is an optimizer step), through the training loop."""
        self.trainer.loader = GivenBatches(batches)
        losses = []
        train(self.trainer, Steps([0], each_step=lambda: losses.append(self.trainer.meter.log_point()[0])))
        if self.trainer.graphs and self.trainer.speedups.eager:
            raise RuntimeError("the CUDA graph fell back to eager steps: nothing was replayed")
        return losses

    def set_lr(self, value: float):
        self.scheduler.base_lrs = [value] * len(self.optimizer.param_groups)  # LambdaLR recomputes from these
        for group in self.optimizer.param_groups:
            group["lr"].fill_(value) if isinstance(group["lr"], torch.Tensor) else group.update(lr=value)


def relative(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_exact(accelerator, batches, compile=False) -> dict:
    eager, graphed = Setup(accelerator, False, compile, dropout=0.0), Setup(accelerator, True, compile, dropout=0.0)
    eager_losses, graph_losses = eager.train(batches), graphed.train(batches)
    final_eager, final_graph = weights(eager.model), weights(graphed.model)
    change = max((final_eager[k] - eager.initial[k]).abs().max().item() for k in final_eager)
    difference = max((final_eager[k] - final_graph[k]).abs().max().item() for k in final_eager)
    loss_difference = max(relative(g, e) for g, e in zip(graph_losses, eager_losses))
    return {
        "passed": loss_difference <= LOSS_TOLERANCE and difference <= WEIGHT_TOLERANCE * change,
        "max_relative_loss_difference": loss_difference,
        "loss_tolerance": LOSS_TOLERANCE,
        "max_weight_difference": difference,
        "max_weight_change_in_training": change,
        "weight_tolerance": f"{WEIGHT_TOLERANCE} x change",
        "eager_losses": eager_losses,
        "graph_losses": graph_losses,
    }


def replays_of_one_batch(accelerator, batches, dropout: float) -> list:
    """Losses of replaying one batch at lr 0 (after warm-up and recording on the others)."""
    setup = Setup(accelerator, True, dropout=dropout, schedule="constant")
    setup.set_lr(0.0)
    setup.train(batches[: Speedups.warmup + 1])
    return setup.train([batches[-1]] * 2)


def check_dropout(accelerator, batches) -> dict:
    with_dropout, control = (
        replays_of_one_batch(accelerator, batches, 0.5),
        replays_of_one_batch(accelerator, batches, 0.0),
    )
    return {
        "passed": with_dropout[0] != with_dropout[1] and relative(control[0], control[1]) <= 1e-6,
        "dropout_0.5_replay_losses": with_dropout,
        "dropout_0_replay_losses": control,
    }


def check_dropout_mean(accelerator, batches) -> dict:
    eager, graphed = (
        Setup(accelerator, False, dropout=0.5).train(batches),
        Setup(accelerator, True, dropout=0.5).train(batches),
    )
    mean_eager, mean_graph = sum(eager) / len(eager), sum(graphed) / len(graphed)
    difference = relative(mean_graph, mean_eager)
    return {
        "passed": difference <= MEAN_LOSS_TOLERANCE,
        "eager_mean_loss": mean_eager,
        "graph_mean_loss": mean_graph,
        "relative_difference": difference,
        "tolerance": MEAN_LOSS_TOLERANCE,
    }


def check_plateau(accelerator, batches) -> dict:
    setup = Setup(
        accelerator,
        True,
        dropout=0.0,
        schedule="plateau",
        plateau_patience=0,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        lr=0.01,
    )
    setup.train(batches[: Speedups.warmup + 1])

    def update_size():
        before = weights(setup.model)
        setup.train([batches[-1]])
        after = weights(setup.model)
        return sum((after[k] - before[k]).norm().item() ** 2 for k in after) ** 0.5

    size_before = update_size()
    setup.scheduler.step(1.0)  # the first epoch's accuracy ...
    setup.scheduler.step(0.5)  # ... not beaten within the patience: lr /= 10
    lr_after = float(setup.optimizer.param_groups[0]["lr"])
    size_after = update_size()
    ratio = size_before / max(size_after, 1e-30)
    low, high = PLATEAU_RATIO
    recorded = setup.trainer.speedups.recorded_lr[0] is setup.optimizer.param_groups[0]["lr"]
    return {
        "passed": low <= ratio <= high and recorded and abs(lr_after - 0.001) < 1e-9,
        "lr_after_plateau": lr_after,
        "update_before": size_before,
        "update_after": size_after,
        "ratio": ratio,
        "allowed_ratio": PLATEAU_RATIO,
        "recorded_lr_tensor_in_place": recorded,
    }


def check_ema(accelerator, batches) -> dict:
    eager, graphed = Setup(accelerator, False, dropout=0.0, ema=0.99), Setup(accelerator, True, dropout=0.0, ema=0.99)
    eager.train(batches)
    graphed.train(batches)
    eager_average, graph_average = (list(setup.trainer.average.module.parameters()) for setup in (eager, graphed))
    moved = max((a - b.float()).abs().max().item() for a, b in zip(eager_average, eager.initial.values()))
    difference = max((a - b).abs().max().item() for a, b in zip(eager_average, graph_average))
    return {
        "passed": moved > 0 and difference <= WEIGHT_TOLERANCE * moved,
        "max_average_difference": difference,
        "max_average_change": moved,
        "tolerance": f"{WEIGHT_TOLERANCE} x change",
    }


def main(steps: int = 12, json_path: str | None = None):
    if not torch.cuda.is_available():
        print("graph check: no GPU here, nothing to check")
        sys.exit(3)
    accelerator = build_accelerator(Config.from_flags({"logger": "none"}))
    generator = torch.Generator(device=accelerator.device).manual_seed(0)
    batches = [
        (
            torch.randn(BATCH, 3, 64, 64, device=accelerator.device, generator=generator).contiguous(
                memory_format=torch.channels_last
            ),
            torch.randint(10, (BATCH,), device=accelerator.device, generator=generator),
        )
        for _ in range(steps)
    ]
    checks = {
        "exact": lambda: check_exact(accelerator, batches),
        "dropout": lambda: check_dropout(accelerator, batches),
        "dropout_mean": lambda: check_dropout_mean(accelerator, batches),
        "plateau": lambda: check_plateau(accelerator, batches),
        "ema": lambda: check_ema(accelerator, batches),
        "compile": lambda: check_exact(accelerator, batches, compile=True),
    }
    results = {"device": torch.cuda.get_device_name(), "precision": accelerator.mixed_precision, "steps": steps}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as error:  # one broken check must not hide the others' results
            results[name] = {"passed": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        shown = {k: v for k, v in results[name].items() if not k.endswith("losses") or k.startswith("dropout")}
        print(f"{name}: {'PASS' if results[name]['passed'] else 'FAIL'} {json.dumps(shown)}", flush=True)
    failed = [name for name in checks if not results[name]["passed"]]
    results["failed"] = failed
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=2)
    print(
        f"graph check: {len(checks) - len(failed)}/{len(checks)} passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    fire.Fire(main)
