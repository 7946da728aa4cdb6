"""Where one training step of `nanoseek bench train` spends its time: torch.profiler over a few steps
(after warm-up) of nanoseek's step or transformers', the top ops by self CPU time, and on a GPU by
device time, with the count of host syncs (cudaStreamSynchronize / cudaMemcpy device-to-host calls).

    python benchmarks/profile_train.py --preset deepseek-v3-small --device cuda --dtype bfloat16
    python benchmarks/profile_train.py --impl hf --device cuda          # the peer, same batches

Prints a JSON line of totals, then the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import nanoseek.bench.train as bench  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.device import resolve_device, synchronize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-v3-small")
    parser.add_argument("--impl", choices=("nanoseek", "hf"), default="nanoseek")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--rows", type=int, default=15, help="ops per table")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = resolve_device(args.device, where="--device")
    cfg = ModelConfig.from_preset(args.preset).replace(
        vocab_size=bench.VOCAB_SIZE, max_position_embeddings=args.seq_len, num_nextn_predict_layers=0
    )
    build = (bench._build_nanoseek if args.impl == "nanoseek" else bench._build_hf)(cfg, 1e-3, 1337, device)
    batches = [
        (x.to(device), y.to(device))
        for x, y in bench.make_batches(3 + args.steps, args.batch, args.seq_len, "shakespeare", 1337)
    ]
    runner = bench.TrainRunner(args.impl, build, args.dtype, device)
    runner.model, runner.optimizer, runner.loss_fn = build()
    for _ in range(3):
        runner.step(batches)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            runner.step(batches)
        synchronize(device)
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    copies = sum(e.count for e in events if e.key in ("cudaMemcpyAsync", "cudaMemcpy"))
    launches = sum(
        e.count
        for e in events
        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    )
    print(
        json.dumps(
            {
                "bench": "profile_train",
                "impl": args.impl,
                "preset": args.preset,
                "dtype": args.dtype,
                "device": str(device),
                "steps": args.steps,
                "kernel_launches_per_step": launches / args.steps,
                "stream_syncs_per_step": syncs / args.steps,
                "memcpy_calls_per_step": copies / args.steps,
            }
        )
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
