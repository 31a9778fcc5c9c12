"""The Accelerator from the flags, the global-batch breakdown, and what every rank must agree on.

The launcher (`accelerate launch`, torchrun, or none) decides how many processes and machines run;
the flags decide what is learned. `batch_size` is the global batch, so each process takes
batch_size / (num_processes x grad_accum_steps) images per micro-batch.
"""

import os
import signal
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    AutocastKwargs,
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    TorchDynamoPlugin,
    broadcast_object_list,
    gather_object,
)

from .config import UsageError

# the processes on this node, as torchrun (and accelerate launch through it) or MPI say
LOCAL_SIZE_VARIABLES = (
    "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"
)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays (1.26x measured)."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a job scheduler or `taskset` may narrow), not
    every core of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(requested: int | None) -> int:
    """--cpu_threads: the number asked for, else torch's own count (OMP_NUM_THREADS, else every usable core), but
    under `accelerate launch`, which sets OMP_NUM_THREADS to 1 for a CPU-only job (a 2-core machine then trains on
    one core), the usable cores shared among the processes on this node."""
    if requested is not None:
        return requested
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # set by accelerate launch (and read by resolve_precision)
        return torch.get_num_threads()
    local_processes = next((int(os.environ[name]) for name in LOCAL_SIZE_VARIABLES if name in os.environ), 1)
    return max(1, usable_cores() // local_processes)


def start_processes(cfg) -> PartialState:
    """This launch's processes and their device (the process group, with several), before any decision is made."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU is visible to PyTorch here; use --device auto or --device cpu")
    # cpu=True is also what makes Accelerate see torchrun's processes as MULTI_CPU
    return PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())


def build_accelerator(cfg, log_with=None, project_dir=None) -> Accelerator:
    """The Accelerator, once, with the run folder (`project_dir`: where TensorBoard writes) when there is one."""
    on_cpu = start_processes(cfg).device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(cpu_threads(cfg.cpu_threads))
    else:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
        torch.backends.cuda.matmul.allow_tf32 = True
    dynamo = None
    if cfg.compile != "false":
        # max-autotune without inductor's CUDA graphs: ours (--cuda_graphs) would nest them; reduce-overhead is
        # inductor's graphs instead of ours, the benchmark's other arm
        mode = {"true": "default", "max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "reduce-overhead"}[
            cfg.compile
        ]
        dynamo = TorchDynamoPlugin(backend="inductor", mode=mode)
    handlers = [AutocastKwargs(cache_enabled=False)]  # casts recorded in CUDA graphs must not be cached
    if cfg.ddp_comm_hook != "none":
        # Accelerate registers the hook on the DDP wrapper; one process has no wrapper and nothing to send
        handlers.append(DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType(cfg.ddp_comm_hook)))
    return Accelerator(
        cpu=on_cpu,
        mixed_precision=resolve_precision(cfg.mixed_precision, on_cpu),
        gradient_accumulation_steps=cfg.grad_accum_steps,
        step_scheduler_with_optimizer=False,  # schedulers step once per optimizer step, not once per process
        log_with=log_with,
        project_dir=project_dir,
        dynamo_plugin=dynamo,
        kwargs_handlers=handlers,
    )


def micro_batch_size(batch_size: int, replicas: int, grad_accum_steps: int, unit: str = "process(es)") -> int:
    """Images per micro-batch of each replica (the layout's: a process, or a pair of column processes, the `unit`)."""
    shares = replicas * grad_accum_steps
    if batch_size % shares:
        raise UsageError(
            f"--batch_size {batch_size} does not split evenly into {replicas} {unit} x "
            f"{grad_accum_steps} accumulation step(s): use a multiple of {shares}"
        )
    return batch_size // shares


def breakdown(batch_size: int, layout, grad_accum_steps: int) -> str:
    """How the global batch is shared out under `layout` (layouts.py)."""
    micro = micro_batch_size(batch_size, layout.replicas, grad_accum_steps, layout.unit)
    return (
        f"global batch {batch_size} = {layout.replicas} {layout.unit} x {grad_accum_steps} accumulation step(s) "
        f"x {micro} images per micro-batch{layout.note(micro)}"
    )


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''})"


def _attempt(action, ranks: int):
    """(result, None) or (None, the one-line message); with several ranks any error becomes a message, so that
    the others are told instead of waiting for this one (alone, an unexpected error keeps its traceback)."""
    try:
        return action(), None
    except UsageError as error:
        return None, str(error)
    except Exception as error:
        if ranks == 1:
            raise
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def agreed(state, on_main, on_every_rank, undo=None):
    """The one cross-rank agreement before a run. `on_main()` runs on the main process first (downloads, caches,
    choices of paths) and returns (what every rank gets: small and picklable, what only the main process keeps);
    the first goes to every rank, then `on_every_rank(shared, kept)` runs everywhere (`kept` None but on the main
    process). A UsageError on any rank is raised on every rank, so that all of them stop together; `undo(shared)`
    then takes back on the main process what `on_main` created.

    Not `main_process_first()`: there the other ranks wait in a barrier while the main process works, and if it
    raises they stay in that barrier until the collective times out; here they wait in a broadcast
    that always comes, carrying either the decision or the error."""
    shared, kept, error = None, None, None
    if state.is_main_process:
        result, error = _attempt(on_main, state.num_processes)
        shared, kept = result if result is not None else (None, None)
    if state.num_processes > 1:
        shared, error = broadcast_object_list([(shared, error)])[0]
    if error:
        raise agreed_error(error)
    result, error = _attempt(lambda: on_every_rank(shared, kept), state.num_processes)
    try:
        stop_together(state, error)
    except UsageError:
        if undo is not None and state.is_main_process:
            undo(shared)  # what on_main created, now that another rank refuses the run
        raise
    return result


def stop_together(accelerator: Accelerator, error: str | None, code: int = 2):
    """In-run agreement (a collective): if any rank has an error message, every rank raises the first one, as a
    UsageError (exit status 2: bad input) or, for a failure of the run itself, RunStopped with `code`."""
    if accelerator.num_processes > 1:
        errors = [message for message in gather_object([error]) if message]
        error = errors[0] if errors else None
    if error:
        raise agreed_error(error, code)


def agreed_error(message: str, code: int = 2) -> Exception:
    """The error every rank raises at the same point: a UsageError (status 2, bad input) or RunStopped with
    `code`; marked, so that cli.leave may wait for every rank before it takes the process group down."""
    error = UsageError(message) if code == 2 else RunStopped(message, code)
    error.agreed = True
    return error


class RunStopped(Exception):
    """The run ended early on purpose (a signal, a non-finite loss, a failed save): message for the user, exit
    status. Every rank raises it after the same step (the run's stops are agreed)."""

    agreed = True

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# Not accelerator.set_trigger()/check_trigger(): that is a 0/1 flag one rank sets and an all-reduce sums. It knows
# nothing of signals: the handlers, the second Ctrl-C and which signal came (the exit status) would still be ours,
# and the checkpoint-due flag that rides on our one all-reduce would need another of its own.
class StopSignals:
    """SIGTERM and SIGINT ask the run to stop after the current optimizer step; a second SIGINT stops at once.

    With several processes the ranks agree every `every` steps (one all-reduce, which also carries
    whether a checkpoint is due), so that all of them stop or save after the same step; a single
    process checks its own flag after every step.
    """

    every = 10

    def __init__(self, accelerator):
        self.accelerator, self.received, self.then = accelerator, None, None
        self.previous_sigterm = signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, number, frame):
        if self.received == signal.SIGINT and number == signal.SIGINT:  # a second Ctrl-C, not the launcher's
            raise KeyboardInterrupt
        if self.received is None:
            self.received = number  # the one that stops the run and sets the exit status
        elif number != self.received:
            # Ctrl-C under `accelerate launch` (one process): the terminal's SIGINT, then the launcher's SIGTERM
            self.then = number

    def poll(self, global_step: int, save_due: bool = False) -> tuple:
        """(stop now?, save a checkpoint now?), the same on every rank.

        One process answers after every step; several agree every `every` steps (one all-reduce
        carries both) and answer (False, False) in between.
        """
        if self.accelerator.num_processes == 1:
            return self.received is not None, save_due
        if global_step % self.every:
            return False, False
        return self.agree(save_due)

    def agree(self, save_due: bool = False) -> tuple:
        """Whether any rank received a signal, and whether any rank's checkpoint is due (a collective)."""
        if self.accelerator.num_processes == 1:
            return self.received is not None, save_due
        # how many ranks received SIGINT, SIGTERM, and have a checkpoint due: one all-reduce of counts
        counts = torch.tensor(
            [float(self.received == signal.SIGINT), float(self.received == signal.SIGTERM), float(save_due)],
            device=self.accelerator.device,
        )
        interrupted, terminated, due = self.accelerator.reduce(counts, reduction="sum").tolist()
        if self.received is None and (interrupted or terminated):
            self.received = signal.SIGINT if interrupted else signal.SIGTERM
        return bool(interrupted or terminated), bool(due)

    def name(self) -> str:
        """The signals this process received, in order: 'SIGTERM', or 'SIGINT (then SIGTERM)'."""
        if self.received is None:
            return ""
        first = signal.Signals(self.received).name
        return f"{first} (then {signal.Signals(self.then).name})" if self.then else first

    def restore(self):
        """SIGTERM back to what it was; SIGINT to Python's KeyboardInterrupt, so that Ctrl-C stops at once from
        here even in a process started with SIGINT ignored (a script's background job, a test worker's child)."""
        signal.signal(signal.SIGTERM, self.previous_sigterm)
        signal.signal(signal.SIGINT, signal.default_int_handler)
