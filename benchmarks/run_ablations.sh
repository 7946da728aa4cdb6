#!/usr/bin/env bash
# The ablations of benchmarks/RESULTS.md: fusion kinds, LR schedules, optimizers. ~20 min, alone.
set -euo pipefail
cd "$(dirname "$0")/.."
NS=.venv/bin/nanoseek
OUT=${OUT:-runs/ablations}
COMMON=(--preset deepseek-v3-mini --train.max_steps=0 --train.max_seconds=0 --train.max_tokens=400000
        --eval.every=50 --eval.batches=20 --checkpoint.every=0 --log.progress=false --train.threads=2)
$NS ablate --out "$OUT/fusion" "${COMMON[@]}" \
  --variant residual:model.fusion=residual --variant dwa:model.fusion=dwa --variant dynamic:model.fusion=dynamic \
  --variant hyper:model.fusion=hyper --variant mhc:model.fusion=mhc
$NS ablate --out "$OUT/schedule" "${COMMON[@]}" \
  --variant constant:schedule.name=constant --variant cosine:schedule.name=cosine --variant wsd:schedule.name=wsd \
  --variant multistep:schedule.name=multistep --variant inverse_sqrt:schedule.name=inverse_sqrt,schedule.warmup_steps=50,optim.lr=3e-3 \
  --variant muon-cosine:optim.name=muon,schedule.name=cosine
