#!/usr/bin/env bash
# Training tokens/s by torch thread count, alone and beside a busy neighbour: the measurement behind
# the threads advice of docs/performance.md#threads. Run it alone on the machine (4 runs of BUDGET
# seconds plus start-up). PRESET (deepseek-v3-mini) and BUDGET (20 s) may be set; ALL is the
# thread count torch takes by default (the cores).
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${NS:-.venv/bin/nanoseek}
PY=${PY:-.venv/bin/python}
PRESET=${PRESET:-deepseek-v3-mini}
BUDGET=${BUDGET:-20}
ALL=${ALL:-$($PY -c "import torch; print(torch.get_num_threads())")}
OUT=$(mktemp -d)
trap 'kill $NEIGHBOUR 2>/dev/null || true; rm -rf "$OUT"' EXIT
NEIGHBOUR=

speed() {  # $1 threads, $2 label: the median training tokens/s of one run
  $NS train --preset "$PRESET" --out "$OUT/t$1-$2" --max-seconds "$BUDGET" --threads "$1" --eval.every=0 \
    --eval.batches=2 --checkpoint.every=0 --log.every=5 --log.progress=false --log.plot=false --json > /dev/null 2>&1
  $PY - "$OUT/t$1-$2/metrics.jsonl" "$1" "$2" <<'PY'
import json, statistics, sys
rates = [r["tokens_per_s"] for r in map(json.loads, open(sys.argv[1])) if "tokens_per_s" in r]
rates = rates[1:] or rates  # the first window holds the warm-up
print(json.dumps({"bench": "threads", "threads": int(sys.argv[2]), "neighbour": sys.argv[3],
                  "tokens_per_s": round(statistics.median(rates)), "logged_windows": len(rates)}))
PY
}

echo "# $PRESET, $BUDGET s per run; $(nproc) cores, torch's default: $ALL threads" >&2
speed 1 alone
speed "$ALL" alone
# the neighbour: one busy single-threaded process (another user's job, a second training run)
$PY -c "import torch; torch.set_num_threads(1); a = torch.randn(512, 512); [a @ a for _ in iter(int, 1)]" &
NEIGHBOUR=$!
speed 1 busy
speed "$ALL" busy
