"""How two processes share AlexNet best: the paper's column split against data parallelism, measured in one run.

    python scripts/parallel_bench.py                       # CPU: gloo, two processes (and one)
    python scripts/parallel_bench.py --device cuda         # two GPUs: nccl (one GPU: says so, exits with 3)
    python scripts/parallel_bench.py --rounds 3 --windows 2 --steps 4 --json_path parallel.json
    python scripts/parallel_bench.py --layouts hybrid,one                 # some of the layouts (names below)
    python scripts/parallel_bench.py --processes 4 --layouts columns,data,hybrid   # the split layouts on 4

Four layouts of the same training step (the default flags with --groups 2: the paper's two-column network, crop 64,
global batch 256, the precision `auto` picks) take turns, one launch each per round, so that a machine whose speed
drifts slows them alike:
  columns     2 processes, --parallel columns: one column each, activations exchanged
  data        2 processes, --parallel data: DDP, fp32 gradients all-reduced
  data_bf16   2 processes, DDP with --ddp_comm_hook bf16
  one         1 process (every core), the whole network
Each launch trains through the training loop (training.train) on one batch already on the device (no data work),
warms up, then times `windows` windows of `steps` optimizer steps; figures are medians over all windows with their
min-max. Bytes: what one process hands to the collectives per optimizer step, counted as they pass: the exchanges of
activations that the layout counts (its `traffic`: columns' each exchange's own part, forward and backward, and the
logits), plus the gradient buckets DDP all-reduces, in the dtype they travel in (data's, and hybrid's, which
all-reduces what every process holds whole). Then one step at a time, forward and backward (communication included)
are timed apart. `hybrid` (2 processes, --parallel hybrid: convolutions data-parallel, fc1 and fc2 cut over both) runs
when --layouts names it. `--processes` launches the layouts of several processes on that many instead of 2 (on a CPU
with fewer cores than processes their bytes per step still hold, their speed says little).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKIPPED = 3  # the exit status when there are not two GPUs to compare on (the GPU script's skip)
LAYOUTS = {  # name: (processes, flags)
    "columns": (2, ["--parallel", "columns"]),
    "data": (2, ["--parallel", "data"]),
    "data_bf16": (2, ["--parallel", "data", "--ddp_comm_hook", "bf16"]),
    "one": (1, []),
    "hybrid": (2, ["--parallel", "hybrid"]),
}
DEFAULT_LAYOUTS = ("columns", "data", "data_bf16", "one")


def counting(hook, element_size: int, tally: dict):
    """A DDP communication hook (a function: DDP reads its name) that adds each bucket's bytes, in the dtype it is
    sent in, to tally["bytes"], then runs `hook`."""
    def counted(state, bucket):
        tally["bytes"] += bucket.buffer().numel() * element_size
        return hook(state, bucket)

    return counted


def run_layout(layout: str, device: str, windows: int, steps: int, json_path: str):
    """One launch of one layout (run by torchrun, or alone for `one`): its windows' figures into `json_path`."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from alexnet_dist.config import Config
    from alexnet_dist.data import ImageSet
    from alexnet_dist.preflight import batch_share
    from alexnet_dist.runtime import build_accelerator
    from alexnet_dist.training import GivenBatches, Steps, build_trainer, train

    _, flags = LAYOUTS[layout]
    given = dict(zip(flags[::2], flags[1::2]))
    hook = given.pop("--ddp_comm_hook", "none")
    cfg = Config.from_flags({"groups": 2, "device": device, "logger": "none", **{k[2:]: v for k, v in given.items()}})
    accelerator = build_accelerator(cfg)
    micro = batch_share(cfg, accelerator.num_processes)
    generator = torch.Generator().manual_seed(0)
    count = cfg.batch_size  # one global batch: this process's micro-batch of it, again every step
    images = ImageSet(torch.randint(10, (count,), generator=generator),
                      torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator))
    trainer = build_trainer(cfg, accelerator, images, 10, micro)
    batch = next(iter(trainer.loader.train_epoch(0)))
    trainer.loader = GivenBatches([batch] * steps)
    tally = {"bytes": 0}  # DDP's bytes; the activations' are counted by the layout's traffic
    if isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):
        sent = {"none": (default_hooks.allreduce_hook, 4), "bf16": (default_hooks.bf16_compress_hook, 2)}[hook]
        # over DDP's own group: the column's holders under columns on 4 processes (None would mean every process)
        trainer.model.register_comm_hook(trainer.model.process_group, counting(*sent, tally))

    def sync():
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        if accelerator.num_processes > 1:
            accelerator.wait_for_everyone()

    def window() -> dict:
        trainer.layout.traffic.bytes = tally["bytes"] = 0
        sync()
        started = time.perf_counter()
        train(trainer, Steps([0]))
        sync()
        seconds = time.perf_counter() - started
        sent = (tally["bytes"] + trainer.layout.traffic.bytes) / steps
        return {"steps_per_second": steps / seconds, "bytes_per_step": sent}

    window()  # warm-up
    results = [window() for _ in range(windows)]
    forward, backward = [], []
    for _ in range(steps):  # forward and backward apart (the optimizer step left out: the weights stay)
        sync()
        started = time.perf_counter()
        with accelerator.autocast():
            loss = trainer.criterion(trainer.model(batch[0]), batch[1])
        sync()
        middle = time.perf_counter()
        loss.backward()
        sync()
        forward.append(middle - started)
        backward.append(time.perf_counter() - middle)
        trainer.optimizer.zero_grad(set_to_none=True)
    if accelerator.is_main_process:
        Path(json_path).write_text(json.dumps({"windows": results, "forward_s": statistics.median(forward),
                                               "backward_s": statistics.median(backward),
                                               "threads": torch.get_num_threads(),
                                               "device": torch.cuda.get_device_name() if device == "cuda" else "CPU"}))
    accelerator.end_training()


def launch(layout: str, device: str, windows: int, steps: int, json_path: Path, port: int, processes: int) -> dict:
    processes = 1 if LAYOUTS[layout][0] == 1 else processes
    script = [str(Path(__file__).resolve()), "--worker", layout, "--device", device, "--windows", str(windows),
              "--steps", str(steps), "--json_path", str(json_path)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={processes}",
                   "--master_addr", "127.0.0.1", f"--master_port={port}", *script]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{layout} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(json_path.read_text())


def spread(values: list) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(device: str = "cpu", rounds: int = 3, windows: int = 2, steps: int = 4, json_path: str | None = None,
         port: int = 29511, worker: str | None = None, layouts=DEFAULT_LAYOUTS, processes: int = 2):
    if worker is not None:
        return run_layout(worker, device, windows, steps, json_path)
    if not isinstance(processes, int) or processes < 2 or processes % 2:
        raise SystemExit(f"parallel_bench: --processes must be an even number of at least 2, got {processes!r}")
    if device == "cuda" and torch.cuda.device_count() < processes:
        print(f"parallel_bench: {torch.cuda.device_count()} GPU(s) here; the comparison needs {processes}: skipped")
        sys.exit(SKIPPED)
    layouts = [layouts] if isinstance(layouts, str) else list(layouts)  # fire: "a,b" is a tuple, "a" a string
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        raise SystemExit(f"parallel_bench: no layout {unknown[0]} (the layouts: {', '.join(LAYOUTS)})")
    runs = {name: [] for name in layouts}
    scratch = Path(json_path or "parallel_bench.json").with_suffix(".window.json")
    for _ in range(rounds):
        for name in layouts:
            runs[name].append(launch(name, device, windows, steps, scratch, port, processes))
    scratch.unlink(missing_ok=True)
    device_name = next(iter(runs.values()))[0]["device"]
    report = {"device": device_name, "rounds": rounds, "windows_per_round": windows, "steps_per_window": steps,
              "layouts": {}}
    print(f"{device_name}, {rounds} rounds x {windows} windows x {steps} optimizer steps, batch 256, groups 2")
    print(f"{'layout':<10} {'steps/s (median, min-max)':<28} {'MB sent/step/process':>21} {'forward s':>10} "
          f"{'backward s':>11} {'threads':>8}")
    for name, launches in runs.items():
        rates = [w["steps_per_second"] for run in launches for w in run["windows"]]
        sent = [w["bytes_per_step"] for run in launches for w in run["windows"]]
        forward = statistics.median(run["forward_s"] for run in launches)
        backward = statistics.median(run["backward_s"] for run in launches)
        report["layouts"][name] = {"processes": 1 if LAYOUTS[name][0] == 1 else processes, "steps_per_second": rates,
                                   "bytes_per_step": statistics.median(sent), "forward_s": forward,
                                   "backward_s": backward, "threads_per_process": launches[0]["threads"]}
        print(f"{name:<10} {spread(rates):<28} {statistics.median(sent) / 1e6:>21.2f} {forward:>10.3f} "
              f"{backward:>11.3f} {launches[0]['threads']:>8}")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    return None


if __name__ == "__main__":
    fire.Fire(main)
