"""The GPU measurements, as time-boxed commands that always bring their figures back.

    python scripts/gpu_session.py smoke OUT   # the default command as a user runs it, graph check, benchmarks
    python scripts/gpu_session.py sweep OUT   # recipe search on the validation split, then 3 seeds of the
                                              # best, the paper's and the seed's recipes
    python scripts/gpu_session.py smoke OUT --rehearse   # the same on the CPU: fake data, tiny runs

Contract with the device tool (whatever fails, hangs or runs out of time): OUT receives at most
three files, `summary.json` (every stage: its command, status, seconds and figures; rewritten after
each stage), `results.tar.gz` (each run's config, metrics, log and the stages' JSON, written once at
the end in the main thread at gzip level 1, capped below 16 MiB) and the caller's `session.log`.
Run folders, checkpoints (at most one kept besides the best, deleted when the run ends) and weights
live under --work (default /tmp/gpu_session), never under OUT. Every subprocess runs in its own
process group with a timeout, and the script ends inside --budget seconds (one device command may
run 10 minutes).

On a lent machine: copy ../shared/wheels/*.whl and ../shared/data/cifar10-jpeg-train.tar.gz into
.carry/ (ignored through .git/info/exclude), then run with carry [".carry"]:

    bash scripts/gpu_session.sh smoke     # at most 4.5 minutes (--budget 270); then, as a second command:
    bash scripts/gpu_session.sh sweep     # at most 6.5 minutes (--budget 390)

15 device minutes hold both: 270 + 390 s of script, the machine's start (1-2 minutes, once), and each
command's wheel install and unpacking (under 40 s each) come to about 14.5 minutes at most.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
ARCHIVE_LIMIT = 15 * MiB
LOG_TAIL = 200_000  # characters of each log kept in the archive


class Session:
    """Stages with time limits; the summary and the archive are rewritten after each one."""

    def __init__(self, out, work="/tmp/gpu_session", budget=270.0, rehearse=False, data_dir="data/cifar10-jpeg",
                 run_timeout=None, parallel=4):
        self.started = time.perf_counter()
        self.out, self.work, self.budget, self.rehearse = Path(out), Path(work), float(budget), rehearse
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        if rehearse:  # the CPU rehearsal: generated data, one tiny epoch per run
            self.common = ["--dataset", "fake", "--num_epochs", "1", "--batch_size", "32", "--fraction_of_data", "0.2",
                           "--device", "cpu"]
        else:
            self.common = ["--dataset", "folder", "--data_dir", data_dir, "--num_epochs", "25"]
        self.run_timeout = run_timeout or (120.0 if rehearse else 300.0)
        self.parallel = 2 if rehearse else parallel
        self.summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "rehearsal": rehearse, "budget_seconds": budget,
                        "environment": environment(), "stages": []}
        self.write_summary()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.budget - self.elapsed()

    def log(self, message: str):
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def write_summary(self):
        """Atomically, from the main thread only: a kill at any moment leaves the last complete summary."""
        self.summary["elapsed_seconds"] = round(self.elapsed(), 1)
        temporary = self.out / ".summary.json.tmp"
        temporary.write_text(json.dumps(self.summary, indent=1, default=str) + "\n")
        os.replace(temporary, self.out / "summary.json")

    def command(self, name: str, argv: list, timeout: float, env: dict | None = None) -> dict:
        """Run `argv` in its own process group, output to WORK/logs/NAME.log, killed with its children at
        the timeout (or at what is left of the budget, whichever comes first)."""
        limit = max(1.0, min(timeout, self.remaining() - 15.0))
        log_path = self.work / "logs" / f"{name}.log"
        log_path.parent.mkdir(exist_ok=True)
        started = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, **(env or {})})
            try:
                code, status = process.wait(timeout=limit), None
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                try:  # even the wait after a kill is bounded (a process stuck in the driver may not die at once)
                    code, status = process.wait(timeout=10), "timeout"
                except subprocess.TimeoutExpired:
                    code, status = None, "timeout, not yet dead after SIGKILL"
        seconds = time.perf_counter() - started
        status = status or ("ok" if code == 0 else "failed")
        return {"name": name, "command": " ".join(map(str, argv)), "status": status, "returncode": code,
                "seconds": round(seconds, 2), "timeout_seconds": round(limit, 1), "log": log_path}

    def record(self, stage: dict):
        """Main thread only: add a finished stage to the summary."""
        log_path = stage.pop("log", None)
        if stage["status"] != "ok" and log_path and Path(log_path).exists():
            stage["log_tail"] = Path(log_path).read_text(errors="replace")[-1500:]
        self.summary["stages"].append(stage)
        self.write_summary()
        self.write_archive()  # after every stage: a kill later still leaves this stage's files
        figures = {k: v for k, v in stage.items() if k not in ("name", "command", "log_tail", "status", "flags")}
        self.log(f"{stage['name']}: {stage['status']} {json.dumps(figures, default=str)[:400]}")

    def train(self, name: str, flags: dict, launcher: list | None = None, logger="none", timeout=None) -> dict:
        """One run of the real entry point (or of `launcher`, e.g. accelerate launch); its final figures."""
        run_dir = self.work / "runs" / name
        argv = (launcher or [sys.executable, str(ROOT / "launch" / "train.py")]) + self.common
        argv += [item for key, value in flags.items() for item in (f"--{key}", str(value))]
        argv += [
            "--logger",
            logger,
            "--run_dir",
            str(run_dir),
            "--save",
            str(self.work / "weights" / name / "model.pth"),
            "--keep_checkpoints",
            "1",
        ]
        wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(self.work / "wandb"), "WANDB_SILENT": "true"}
        stage = self.command(name, argv, timeout or self.run_timeout, env=wandb_env)
        stage["flags"] = flags
        stage.update(run_figures(run_dir, stage["log"]))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 436 MB each: gone as soon as the run ends
        shutil.rmtree(self.work / "weights" / name, ignore_errors=True)  # this run's only: others may be saving
        return stage

    def wave(self, runs: list) -> list:
        """Several runs at once on the device; results recorded by the main thread as they finish."""
        results = []
        with ThreadPoolExecutor(self.parallel) as pool:
            futures = [pool.submit(self.train, *run) for run in runs]
            for future in as_completed(futures):
                results.append(future.result())
                self.record(results[-1])
        return results

    def json_stage(self, name: str, argv: list, timeout: float, json_name: str, skip_codes=()) -> dict:
        """A script that writes a JSON file of figures: the figures go into the summary."""
        json_path = self.work / "logs" / json_name
        stage = self.command(name, [*argv, "--json_path", str(json_path)], timeout)
        if stage["returncode"] in skip_codes:
            stage["status"] = "skipped"
        if json_path.exists():
            stage["figures"] = json.loads(json_path.read_text())
        self.record(stage)
        return stage

    @contextlib.contextmanager
    def guarded(self):
        """Whatever the stages raise, the summary says so and the archive is still written."""
        try:
            yield
        except BaseException as error:
            self.summary["script_error"] = "".join(traceback.format_exception(error))[-3000:]
            raise
        finally:
            self.finish()

    def finish(self):
        """The archive and the final summary."""
        self.write_archive()
        self.summary["out_contract"] = out_contract(self.out)
        self.summary["finished"] = True
        self.write_summary()
        self.log(f"done: {len(self.summary['stages'])} stages, OUT {self.summary['out_contract']}")

    def write_archive(self):
        """results.tar.gz, from the main thread at a low compression level, replaced atomically; dropped (the
        summary says so) when over 15 MiB."""
        archive, temporary = self.out / "results.tar.gz", self.out / ".results.tar.gz.tmp"
        with tarfile.open(temporary, "w:gz", compresslevel=1) as tar:
            # os.walk, not rglob: runs still going delete their checkpoints meanwhile, which os.walk skips
            paths = sorted(Path(folder) / name for folder, _, names in os.walk(self.work) for name in names)
            for path in paths:
                if path.suffix not in (".json", ".jsonl", ".log") or {"wandb", "checkpoints"} & set(path.parts):
                    continue
                try:
                    data = path.read_bytes()[-LOG_TAIL:] if path.suffix == ".log" else path.read_bytes()
                except OSError:  # gone meanwhile
                    continue
                info = tarfile.TarInfo(str(path.relative_to(self.work)))
                info.size = len(data)
                tar.addfile(info, fileobj=io.BytesIO(data))
        if temporary.stat().st_size > ARCHIVE_LIMIT:  # never more than can come back: keep the summary alone
            temporary.unlink()
            archive.unlink(missing_ok=True)
            self.summary["archive"] = "dropped: over 15 MiB"
        else:
            os.replace(temporary, archive)


PROBE = """
import json, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
except Exception as error:
    info["torch"] = f"not importable: {error}"
for module in ("accelerate", "fire", "wandb"):
    try:
        info[module] = __import__(module).__version__
    except Exception as error:
        info[module] = f"not importable: {type(error).__name__}"
print(json.dumps(info))
"""


def environment(timeout: float = 90.0) -> dict:
    """Versions and the device, probed in a subprocess under a timeout: a CUDA start or an import that hangs
    must not hang the session."""
    try:
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=timeout)
        return json.loads(probe.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout} s"
        return {"python": sys.version.split()[0], "probe": failure, "wandb": "not importable: probe"}
    except (ValueError, IndexError):
        failure = f"failed: {probe.stderr[-300:]}"
        return {"python": sys.version.split()[0], "probe": failure, "wandb": "not importable: probe"}


def run_figures(run_dir: Path, log_path: Path) -> dict:
    """What a finished run reports: final accuracies (every test-time mode), training time, best mode."""
    figures = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [row for row in map(_json_or_none, metrics.read_text().splitlines()) if row is not None]
        final = {
            k: v
            for row in rows
            for k, v in row.items()
            if k.startswith(("Accuracy/Validation_final", "Accuracy/Test"))
        }
        figures["final"] = final
        figures["time_breakdown"] = {k: v for row in rows for k, v in row.items() if k.startswith("time/")}
        validation = {k: v for k, v in final.items() if k.startswith("Accuracy/Validation_final")}
        if validation:
            figures["best_key"], figures["score"] = max(validation.items(), key=lambda item: item[1])
    text = Path(log_path).read_text(errors="replace") if Path(log_path).exists() else ""
    trained = re.search(r"trained \d+ epochs in ([\d.]+) s", text)
    if trained:
        figures["train_seconds"] = float(trained.group(1))
    return figures


def _json_or_none(line: str):
    """A metrics line, or None for one cut short by a kill at the timeout."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def out_contract(out: Path) -> dict:
    """What the device tool hands back: at most 8 files, 2 folders deep, 16 MiB each, 64 MiB in all."""
    files = [path for path in Path(out).rglob("*") if path.is_file()]
    sizes = [path.stat().st_size for path in files]
    depth = max((len(path.relative_to(out).parts) - 1 for path in files), default=0)
    ok = len(files) <= 8 and depth <= 2 and max(sizes, default=0) < 16 * MiB and sum(sizes) < 64 * MiB
    return {"files": len(files), "deepest_folder": depth, "largest_bytes": max(sizes, default=0), "ok": ok}


def accelerate_launch() -> list:
    """`accelerate launch` as a user types it (its module if the console script is not on PATH)."""
    script = shutil.which("accelerate")
    return [script, "launch"] if script else [sys.executable, "-m", "accelerate.commands.launch"]


def smoke(out, rehearse: bool = False, **options):
    """`accelerate launch launch/train.py --num_epochs 25 ...` as the README says, then graph check and benchmarks."""
    session = Session(out, rehearse=rehearse, **options)
    with session.guarded():
        smoke_stages(session, rehearse)


def smoke_stages(session: Session, rehearse: bool):
    """The default command first (its time is the figure that matters most), then the graph check, the
    benchmark in three arms: the default (eager), our CUDA graphs, and torch.compile's reduce-overhead graphs, the
    scaling model's layer times (scripts/scaling_model.py) and the layouts of two processes
    (scripts/parallel_bench.py)."""
    logger = (
        "wandb" if not str(session.summary["environment"]["wandb"]).startswith("not importable") else "tensorboard"
    )
    flags = {} if rehearse else {"num_epochs": 25}
    stage = session.train(
        "default_command", flags, launcher=accelerate_launch() + ["launch/train.py"], logger=logger, timeout=180
    )
    stage["logger"] = logger if logger == "wandb" else "tensorboard (wandb does not import here)"
    session.record(stage)
    session.json_stage(
        "graph_check", [sys.executable, "scripts/graph_check.py"], 60, "graph_check.json", skip_codes=(3,)
    )
    bench = [
        "-m",
        "alexnet_dist.bench",
        *(["--steps", "1", "--windows", "2", "--batch_size", "32", "--device", "cpu"] if rehearse else []),
    ]
    session.json_stage("bench", [sys.executable, *bench], 120 if rehearse else 40, "bench.json")  # CPU: slower
    if not rehearse:  # the arms that decide --cuda_graphs' default (docs/performance.md)
        session.json_stage("bench_graphs", [sys.executable, *bench, "--cuda_graphs", "true"], 40, "bench_graphs.json")
        session.json_stage(
            "bench_reduce_overhead",
            [sys.executable, *bench, "--compile", "reduce-overhead"],
            60,
            "bench_reduce_overhead.json",
        )
    # the scaling model's layer times on this device (docs/distributed.md); the rehearsal: 1 and 2 devices
    scaling = ["--device", "cpu", "--counts", "1,2", "--repeats", "1"] if rehearse else [
        "--device", "cuda", "--repeats", "5", "--assume_gpu", "150,20,3.35"]
    session.json_stage("scaling_model", [sys.executable, "scripts/scaling_model.py", *scaling],
                       120 if rehearse else 60, "scaling_model.json")
    # the paper's column split against data parallelism, on two GPUs (one GPU: the script says so and skips)
    layouts = ["--device", "cpu", "--rounds", "1", "--windows", "1", "--steps", "1"] if rehearse else [
        "--device", "cuda", "--rounds", "2", "--windows", "2", "--steps", "5"]
    session.json_stage("parallel_layouts", [sys.executable, "scripts/parallel_bench.py", *layouts],
                       240 if rehearse else 90, "parallel_layouts.json", skip_codes=(3,))


SEARCH = [  # each wave varies the best flags so far; a change is kept when it validates better
    lambda best: [
        ("base", {}),
        ("pytorch_init", {"init": "pytorch"}),
        ("t4", {"translate": 4}),
        ("t12", {"translate": 12}),
    ],
    lambda best: [
        ("cutout16", {**best, "cutout": 16}),
        ("pca", {**best, "pca_color": 0.1}),
        ("lr_up", {**best, "lr": 0.1}),
        ("lr_down", {**best, "lr": 0.025}),
    ],
    lambda best: [
        ("dropout_less", {**best, "dropout": 0.25}),
        ("smooth_off", {**best, "label_smoothing": 0.0}),
        ("wd_up", {**best, "weight_decay": 1e-3}),
        ("cosine", {**best, "schedule": "warmup_cosine"}),
    ],
    lambda best: [
        ("more_translate", {**best, "translate": best.get("translate", 8) + 4}),
        ("ema_slow", {**best, "ema": 0.9995}),
        ("warmup2", {**best, "warmup_epochs": 2}),
        ("no_ema", {**best, "ema": 0.0}),
    ],
]
REHEARSAL_SEARCH = [lambda best: [("base", {}), ("pytorch_init", {"init": "pytorch"})]]


def sweep(out, rehearse: bool = False, inject: str = "", sweep_until: float = 230.0, budget: float = 390.0, **options):
    """Greedy waves on validation accuracy until `sweep_until` seconds, then the finals.

    `inject` (rehearsal): bad_flag adds a run that fails at once, hang one that sleeps past its timeout.
    """
    session = Session(out, rehearse=rehearse, budget=budget, **options)
    with session.guarded():
        search(session, rehearse, _names(inject), sweep_until)


def _names(value) -> set:
    """Fire hands `a,b` over as a tuple, `a` as a string."""
    return set(value.split(",")) if isinstance(value, str) else set(value or ())


def search(session: Session, rehearse: bool, inject: set, sweep_until: float):
    best, best_score, wave_seconds = {}, -1.0, 0.0
    for number, make in enumerate(REHEARSAL_SEARCH if rehearse else SEARCH):
        if session.elapsed() + wave_seconds > sweep_until:
            session.log(f"search stops before wave {number + 1}: {session.elapsed():.0f} s used")
            break
        started = time.perf_counter()
        candidates = [(f"w{number + 1}_{name}", {"ema": 0.999, **flags}) for name, flags in make(best)]
        if number == 0 and "bad_flag" in inject:
            candidates.append(("w1_bad_flag", {"no_such_flag": 1}))
        if number == 0 and "hang" in inject:
            hang = [sys.executable, "-c", "import time; time.sleep(3600)"]
            candidates.append(("w1_hang", {}, hang, "none", 5.0))
        for result in session.wave(candidates):
            if result.get("score", -1.0) > best_score + (0.001 if best else 0.0):
                best, best_score = dict(result["flags"]), result["score"]
        session.summary["best_so_far"] = {"flags": best, "score": best_score}
        session.write_summary()
        wave_seconds = time.perf_counter() - started
    seeds = (1,) if rehearse else (1, 2)
    finals = [(f"best_seed{seed}", {**best, "seed": seed}) for seed in seeds]
    if not rehearse:
        for recipe in ("paper", "seed"):
            finals += [
                (f"{recipe}_seed{seed}", {"recipe": f"configs/recipes/{recipe}.yaml", "seed": seed})
                for seed in range(3)
            ]
    if session.remaining() > session.run_timeout / 2:
        session.parallel = 2 if rehearse else 5
        session.wave(finals)
    else:
        session.log("no time left for the finals")


def main(argv: list):
    if len(argv) < 2 or argv[0] not in ("smoke", "sweep"):
        print(__doc__)
        sys.exit(2)
    import fire

    fire.Fire({"smoke": smoke, "sweep": sweep}, command=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
