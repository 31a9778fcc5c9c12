#!/usr/bin/env bash
# On a lent GPU machine (device tool, carry [".carry"]): install the carried wheels, unpack the
# CIFAR-10 images, run one part of scripts/gpu_session.py with its output in $OUT.
#   bash scripts/gpu_session.sh smoke|sweep [more flags of gpu_session.py]
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
if [ ! -d data/cifar10-jpeg/train ]; then
    mkdir -p data/cifar10-jpeg && tar xzf .carry/cifar10-jpeg-train.tar.gz -C data/cifar10-jpeg || exit 1
fi
python3 scripts/gpu_session.py "$1" "${OUT:-/tmp/gpu_out}" "${@:2}" 2>&1 | tee "${OUT:-/tmp/gpu_out}/session.log"
