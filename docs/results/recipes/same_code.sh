#!/bin/bash
# Do commits train bit-identically? One short run of the default recipe (bf16 on this CPU, dropout, flips,
# translation) on 10% of the JPEG training split at each commit, seed 0; then the weights compared.
# Threads as torch takes them (OMP_NUM_THREADS, else every core): compare commits at one count, e.g.
#   OMP_NUM_THREADS=1 bash same_code.sh CHECKOUT_OF_4d13db1 CHECKOUT_OF_7134a2b
# Set VENV (an environment with the package's dependencies), DATA (the JPEG tree, see docs/results.md) and OUT
# (where the runs go); the defaults are relative to this repository. Every path is resolved before the runs start.
set -e
repo=$(cd "$(dirname "$0")/../../.." && pwd)
VENV=$(cd "${VENV:-$repo/.venv}" && pwd) DATA=$(cd "${DATA:-$repo/data/cifar10-jpeg}" && pwd)
trees=(); for tree in "$@"; do trees+=("$(cd "$tree" && pwd)"); done
out=${OUT:-$repo/runs/same_code}/threads_${OMP_NUM_THREADS:-all}; mkdir -p "$out" && out=$(cd "$out" && pwd)
echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
for tree in "${trees[@]}"; do
  name=$(basename "$tree")
  rm -rf $out/$name && mkdir -p $out/$name && cd $out/$name
  WANDB_MODE=disabled "$VENV/bin/python" $tree/launch/train.py --dataset folder --data_dir "$DATA" \
    --fraction_of_data 0.1 --num_epochs 1 --logger none --tta none --save w.pth --run_dir run > log.txt 2>&1
  grep "^epoch" log.txt
done
"$VENV/bin/python" - "$out" "$@" <<'PY'
import sys, torch
from pathlib import Path
out = Path(sys.argv[1])
trees = [Path(t).name for t in sys.argv[2:]]
weights = {t: torch.load(out / t / "w.pth", weights_only=False)["state_dict"] for t in trees}
first = trees[0]
for t in trees[1:]:
    same = all(torch.equal(weights[first][k], weights[t][k]) for k in weights[first])
    print(f"{first} vs {t}: weights bit-identical: {same}")
PY
