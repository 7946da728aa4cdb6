#!/usr/bin/env bash
# The prepared run for a CUDA machine (an H100 or H200 lent for a few minutes): tests, benchmarks, profiles.
# One call; every step has its own time limit (below), so the script always ends and returns what it
# has, in at most 8 files under $OUT (the device tool's folder) or benchmarks/out/gpu.
# STEPS picks the steps (default "tests train prefill decode": ~5 minutes on an H200, limits < 10):
#   tests      tests/test_gpu.py on the device                                     tests.txt
#   train      bench train vs transformers, fp32 then bf16 autocast, nanoseek     train.jsonl, train_bf16.jsonl
#              eager and compiled (train.compile=true: nanoseek-compiled)
#   prefill    bench prefill vs transformers, then again with the compiled prefill  prefill.jsonl
#   decode     bench decode vs transformers at batch 1 and 8, compiled (CUDA graphs), decode.jsonl
#              then batch 1 with --no-cuda-graphs appended ("cuda_graphs": false)
#   attention  bench attention at ATT_SEQ tokens, fp32 then bf16 autocast          attention.jsonl
#   profile    benchmarks/profile_train.py: nanoseek fp32 and bf16, transformers bf16   profile.txt
# ATTENTION=1 adds the attention step to the default set. The probe and every step's command line
# and exit status go to log.txt.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh        (from the repository root, on the GPU machine)
#   STEPS="tests decode attention profile" OUT=/some/dir bash benchmarks/gpu_run.sh
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
STEPS=${STEPS:-"tests train prefill decode"}
[ "${ATTENTION:-0}" = 1 ] && STEPS="$STEPS attention"

wanted() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
step() {  # step SECONDS FILE COMMAND...: run with a limit, stdout appended to $OUT/FILE, stderr to the log
    local limit=$1 name=$2; shift 2
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" >> "$OUT/$name" 2>> "$OUT/log.txt"
    echo "== $name: exit $?" | tee -a "$OUT/log.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 45 $PY -c "import torch, transformers, pytest; from torch.utils.cpp_extension import CUDA_HOME; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'pytest', pytest.__version__, 'CUDA_HOME', CUDA_HOME)"
} 2>&1 | tee -a "$OUT/log.txt"

if wanted tests; then
    NANOSEEK_TEST_DEVICE=$DEVICE step 100 tests.txt $PY -m pytest -q -p no:cacheprovider -o addopts= tests/test_gpu.py
    tail -3 "$OUT/tests.txt"
fi
if wanted train; then
    TRAIN="--peers hf --compile --seq-len 256 --batch 8 --steps 10 --warmup 3 --rounds 3 --device $DEVICE"
    step 100 train.jsonl $PY -m nanoseek bench train --json --preset $PRESET $TRAIN
    step 80 train_bf16.jsonl $PY -m nanoseek bench train --json --preset $PRESET $TRAIN --dtype bfloat16 --ref-dtype bfloat16
fi
if wanted prefill; then
    step 30 prefill.jsonl $PY -m nanoseek bench prefill --json --preset $PRESET --rounds 5 --prompt-len $PROMPT --device $DEVICE
    step 90 prefill.jsonl $PY -m nanoseek bench prefill --json --preset $PRESET --rounds 5 --prompt-len $PROMPT --compile \
        --device $DEVICE  # apart, so that a long compile cannot take the eager figures with it
fi
if wanted decode; then
    DECODE="--preset $PRESET --context $CONTEXT --rounds 3 --compile --device $DEVICE"
    step 90 decode.jsonl $PY -m nanoseek bench decode --json $DECODE --batch 1,8
    step 60 decode.jsonl $PY -m nanoseek bench decode --json $DECODE --batch 1 --no-cuda-graphs
fi
if wanted attention; then  # sparse attention vs dense on the GPU
    for dtype in float32 bfloat16; do
        step 80 attention.jsonl $PY -m nanoseek bench attention --json --seq ${ATT_SEQ:-4096,16384,32768} --repeats 3 \
            --dtype $dtype --device $DEVICE
    done
fi
if wanted profile; then
    for run in "nanoseek float32" "nanoseek bfloat16" "hf bfloat16"; do
        set -- $run
        step 35 profile.txt $PY benchmarks/profile_train.py --preset $PRESET --impl $1 --dtype $2 --device $DEVICE
    done
fi
grep -h '"ratio"' "$OUT"/*.jsonl
