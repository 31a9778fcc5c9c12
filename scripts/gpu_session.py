"""The GPU measurements of the speed and accuracy issues, as one time-boxed script per device session.

    python scripts/gpu_session.py smoke OUT   # graph check, benchmark, one default 25-epoch run
    python scripts/gpu_session.py sweep OUT   # recipe search on the validation split, then 3 seeds
                                              # of the best, the paper's and the seed's recipes

Every training run is the real entry point (launch/train.py) on the CIFAR-10 training images of
the folder data set (45,000 training / 5,000 validation images, split by the run's seed); recipes
are chosen on validation accuracy only. Sweep runs share the GPU several at a time, so their
durations are not speed figures; the solo runs' are. OUT receives summary.json, the benchmark
JSON files and results.tar.gz (every run's config, metrics and log; no weights).

On a lent machine (fire and termcolor wheels plus the CIFAR-10 tarball copied into .carry/, which
.git/info/exclude ignores; carry [".carry"]; smoke ~2 min, sweep ~9 min):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    mkdir -p data/cifar10-jpeg && tar xzf .carry/cifar10-jpeg-train.tar.gz -C data/cifar10-jpeg
    python3 scripts/gpu_session.py smoke $OUT 2>&1 | tee $OUT/session.log
"""

import json
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


class Session:
    def __init__(self, out, data_dir="data/cifar10-jpeg", dataset="folder", epochs=25, parallel=4, budget=560.0):
        self.out, self.runs = Path(out), Path(out) / "work" / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.common = ["--dataset", dataset, "--data_dir", data_dir, "--logger", "none", "--num_epochs", str(epochs)]
        self.parallel, self.budget, self.results = parallel, budget, []

    def log(self, message):
        print(f"[{elapsed():6.1f} s] {message}", flush=True)

    def train(self, name: str, flags: dict) -> dict:
        """One launch/train.py run; returns its flags, wall time and final summary line."""
        argv = self.common + [item for key, value in flags.items() for item in (f"--{key}", str(value))]
        argv += ["--run_dir", str(self.runs / name), "--save", f"/tmp/weights/{name}.pth"]
        started = time.perf_counter()
        process = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *argv], capture_output=True, text=True,
                                 cwd=ROOT)
        seconds = time.perf_counter() - started
        (self.runs.parent / f"{name}.log").write_text(process.stdout + process.stderr)
        result = {"name": name, "flags": flags, "wall_seconds": seconds, "returncode": process.returncode}
        metrics = self.runs / name / "metrics.jsonl"
        if process.returncode == 0 and metrics.exists():
            result["summary"] = json.loads(metrics.read_text().splitlines()[-1])
            finals = {k: v for k, v in result["summary"].items() if k.startswith("Accuracy/Validation_final")}
            result["best_key"], result["score"] = max(finals.items(), key=lambda item: item[1]) if finals else (None, 0.0)
        else:
            result["score"] = 0.0
            result["error"] = (process.stderr or process.stdout)[-800:]
        self.results.append(result)
        self.log(f"{name}: {result['score']:.4f} ({result.get('best_key')}), {seconds:.1f} s, rc {process.returncode}")
        self.save()
        return result

    def wave(self, runs: list) -> list:
        with ThreadPoolExecutor(self.parallel) as pool:
            return list(pool.map(lambda run: self.train(*run), runs))

    def command(self, name: str, argv: list, timeout: float):
        started = time.perf_counter()
        try:
            process = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
            text, code = process.stdout + process.stderr, process.returncode
        except subprocess.TimeoutExpired as error:
            text, code = f"{error.stdout or ''}{error.stderr or ''}\ntimed out after {timeout} s", -1
        (self.runs.parent / f"{name}.log").write_text(text)
        self.log(f"{name}: rc {code}, {time.perf_counter() - started:.1f} s\n{text[-1500:]}")

    def save(self):
        (self.out / "summary.json").write_text(json.dumps(self.results, indent=1, default=str))
        with tarfile.open(self.out / "results.tar.gz", "w:gz") as archive:
            archive.add(self.runs.parent, arcname="gpu_session")


def smoke(out, **options):
    session = Session(out, **options)
    session.command("graph_check", [sys.executable, "scripts/graph_check.py", "--json_path", f"{out}/graph_check.json"], 120)
    session.command("bench_default", [sys.executable, "-m", "alexnet_dist.bench", "--json_path", f"{out}/bench_default.json"], 180)
    session.train("default_solo", {})
    session.save()


SEARCH = [  # each wave varies the best flags so far; a change is kept when it validates better
    lambda best: [("base", {}), ("kaiming", {"init": "kaiming"}), ("kaiming_t4", {"init": "kaiming", "translate": 4}),
                  ("kaiming_t8", {"init": "kaiming", "translate": 8})],
    lambda best: [("cutout16", {**best, "cutout": 16}), ("pca", {**best, "pca_color": 0.1}),
                  ("lr_up", {**best, "lr": 0.1}), ("lr_down", {**best, "lr": 0.025})],
    lambda best: [("wd_up", {**best, "weight_decay": 1e-3}), ("wd_down", {**best, "weight_decay": 2.5e-4}),
                  ("smooth_up", {**best, "label_smoothing": 0.2}), ("smooth_off", {**best, "label_smoothing": 0.0})],
    lambda best: [("more_translate", {**best, "translate": best.get("translate", 0) + 4}),
                  ("cutout24", {**best, "cutout": 24}), ("dropout_less", {**best, "dropout": 0.3}),
                  ("cosine", {**best, "schedule": "warmup_cosine"})],
    lambda best: [("warmup2", {**best, "warmup_epochs": 2}), ("ema_slow", {**best, "ema": 0.9995}),
                  ("ema_fast", {**best, "ema": 0.998}), ("no_nesterov", {**best, "nesterov": False})],
]


def sweep(out, sweep_until: float = 330.0, **options):
    session = Session(out, **options)
    best, best_score, wave_seconds = {}, -1.0, 0.0
    for number, make in enumerate(SEARCH):
        if elapsed() + wave_seconds > sweep_until:
            session.log(f"search stops before wave {number + 1}: {elapsed():.0f} s used")
            break
        started = time.perf_counter()
        candidates = [(f"w{number + 1}_{name}", {"ema": 0.999, **flags}) for name, flags in make(best)]
        for result in session.wave(candidates):
            if result["score"] > best_score + (0.001 if best else 0.0):
                best, best_score = {k: v for k, v in result["flags"].items()}, result["score"]
                session.log(f"best so far: {result['name']} {best_score:.4f} {best}")
        wave_seconds = time.perf_counter() - started
    (Path(out) / "chosen.json").write_text(json.dumps({"flags": best, "score": best_score}, indent=1))
    finals = [(f"best_seed{seed}", {**best, "seed": seed}) for seed in (1, 2)]
    finals += [("best_plain_path", {**best, "loader": "stream", "cuda_graphs": "false"})]
    for recipe in ("paper", "seed"):
        finals += [(f"{recipe}_seed{seed}", {"recipe": f"configs/recipes/{recipe}.yaml", "seed": seed}) for seed in range(3)]
    session.parallel = 5
    session.wave(finals)
    session.train("best_solo", best)
    remaining = session.budget - elapsed()
    bench_flags = [item for key, value in best.items() for item in (f"--{key}", str(value))]
    if remaining > 60:
        session.command("bench_best", [sys.executable, "-m", "alexnet_dist.bench", "--json_path", f"{out}/bench_best.json",
                                       *bench_flags], remaining - 20)
    session.save()


if __name__ == "__main__":
    fire.Fire({"smoke": smoke, "sweep": sweep})
