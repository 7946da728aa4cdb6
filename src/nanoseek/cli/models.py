"""`nanoseek eval`, `nanoseek info`, `nanoseek convert` and `nanoseek average`: a checkpoint's quality, size
and format, and the average of a run's last checkpoints."""

from __future__ import annotations

import json
import sys

from nanoseek.cli.common import (
    Command,
    add_checkpoint_args,
    add_json_arg,
    add_threads_arg,
    add_trust_pickle,
    aligned,
    check_output_path,
    human_count,
    load,
    reject_extra,
    set_threads,
    table,
)
from nanoseek.config import ModelConfig
from nanoseek.config.presets import ALIASES, PRESETS, canonical_name
from nanoseek.errors import NanoseekError
from nanoseek.io import convert, read_model_config
from nanoseek.io.average import average_checkpoints
from nanoseek.model import model_info
from nanoseek.train.evaluate import evaluate_checkpoint
from nanoseek.train.evaluate_pairs import checkpoint_task, evaluate_pair_checkpoint


def add_eval_arguments(e) -> None:
    add_checkpoint_args(e)
    e.add_argument("--data", help="evaluate on this whole file (default: the training corpus's val split)")
    e.add_argument("--seq-len", type=int, help="window length (default: the run's, else min(context, 1024))")
    e.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    e.add_argument("--max-batches", type=int, help="stop after this many batches (default: the whole text)")
    pairs = e.add_argument_group("sequence-to-sequence checkpoints (data.task=couplets, copy, reverse, sort)")
    pairs.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    pairs.add_argument("--length-penalty", type=float, default=0.6, help="GNMT's alpha of the beam score")
    pairs.add_argument("--max-sentences", type=int, default=1000, help="held-out pairs to decode (0 = all)")
    pairs.add_argument("--samples", type=int, default=0, help="show this many held-out sources, outputs, references")
    add_threads_arg(e)
    add_json_arg(e)


def run_eval(args, extra) -> int:
    reject_extra(extra)
    set_threads(args.threads)
    model, tok, folder = load(args, encoder_decoder=True)
    if checkpoint_task(folder) != "lm" or model.config.architecture == "encoder_decoder":
        return run_eval_pairs(args, model, tok, folder)
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


def run_eval_pairs(args, model, tok, folder) -> int:
    """BLEU, chrF, exact-length rate and loss on the run's held-out pairs, and `--samples` of the outputs
    (with --json: one object on stdout, the samples on stderr)."""
    for name in ("beam", "batch_size"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.max_sentences < 0 or args.samples < 0:
        raise NanoseekError("--max-sentences and --samples must be >= 0")
    scores, rows = evaluate_pair_checkpoint(
        model, tok, folder, args.data, args.max_sentences or None, args.beam, args.length_penalty, args.batch_size
    )
    samples = [f"{source} -> {output}    (reference: {reference})" for source, reference, output in rows]
    if args.json:
        for line in samples[: args.samples]:
            print(line, file=sys.stderr)
        print(json.dumps(scores, ensure_ascii=False))
        return 0
    for line in samples[: args.samples]:
        print(line)
    decoding = "greedy" if scores["beam"] == 1 else f"beam {scores['beam']}, length penalty {scores['length_penalty']}"
    print(
        aligned([
            ("task", f"{scores['task']}: {scores['sentences']:,} held-out pairs, {decoding}"),
            ("BLEU", f"{scores['bleu']:.2f}"),
            ("chrF", f"{scores['chrf']:.2f}"),
            ("exact length", f"{scores['exact_length_rate']:.1%} of the outputs as long as their reference"),
            ("exact match", f"{scores['exact_match']:.1%}"),
            ("loss", f"{scores['loss']:.4f} nats/target token (perplexity {scores['perplexity']:.2f})"),
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
    layers = f"{config.num_hidden_layers} layers"
    if config.architecture == "encoder_decoder":
        layers = f"encoder-decoder, {config.n_encoder_layers} + {layers}"
    return text + f"; {layers}, width {config.hidden_size}"


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
    elif args.ckpt:  # the config alone: info allocates nothing, whatever the model's size
        config, folder = read_model_config(args.ckpt)
        source, label = {"checkpoint": str(folder)}, str(folder)
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
    check_output_path(args.dst, "destination")
    out = convert(args.src, args.dst, args.to, args.dtype, args.trust_pickle, args.drop_mtp)
    if args.json:
        print(json.dumps({"converted": str(args.src), "to": args.to, "out": str(out)}))
    else:
        print(f"converted {args.src} -> {out} ({'Hugging Face' if args.to == 'hf' else 'nanoseek'} format)")
    return 0


def add_average_arguments(av) -> None:
    av.add_argument("run_dir", metavar="RUN", help="a run folder (its checkpoints/)")
    av.add_argument("--last", type=int, default=5, help="average this many of the newest checkpoints")
    av.add_argument("--out", help="the new checkpoint folder (default RUN/average-last-K)")
    add_json_arg(av)


def run_average(args, extra) -> int:
    reject_extra(extra)
    out = average_checkpoints(args.run_dir, args.last, args.out)
    if args.json:
        print(json.dumps({"averaged": args.last, "run": str(args.run_dir), "out": str(out)}))
    else:
        print(f"averaged the last {args.last} checkpoints of {args.run_dir} -> {out}")
    return 0


COMMANDS = [
    Command("presets", "the named model configs: parameters, kinds, context", add_presets_arguments, run_presets),
    Command("eval", "loss, perplexity and bits per byte on held-out text", add_eval_arguments, run_eval),
    Command("info", "parameters, FLOPs per token and KV-cache bytes per token", add_info_arguments, run_info),
    Command(
        "convert", "convert a checkpoint between nanoseek and Hugging Face formats", add_convert_arguments, run_convert
    ),
    Command(
        "average",
        "average the weights of a run's last K checkpoints into a new one",
        add_average_arguments,
        run_average,
    ),
]
