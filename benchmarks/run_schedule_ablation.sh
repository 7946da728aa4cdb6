#!/usr/bin/env bash
# Learning-rate schedules at equal token budgets: cosine, WSD, reduce-on-plateau, cosine + spike guard,
# schedule-free AdamW; 3 seeds each, on tiny Shakespeare and on the Tang poems. Run alone (~25 min per corpus
# on 2 cores with the default budget); TOKENS sets the budget, CORPORA the corpora, SEEDS the seeds, PRESET,
# THREADS, BATCH, SEQ_LEN, WARMUP, EVAL_EVERY and EVAL_BATCHES the model and the run (EXTRA: more --section.field=VALUE).
# Then: python benchmarks/plot_seeds.py $OUT/* --png ... --jsonl ... (mean ± seed spread, the plot).
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${NS:-.venv/bin/nanoseek}  # word-split on purpose: NS="python -m nanoseek" works
OUT=${OUT:-runs/schedules}
TOKENS=${TOKENS:-400000}
DATA=${DATA:-../shared/data}
CORPORA=${CORPORA:-"tinyshakespeare tang_poems"}
COMMON=(--preset "${PRESET:-deepseek-v3-mini}" --train.max_steps=0 --train.max_seconds=0 --train.max_tokens="$TOKENS"
        --eval.every="${EVAL_EVERY:-50}" --eval.batches="${EVAL_BATCHES:-20}" --checkpoint.every=0 --log.progress=false
        --train.threads="${THREADS:-2}" --train.batch_size="${BATCH:-16}" --data.seq_len="${SEQ_LEN:-128}"
        --schedule.warmup_steps="${WARMUP:-100}" ${EXTRA:-})
SCHEDULES=(
  "cosine:schedule.name=cosine"
  "wsd:schedule.name=wsd"
  "plateau:schedule.name=plateau,schedule.plateau_patience=1,schedule.plateau_factor=0.5"
  "guard:schedule.name=cosine,schedule.spike_guard=true"
  "schedule_free:optim.name=schedule_free,schedule.name=constant,optim.beta1=0.9,optim.beta2=0.99"
)
for corpus in $CORPORA; do
  variants=()
  for seed in ${SEEDS:-1 2 3}; do
    for s in "${SCHEDULES[@]}"; do
      variants+=(--variant "${s%%:*}-s$seed:${s#*:},train.seed=$seed")
    done
  done
  # shellcheck disable=SC2086
  $NS ablate --out "$OUT/$corpus" "${COMMON[@]}" --data.path="[\"$DATA/$corpus.txt\"]" "${variants[@]}"
done
