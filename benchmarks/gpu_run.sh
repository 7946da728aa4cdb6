#!/usr/bin/env bash
# Issue 7, item 6: the prepared run for a CUDA machine (the `device` tool's H200, when one is lent).
# One call of at most 8 minutes (a 45 s probe, then steps limited to 120 + 70 + 50 + 30 + 100 + 60 s):
# the GPU tests, then training / prefill / decode against transformers on the GPU. Every step has its own time limit, so the script always ends and
# returns what it has. Results land in $OUT (the device tool's folder) or benchmarks/out/gpu.
# ATTENTION=1 adds the sparse-attention bench (dense SDPA vs each kind at ATT_SEQ tokens) as an eighth file.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh        (from the repository root, on the GPU machine)
#
# It uses the machine's own python3 and torch (no install: the device machine has no network)
# and nanoseek from this tree (PYTHONPATH=src). A dry run of the script itself on a CPU:
#   DEVICE=cpu PRESET=deepseek-v3-tiny PROMPT=128 CONTEXT=64 PYTHON=.venv/bin/python OUT=/tmp/gpu \
#       bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-deepseek-v3-small}
PROMPT=${PROMPT:-512}    # prefill prompt tokens
CONTEXT=${CONTEXT:-256}  # decode prompt tokens (then 128 new ones)

step() {  # step SECONDS NAME COMMAND...: run with a limit, stdout to $OUT/NAME, stderr to the log
    local limit=$1 name=$2; shift 2
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" > "$OUT/$name" 2>> "$OUT/log.txt"
    echo "== $name: exit $?" | tee -a "$OUT/log.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 45 $PY -c "import torch, transformers, pytest; from torch.utils.cpp_extension import CUDA_HOME; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'pytest', pytest.__version__, 'CUDA_HOME', CUDA_HOME)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

NANOSEEK_TEST_DEVICE=$DEVICE step 120 tests.txt $PY -m pytest -q -p no:cacheprovider -o addopts= tests/test_gpu.py
tail -3 "$OUT/tests.txt"
TRAIN="--peers hf --seq-len 256 --batch 8 --steps 10 --warmup 3 --rounds 3 --device $DEVICE"
step 70 train.jsonl $PY -m nanoseek bench train --preset $PRESET $TRAIN
step 50 train_bf16.jsonl $PY -m nanoseek bench train --preset $PRESET $TRAIN --dtype bfloat16 --ref-dtype bfloat16
step 30 prefill.jsonl $PY -m nanoseek bench prefill --preset $PRESET --rounds 5 --prompt-len $PROMPT --device $DEVICE
step 100 decode.jsonl $PY -m nanoseek bench decode --preset $PRESET --batch 1,8 --context $CONTEXT --rounds 3 \
    --compile --device $DEVICE
if [ "${ATTENTION:-0}" = 1 ]; then  # issue 5 on the GPU: one more minute at most, so only when asked
    step 60 attention.jsonl $PY -m nanoseek bench attention --seq ${ATT_SEQ:-4096,16384} --repeats 3 --device $DEVICE
fi
grep -h '"ratio"' "$OUT"/*.jsonl
