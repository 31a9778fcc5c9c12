"""What makes the training step faster without changing what it computes, behind one class.

The loop (training.py) writes its step as a plain function and calls `Speedups.wrap(step)` once:
with nothing to speed up it gets the same function back. With `--cuda_graphs` the step is recorded
once as a CUDA graph and replayed; with `--compile` the first calls compile. Either way their first
calls are timed apart ("first steps" in the time breakdown).

What a CUDA graph changes for whoever edits the step: the graph replays the kernels recorded at the
first call, so Python in the step runs once (a branch is frozen where it went at recording), and a
host synchronisation in the step (`.item()`, `float(loss)`, printing a tensor) cannot be recorded:
the recording fails, one line says so and the run continues eagerly. Replays return the same output
tensors every time, overwritten by the next replay: use them before the next step, or `.clone()`.
"""

import contextlib
from functools import partial

import torch

from .clock import clock
from .config import UsageError


class Speedups:
    """CUDA graphs and the timing of the first (compiling, recording) steps; `wrap` is all the loop uses."""

    warmup = 3  # eager steps before recording: they create the momentum buffers and let cuDNN choose

    def __init__(self, accelerator, optimizer, graphs: bool = False, compiled: bool = False):
        self.accelerator, self.optimizer, self.graphs = accelerator, optimizer, graphs
        self.first_calls = self.warmup + 2 if graphs else (2 if compiled else 0)  # then the step runs as it will
        self.calls, self.graph, self.eager, self.replays = 0, None, not graphs, 0

    def wrap(self, step):
        """`step(images, labels) -> (loss, logits)`, as it will run: itself when there is nothing to speed up."""
        return step if self.first_calls == 0 else partial(self._call, step)

    def _call(self, step, images, labels):
        timed = clock.part("first_steps") if self.calls < self.first_calls else contextlib.nullcontext()
        self.calls += 1
        with timed:
            if self.eager:
                return step(images, labels)
            if self.graph is None and self.calls <= self.warmup:
                return self._on_side_stream(step, images, labels)
            return self._replay(step, images, labels)

    def _on_side_stream(self, step, images, labels):
        """Eager warm-up steps on a side stream, as recording needs."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = step(images, labels)
        torch.cuda.current_stream().wait_stream(side)
        return result

    def _replay(self, step, images, labels):
        """Graphs only make the run faster, so they must never end it: if recording or the first replay raises,
        one line says why and every later step runs eagerly."""
        try:
            if self.graph is None:
                self._record(step, images, labels)
            self._keep_recorded_lr()
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graph.replay()
            if self.replays == 0:
                torch.cuda.synchronize()  # an error of the first replay shows here, while it can still fall back
            self.replays += 1
        except Exception as error:
            if self.replays:
                raise  # later replays run the graph that already worked: this is not the graph's doing
            self._fall_back(error)
            return step(images, labels)
        return self.static_output

    def _record(self, step, images, labels):
        self.static_images, self.static_labels = images.clone(), labels.clone()
        # the graph reads the learning rate from device tensors, which _keep_recorded_lr fills before each replay
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=self.accelerator.device)
        self.recorded_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes, not adds, the gradients
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a pin-memory thread, say) cannot break the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_output = step(self.static_images, self.static_labels)

    def _keep_recorded_lr(self):
        """If a scheduler (or a loaded checkpoint) put another value or tensor in a parameter group, copy it into
        the recorded tensor and put that back."""
        for group, recorded in zip(self.optimizer.param_groups, self.recorded_lr):
            if group["lr"] is not recorded:
                recorded.fill_(float(group["lr"]))
                group["lr"] = recorded

    def _fall_back(self, error: Exception):
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self.accelerator.print(f"CUDA graphs off for this run ({type(error).__name__}: {reason[:200]}); "
                               "training continues eagerly")
        self.graph, self.eager = None, True
        for group in self.optimizer.param_groups:
            group["lr"] = float(group["lr"])
        self.optimizer.zero_grad(set_to_none=True)  # drop gradients a failed capture may have left


def use_cuda_graphs(cfg, state, precision: str, streaming: bool = False) -> bool:
    """false (the default until a GPU run has measured them: docs/performance.md), true, or auto: on one CUDA process
    without accumulation, fp16's loss scaling or --skip_nonfinite (each adds host synchronisations or Python
    branches a graph would freeze), nor --compile reduce-overhead (graphs of its own), and not with the stream
    loader (its pin-memory thread works on the device while a step would be recorded). `state`: the processes
    (Accelerate's PartialState or Accelerator)."""
    possible = (state.device.type == "cuda" and state.num_processes == 1 and cfg.grad_accum_steps == 1
                and precision != "fp16" and not cfg.skip_nonfinite and cfg.compile != "reduce-overhead")
    if cfg.cuda_graphs == "auto":
        return possible and not streaming
    if cfg.cuda_graphs == "true" and not possible:
        raise UsageError("--cuda_graphs true needs one CUDA process, grad_accum_steps 1, no fp16, no "
                         "--skip_nonfinite and no --compile reduce-overhead (its own graphs); use auto or false")
    return cfg.cuda_graphs == "true"
