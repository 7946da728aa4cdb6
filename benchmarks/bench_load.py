"""Load time and peak memory of a ~1 GB HF-format DeepSeek-V3-style checkpoint: nanoseek vs transformers.

Writes a random checkpoint once (fp32, experts unpacked per expert as on the Hub), then loads it
in fresh child processes, alternating nanoseek and transformers, and reports each child's wall time
and peak RSS (VmHWM) relative to the checkpoint's size on disk.

    python benchmarks/bench_load.py --rounds 2 [--dir /tmp/nanoseek-load-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
impl, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if impl == "nanoseek":
    from nanoseek import load_model
    model = load_model(path)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
seconds = time.perf_counter() - t0
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
# VmHWM: this process image's own peak (ru_maxrss would carry the parent's RSS across exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"impl": impl, "seconds": seconds, "peak_rss_kib": hwm, "logit0": float(logits[0, -1, 0])}))
"""

CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    q_lora_rank=384,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    intermediate_size=2816,
    moe_intermediate_size=512,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    num_nextn_predict_layers=0,
    max_position_embeddings=4096,
)


def write_checkpoint(folder: Path) -> int:
    import torch

    from nanoseek import ModelConfig, Transformer

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("deepseek-v3-small", **CONFIG))
        model.save_pretrained(folder, format="hf")
        del model
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def baseline_rss_kib() -> int:
    """Peak RSS of a child that only imports torch (the floor every loader pays)."""
    code = "import torch; print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/nanoseek-load-bench")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write-only", action="store_true")
    args = p.parse_args()
    if args.write_only:
        write_checkpoint(Path(args.dir))
        return
    folder = Path(args.dir)
    # write the checkpoint in a child, so that this process stays small
    subprocess.run([sys.executable, __file__, "--write-only", "--dir", str(folder)], check=True)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    floor = baseline_rss_kib()
    results: dict[str, list[dict]] = {"nanoseek": [], "hf": []}
    for _ in range(args.rounds):
        for impl in ("nanoseek", "hf"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, impl, str(folder)],
                capture_output=True,
                text=True,
                env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
            )
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            results[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for impl, runs in results.items():
        best = min(runs, key=lambda r: r["seconds"])
        peak = max(r["peak_rss_kib"] for r in runs) * 1024
        print(
            json.dumps(
                {
                    "bench": "load",
                    "impl": impl,
                    "checkpoint_mib": round(size / 2**20, 1),
                    "seconds": round(best["seconds"], 2),
                    "peak_rss_mib": round(peak / 2**20, 1),
                    "peak_rss_over_size": round(peak / size, 3),
                    "peak_rss_minus_torch_import_over_size": round((peak - floor * 1024) / size, 3),
                    "logit0": round(best["logit0"], 5),
                }
            )
        )


if __name__ == "__main__":
    main()
