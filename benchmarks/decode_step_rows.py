"""The server's compiled decode step against the eager one at a few batch sizes, in process (no HTTP).

Builds a model with random weights, sets up the engine's `FastDecode` (its batch buckets, one length
bucket, over the engine's own cache), and times one decode step (best of --repeats) eagerly and
compiled at each --rows; `--profile ROWS` adds torch.profiler's top ops of both steps at ROWS rows.

    taskset -c 0 python benchmarks/decode_step_rows.py --rows 1 4 16 --profile 16
"""

from __future__ import annotations

import argparse
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.generation.steps import decode_step
from nanoseek.serve.fast_decode import FastDecode, batch_buckets


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def top_ops(fn, label: str, n: int = 12) -> None:
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(5):
            fn()
    print(f"\n== {label}: top ops by self CPU time (5 steps)")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deepseek-v3-mini")
    p.add_argument("--vocab", type=int, default=324, help="vocabulary size (the demo's char tokenizer)")
    p.add_argument("--context", type=int, default=256, help="the model's context = the length bucket read")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--position", type=int, default=40, help="each row's position in its cache")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--profile", type=int, default=0, help="profile the steps at this many rows (0: none)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.profile:  # the compiled graph's kernels as profiler events (else one opaque "Call CompiledFxGraph")
        torch._inductor.config.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset, vocab_size=args.vocab, max_position_embeddings=args.context)
    model = Transformer(config).eval()
    cache = model.make_cache(args.max_batch, args.context)
    fast = FastDecode(model, cache, args.max_batch, args.context)
    print(f"{args.preset}: vocab {args.vocab}, context {args.context}, batch buckets {batch_buckets(args.max_batch)}")
    print("rows  eager ms  compiled ms   (best of", args.repeats, "steps, 1 thread)")
    with torch.inference_mode():
        for rows in sorted(set(args.rows) | ({args.profile} - {0})):
            tokens = torch.randint(0, args.vocab, (rows, 1))
            positions = torch.full((rows,), args.position)
            view = [c.rows(0, rows, args.position + 1) for c in cache]

            def eager(tokens=tokens, positions=positions, view=view):
                return decode_step(model, tokens, view, positions)

            def compiled(tokens=tokens, positions=positions, rows=rows):
                return fast.step(tokens, positions, args.position)

            diff = (compiled() - eager()).abs().max().item()
            print(
                f"{rows:4d}  {best_ms(eager, args.repeats):8.2f}  {best_ms(compiled, args.repeats):11.2f}"
                f"   (max |logit diff| {diff:.1e})",
                flush=True,
            )
            if rows == args.profile:
                top_ops(eager, f"eager step, {rows} rows")
                top_ops(compiled, f"compiled step, {rows} rows (bucket of {fast.batch_sizes})")


if __name__ == "__main__":
    main()
