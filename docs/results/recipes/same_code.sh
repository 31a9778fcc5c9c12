#!/bin/bash
# Do commits train bit-identically? One short run of the default recipe (bf16 on this CPU, dropout, flips,
# translation) on 10% of the JPEG training split at each commit, seed 0; then the weights compared.
# Threads as torch takes them (OMP_NUM_THREADS, else every core): compare commits at one count, e.g.
#   OMP_NUM_THREADS=1 bash same_code.sh /work/recipe-code/4d13db1 /work/recipe-code/7134a2b
set -e
out=/work/recipe-code/same_code/threads_${OMP_NUM_THREADS:-all}; mkdir -p $out
echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
for tree in "$@"; do
  name=$(basename $tree)
  rm -rf $out/$name && mkdir -p $out/$name && cd $out/$name
  WANDB_MODE=disabled /work/main/.venv/bin/python $tree/launch/train.py --dataset folder --data_dir /work/data/cifar10-jpeg \
    --fraction_of_data 0.1 --num_epochs 1 --logger none --tta none --save w.pth --run_dir run > log.txt 2>&1
  grep "^epoch" log.txt
done
/work/main/.venv/bin/python - "$out" "$@" <<'PY'
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
