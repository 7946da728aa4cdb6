#!/usr/bin/env bash
# Re-measure the figures of benchmarks/RESULTS.md. Run alone on a quiet machine (about 20 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
NS=.venv/bin/nanoseek
PY=.venv/bin/python
OUT=${OUT:-/tmp/nanoseek-results}
mkdir -p "$OUT"
# nanoseek gpt2 presets vs the plain reference GPT (identical shapes), alternating
$NS bench train --preset gpt2-mini --seq-len 64 --batch 12 --threads 2 --rounds 3 --steps 20 --json | tee "$OUT/train_small_t2.jsonl"
$NS bench train --preset gpt2-mini --seq-len 64 --batch 12 --threads 1 --rounds 3 --steps 20 --json | tee "$OUT/train_small_t1.jsonl"
$NS bench train --preset gpt2-baby --seq-len 256 --batch 8 --threads 2 --rounds 2 --steps 5 --warmup 2 --json | tee "$OUT/train_baby_t2.jsonl"
# bf16 autocast only where the CPU has AVX-512 bf16 / AMX: measure the matmul peaks first
$PY -c "from nanoseek.bench.common import measure_matmul_peak as m; import json; print(json.dumps({'bench': 'matmul_peak', 'float32_gflops': m('float32', 2), 'bfloat16_gflops': m('bfloat16', 2)}))" | tee "$OUT/peak.jsonl"
# DeepSeek-V3 vs dense models, throughput and memory at seq 256, batch 8
for p in deepseek-v3-small llama-small gpt2-mini; do
  $NS bench train --preset $p --seq-len 256 --batch 8 --threads 2 --rounds 2 --steps 5 --warmup 2 --peers none --json | tee "$OUT/train_$p.jsonl"
done
# load time and peak RSS of a ~1 GB HF checkpoint, nanoseek vs transformers
$PY benchmarks/bench_load.py --rounds 2 | tee "$OUT/load.jsonl"
# validation loss at equal wall-clock on the bundled corpus with a trained BPE tokenizer
$NS tokenizer train --vocab-size 2048 --out "$OUT/bpe2048.json" src/nanoseek/data/tinyshakespeare.txt
for p in deepseek-v3-small llama-small gpt2-mini; do
  $NS train --preset $p --out "$OUT/eq-$p" --overwrite --data.tokenizer="$OUT/bpe2048.json" --data.seq_len=256 \
    --train.batch_size=8 --train.max_steps=0 --train.max_seconds=150 --optim.lr=1e-3 --schedule.warmup_steps=50 \
    --eval.every=0 --checkpoint.every=0 --log.progress=false --train.threads=2 --json | tee "$OUT/eq-$p.json"
done
