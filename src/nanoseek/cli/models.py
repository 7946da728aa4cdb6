"""`nanoseek eval`, `nanoseek info` and `nanoseek convert`: a checkpoint's quality, size and format."""

from __future__ import annotations

import json

from nanoseek.cli.common import (
    Command,
    add_checkpoint_args,
    add_json_arg,
    add_threads_arg,
    add_trust_pickle,
    aligned,
    human_count,
    load,
    reject_extra,
    set_threads,
    table,
)
from nanoseek.config import ModelConfig
from nanoseek.config.presets import ALIASES, PRESETS, canonical_name
from nanoseek.errors import NanoseekError
from nanoseek.io import convert
from nanoseek.model import model_info
from nanoseek.train.evaluate import evaluate_checkpoint


def add_eval_arguments(e) -> None:
    add_checkpoint_args(e)
    e.add_argument("--data", help="evaluate on this whole file (default: the training corpus's val split)")
    e.add_argument("--seq-len", type=int, help="window length (default: the run's, else min(context, 1024))")
    e.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    e.add_argument("--max-batches", type=int, help="stop after this many batches (default: the whole text)")
    add_threads_arg(e)
    add_json_arg(e)


def run_eval(args, extra) -> int:
    reject_extra(extra)
    set_threads(args.threads)
    model, tok, folder = load(args)
    result = evaluate_checkpoint(model, tok, folder, args.data, args.seq_len, args.batch_size, args.max_batches)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        aligned([
            ("loss", f"{result['loss']:.4f} nats/token"),
            ("perplexity", f"{result['perplexity']:.3f}"),
            ("bits per byte", f"{result['bits_per_byte']:.4f}"),
            ("text", f"{result['tokens']:,} tokens ({result['bytes']:,} bytes) in windows of {result['seq_len']}"),
        ])
    )  # fmt: skip
    return 0


def add_info_arguments(i) -> None:
    i.add_argument("ckpt", nargs="?", help="a checkpoint folder, a run folder or an HF folder")
    i.add_argument("--preset", help="a named config instead of a checkpoint (list them with `nanoseek presets`)")
    i.add_argument("--seq-len", type=int, help="context length for the FLOPs estimate (default: the model's context)")
    add_trust_pickle(i)
    add_json_arg(i, "the figures and the whole model config")


def describe_kinds(config: ModelConfig) -> str:
    """'mla attention, dense; moe FFN (256 routed + 1 shared experts, top-8); 61 layers, width 7168'."""
    kinds = sorted({config.layer_sparse(i) for i in range(config.num_hidden_layers)})
    text = f"{config.attention} attention ({', '.join(kinds)}); {config.ffn} FFN"
    if config.ffn == "moe":
        text += (
            f" ({config.n_routed_experts} routed + {config.n_shared_experts} shared experts, "
            f"top-{config.num_experts_per_tok})"
        )
    if config.fusion != "residual":
        text += f"; {config.fusion} fusion"
    return text + f"; {config.num_hidden_layers} layers, width {config.hidden_size}"


def info_lines(source: str, config: ModelConfig, info: dict) -> str:
    """What `nanoseek info` prints on a terminal: sizes in K/M/B, one aligned line each."""
    total, active = info["params_total"], info["params_active"]
    params = f"{human_count(total)} total"
    params += (
        f", {human_count(active)} active per token ({human_count(info['params_active_non_embedding'])} "
        "without the embedding table)"
        if active != total
        else " (dense: every parameter is active per token)"
    )
    rows = [("model", source), ("parameters", params)]
    if info["params_mtp"]:
        mtp, mtp_active = human_count(info["params_mtp"]), human_count(info["params_mtp_active"])
        rows.append(("MTP modules", f"{mtp} more ({mtp_active} active)"))
    flops = human_count(info["flops_per_token"])
    rows += [
        ("architecture", describe_kinds(config)),
        ("context", f"{config.max_position_embeddings:,} tokens, vocabulary {config.vocab_size:,}"),
        ("FLOPs per token", f"{flops} (training, at {info['flops_seq_len']:,} positions)"),
        ("KV cache", f"{info['kv_cache_bytes_per_token']:,} bytes per token ({info['kv_cache_dtype']})"),
    ]  # fmt: skip
    return aligned(rows) + "\n(--json: these figures and the whole config)"


def run_info(args, extra) -> int:
    reject_extra(extra)
    if args.preset:
        config = ModelConfig.from_preset(args.preset)
        name = canonical_name(args.preset)
        source, label = {"preset": name}, f"preset {name}"
    elif args.ckpt:
        model, _, folder = load(args, tokenizer=False)
        config, source, label = model.config, {"checkpoint": str(folder)}, str(folder)
    else:
        raise NanoseekError("give a checkpoint path or --preset NAME (list them with `nanoseek presets`)")
    info = model_info(config, args.seq_len)
    if args.json:
        print(json.dumps({**source, **info, "config": config.to_dict()}))
    else:
        print(info_lines(label, config, info))
    return 0


def preset_rows() -> list[dict]:
    """Every preset: its parameters (total, active per token) and its kinds, from `model_info`."""
    rows = []
    for name in sorted(PRESETS):
        config = ModelConfig.from_preset(name)
        info = model_info(config)
        rows.append({
            "preset": name, "params_total": info["params_total"], "params_active": info["params_active"],
            "params_active_non_embedding": info["params_active_non_embedding"],
            "attention": config.attention, "sparse": config.layer_sparse(0), "ffn": config.ffn,
            "context": config.max_position_embeddings,
            "aliases": sorted(old for old, new in ALIASES.items() if new == name),
        })  # fmt: skip
    return rows


def add_presets_arguments(p) -> None:
    add_json_arg(p, "one object per preset")


def run_presets(args, extra) -> int:
    reject_extra(extra)
    rows = preset_rows()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = ("preset", "params", "active", "attention", "sparse", "ffn", "context")
    print(
        table(header, [
            (r["preset"], human_count(r["params_total"]), human_count(r["params_active"]), r["attention"],
             r["sparse"], r["ffn"], str(r["context"]))
            for r in rows
        ])
    )  # fmt: skip
    print(
        "\nparams: every weight but the MTP modules; active: the weights one token uses (MoE: only its "
        "experts; dense: all).\nsizes: -tiny ~0.1M (tests) < -mini ~1M (CPU minutes) < -small ~10M; full "
        "names are the published shapes (gpt2 = GPT-2 small, 124M).\nold names still accepted: "
        + ", ".join(f"{old} = {new}" for old, new in sorted(ALIASES.items()))
    )
    return 0


def add_convert_arguments(cv) -> None:
    cv.add_argument("src", help="a checkpoint, run or HF folder")
    cv.add_argument("dst", help="the new folder (must not exist or be empty)")
    cv.add_argument("--to", choices=("hf", "nanoseek"), required=True)
    cv.add_argument("--dtype", choices=("float32", "bfloat16"), help="the dtype of the written weights")
    cv.add_argument(
        "--drop-mtp",
        action="store_true",
        help="--to hf: leave DeepSeek's MTP layers out (kept by default, as DeepSeek's checkpoints keep them)",
    )
    add_trust_pickle(cv)
    add_json_arg(cv)


def run_convert(args, extra) -> int:
    reject_extra(extra)
    out = convert(args.src, args.dst, args.to, args.dtype, args.trust_pickle, args.drop_mtp)
    if args.json:
        print(json.dumps({"converted": str(args.src), "to": args.to, "out": str(out)}))
    else:
        print(f"converted {args.src} -> {out} ({'Hugging Face' if args.to == 'hf' else 'nanoseek'} format)")
    return 0


COMMANDS = [
    Command("presets", "the named model configs: parameters, kinds, context", add_presets_arguments, run_presets),
    Command("eval", "loss, perplexity and bits per byte on held-out text", add_eval_arguments, run_eval),
    Command("info", "parameters, FLOPs per token and KV-cache bytes per token", add_info_arguments, run_info),
    Command(
        "convert", "convert a checkpoint between nanoseek and Hugging Face formats", add_convert_arguments, run_convert
    ),
]
