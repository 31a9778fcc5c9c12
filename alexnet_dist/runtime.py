"""The Accelerator from the flags, the global-batch breakdown, and decisions every rank shares.

The launcher (`accelerate launch`, torchrun, or none) decides how many processes and machines run;
the flags decide what is learned. `batch_size` is the global batch, so each process takes
batch_size / (num_processes x grad_accum_steps) images per micro-batch.
"""

import os
import signal
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, TorchDynamoPlugin, broadcast_object_list, gather_object

from .config import UsageError


def cpu_has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays (1.65x here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(requested: str, on_cpu: bool) -> str:
    """auto: what an Accelerate config asked for, else bf16 on GPUs and CPUs that have it, fp16 on older GPUs,
    none on other CPUs."""
    if requested == "fp16" and on_cpu:
        raise UsageError("--mixed_precision fp16 needs a GPU; on the CPU use bf16 or no")
    if requested != "auto":
        return requested
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no" and not (on_cpu and launcher == "fp16"):
        return launcher
    if on_cpu:
        return "bf16" if cpu_has_native_bf16() else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_accelerator(cfg, log_with=None, project_dir=None) -> Accelerator:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU is visible to PyTorch here; use --device auto or --device cpu")
    on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if not on_cpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
        torch.backends.cuda.matmul.allow_tf32 = True
    dynamo = None
    if cfg.compile != "false":
        # our CUDA graphs already remove launch overhead; inductor's own would nest inside them
        mode = {"true": "default", "max-autotune": "max-autotune-no-cudagraphs"}[cfg.compile]
        dynamo = TorchDynamoPlugin(backend="inductor", mode=mode)
    return Accelerator(
        cpu=on_cpu,  # also what makes Accelerate see torchrun's processes as MULTI_CPU
        mixed_precision=resolve_precision(cfg.mixed_precision, on_cpu),
        gradient_accumulation_steps=cfg.grad_accum_steps,
        step_scheduler_with_optimizer=False,  # schedulers step once per optimizer step, not once per process
        log_with=log_with,
        project_dir=project_dir,
        dynamo_plugin=dynamo,
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)],  # casts recorded in CUDA graphs must not be cached
    )


def micro_batch_size(batch_size: int, num_processes: int, grad_accum_steps: int) -> int:
    shares = num_processes * grad_accum_steps
    if batch_size % shares:
        raise UsageError(
            f"--batch_size {batch_size} does not split evenly into {num_processes} process(es) x "
            f"{grad_accum_steps} accumulation step(s): use a multiple of {shares}"
        )
    return batch_size // shares


def breakdown(batch_size: int, num_processes: int, grad_accum_steps: int) -> str:
    micro = batch_size // (num_processes * grad_accum_steps)
    return (f"global batch {batch_size} = {num_processes} process(es) x {grad_accum_steps} accumulation step(s) "
            f"x {micro} images per micro-batch")


def agree(accelerator: Accelerator, action, main_first: bool = False):
    """`action()` on every rank (on the main process first if asked, e.g. a download or a cache write).

    A UsageError on any rank is raised on every rank, so all of them stop together instead of
    waiting for each other at the next collective.
    """
    def attempt():
        try:
            return action(), None
        except UsageError as error:
            return None, str(error)

    if accelerator.num_processes == 1:
        result, error = attempt()
        if error:
            raise UsageError(error)
        return result
    result, error = attempt() if (accelerator.is_main_process or not main_first) else (None, None)
    if main_first:
        main_error = broadcast_object_list([error])[0]
        if main_error:
            raise UsageError(main_error)
        if not accelerator.is_main_process:
            result, error = attempt()
    errors = [message for message in gather_object([error]) if message]
    if errors:
        raise UsageError(errors[0])
    return result


def shared_value(accelerator: Accelerator, value):
    """The main process's `value` on every rank (a time stamp, a path)."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value])[0]


class RunStopped(Exception):
    """The run ended early on purpose (a signal, a non-finite loss): message for the user, exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop after the current optimizer step; a second SIGINT stops at once.

    With several processes the ranks agree every `every` steps (one all-reduce), so that all of them
    stop after the same step; a single process checks its own flag after every step.
    """

    every = 10

    def __init__(self, accelerator):
        self.accelerator, self.received = accelerator, None
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, number, frame):
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = number

    def requested(self, global_step: int) -> bool:
        if self.accelerator.num_processes == 1:
            return self.received is not None
        return not global_step % self.every and self.agreed()

    def agreed(self) -> bool:
        """Whether any rank received a signal (a collective: every rank calls it at the same point)."""
        if self.accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(0.0 if self.received is None else float(self.received), device=self.accelerator.device)
        number = int(self.accelerator.gather(flag[None]).max())
        if number and self.received is None:
            self.received = number
        return bool(number)

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def restore(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
