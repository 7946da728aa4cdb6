#!/usr/bin/env bash
# Layer fusion at depth: residual, dwa, dynamic, hyper, mhc in a narrow deep model (deepseek-v3-tiny's
# width 64, LAYERS layers, every FFN dense, no MTP), SEEDS seeds each, equal token budget, one corpus.
# TOKENS sets the budget, LAYERS the depth, HC the streams of hyper/mhc, THREADS, BATCH, SEQ_LEN, WARMUP,
# EVAL_EVERY and EVAL_BATCHES the run (EXTRA: more --section.field=VALUE), CORPUS the text (a file under DATA). Run alone.
# Then: python benchmarks/plot_seeds.py $OUT/* --png ... --jsonl ... (mean ± seed spread, the plot).
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${NS:-.venv/bin/nanoseek}  # word-split on purpose: NS="python -m nanoseek" works
TOKENS=${TOKENS:-200000}
LAYERS=${LAYERS:-16}
OUT=${OUT:-runs/fusion_depth}/layers$LAYERS
DATA=${DATA:-../shared/data}
CORPUS=${CORPUS:-tinyshakespeare}
COMMON=(--preset deepseek-v3-tiny --model.num_hidden_layers="$LAYERS" --model.first_k_dense_replace="$LAYERS"
        --model.num_nextn_predict_layers=0 --model.hc_mult="${HC:-4}"
        --train.max_steps=0 --train.max_seconds=0 --train.max_tokens="$TOKENS" --optim.lr="${LR:-2e-3}"
        --eval.every="${EVAL_EVERY:-50}" --eval.batches="${EVAL_BATCHES:-20}" --checkpoint.every=0
        --log.progress=false --train.threads="${THREADS:-2}" --train.batch_size="${BATCH:-16}"
        --data.seq_len="${SEQ_LEN:-128}" --schedule.warmup_steps="${WARMUP:-50}" ${EXTRA:-})
variants=()
for seed in ${SEEDS:-1 2 3}; do
  for kind in ${KINDS:-residual dwa dynamic hyper mhc}; do
    variants+=(--variant "$kind-s$seed:model.fusion=$kind,train.seed=$seed")
  done
done
# shellcheck disable=SC2086
$NS ablate --out "$OUT" "${COMMON[@]}" --data.path="[\"$DATA/$CORPUS.txt\"]" "${variants[@]}"
