"""How much memory a model needs, from its config alone, checked before anything is allocated.

The estimate adds the big terms and leaves out the small ones (norms, biases, gates), so it stays
at or under what building the model really takes; a refusal therefore never hits a model that
would have fit. Its parts, in bytes:

    weights       parameters x bytes per parameter (4 in fp32; training adds gradients and
                  AdamW's two moments: 16)
    tables        RoPE cos/sin tables (2 x max_position_embeddings x rope_dim / 2 x 4 bytes, and as
                  much again while they are computed), sinusoid / learned position tables
    activations   (training) one batch of hidden states, batch_size x seq_len x hidden_size x 4 bytes
    kv_cache      (serving) max_batch x context x the KV-cache bytes one token needs

Parameters per layer (D = hidden_size, H heads of width d, I = intermediate_size):

    attention   MHA/GQA: D H d + 2 D H_kv d + H d D;  MLA: its low-rank factors (q_lora, kv_lora)
    feed-forward  SwiGLU 3 D I, MLP 2 D I;  MoE: (E routed + shared) x 3 D I_moe + the router E D
    encoder-decoder  the encoder's layers (attention + feed-forward) and one more attention per decoder
                  layer (its cross-attention)

`check_memory` compares the total with the memory this machine has available and refuses with one
line naming the field that makes it large, the estimate and the limit:

    >>> from nanoseek.config import ModelConfig
    >>> params = estimate_params(ModelConfig.from_preset("gpt2-tiny"))
    >>> 100_000 < params["total"] < 130_000
    True
"""

from __future__ import annotations

import copy
import os

from nanoseek.errors import NanoseekError

# the size fields that can make a model large, in the order a refusal prefers to name them
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "max_position_embeddings",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "moe_intermediate_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "num_nextn_predict_layers",
    "index_n_heads",
    "index_head_dim",
    "nsa_block",
    "o_lora_rank",
    "compress_rate_csa",
    "compress_rate_hca",
    "hc_mult",
)
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight, gradient and AdamW's two moments
FLOAT_BYTES = 4


# ------------------------------------------------------------------------------------ counting


def _attention_params(c, kind: str) -> int:
    d, h = c.hidden_size, c.num_attention_heads
    if c.attention == "mla":
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        q = d * c.q_lora_rank + c.q_lora_rank * h * qk if c.q_lora_rank else d * h * qk
        kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
        indexer = 0
        if kind == "dsa":
            indexer = (c.q_lora_rank or 0) * c.index_n_heads * c.index_head_dim + d * (
                c.index_head_dim + c.index_n_heads
            )
        return q + kv + h * c.v_head_dim * d + indexer
    hd = c.head_dim or c.hidden_size // max(c.num_attention_heads, 1)
    if c.attention == "v4":
        q = d * (c.q_lora_rank or 0) + (c.q_lora_rank or 0) * h * hd
        out = (h * hd // max(c.o_groups, 1)) * c.o_groups * c.o_lora_rank + c.o_groups * c.o_lora_rank * d
        compressor = 0
        if kind in ("csa", "hca"):
            rate = c.compress_rate_csa if kind == "csa" else c.compress_rate_hca
            width = 2 * hd if kind == "csa" else hd
            compressor = 2 * d * width + rate * width
        return q + d * hd + out + compressor
    kv_heads = 1 if c.attention == "mqa" else c.num_key_value_heads or h
    dense = d * h * hd + 2 * d * kv_heads * hd + h * hd * d
    if kind == "nsa":  # two more K/V pairs, and the block compressors
        dense += 4 * d * kv_heads * hd + 2 * c.nsa_block * hd * hd
    return dense


def _ffn_params(c, moe: bool) -> int:
    d = c.hidden_size
    if moe:
        return (c.n_routed_experts + c.n_shared_experts) * 3 * d * c.moe_intermediate_size + c.n_routed_experts * d
    return (3 if c.ffn in ("swiglu", "moe") else 2) * d * c.intermediate_size


def _layer_params(c, kind: str, moe: bool) -> int:
    streams = c.hc_mult if c.fusion in ("hyper", "mhc") else 1
    mixing = 2 * (2 + streams) * streams * streams * c.hidden_size if c.fusion == "mhc" else 0
    return _attention_params(c, kind) + _ffn_params(c, moe) + mixing


def _layer_counts(c) -> dict[tuple[str, bool], int]:
    """{(attention pattern, MoE?): how many layers}, counted without a loop over the layers."""
    pattern = c.sparse_layers or [c.sparse]
    n, period = c.num_hidden_layers, len(pattern)
    dense_prefix = min(c.first_k_dense_replace, n) if c.ffn == "moe" else n
    counts: dict[tuple[str, bool], int] = {}
    for offset, kind in enumerate(pattern):
        for moe, lo, hi in ((False, 0, dense_prefix), (True, dense_prefix, n)):
            first = lo + (offset - lo) % period  # the first layer i >= lo with i % period == offset
            if first < hi:
                counts[(kind, moe)] = counts.get((kind, moe), 0) + (hi - 1 - first) // period + 1
    return counts


def estimate_params(c) -> dict[str, int]:
    """{"embeddings", "layers", "mtp", "total"}: the parameters of config `c`, big terms only."""
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    if c.position == "learned":
        embeddings += c.max_position_embeddings * c.hidden_size
    layers = sum(count * _layer_params(c, kind, moe) for (kind, moe), count in _layer_counts(c).items())
    if getattr(c, "architecture", "decoder") == "encoder_decoder":
        encoder = c.num_hidden_layers if c.encoder_layers is None else c.encoder_layers
        layers += encoder * _layer_params(c, "dense", False) + c.num_hidden_layers * _attention_params(c, "dense")
    pattern = c.sparse_layers or [c.sparse]
    mtp_kind = pattern[c.num_hidden_layers % len(pattern)]
    mtp = c.num_nextn_predict_layers * (_layer_params(c, mtp_kind, c.ffn == "moe") + 2 * c.hidden_size**2)
    return {"embeddings": embeddings, "layers": layers, "mtp": mtp, "total": embeddings + layers + mtp}


def estimate_bytes(
    c,
    bytes_per_param: int = FLOAT_BYTES,
    batch_tokens: int = 0,
    kv_cache_tokens: int = 0,
    kv_bytes_per_token: int = 0,
) -> dict[str, int]:
    """{"weights", "tables", "activations", "kv_cache", "total"} in bytes (see the module docstring)."""
    weights = estimate_params(c)["total"] * bytes_per_param
    rope_dim = (
        c.qk_rope_head_dim
        if c.attention in ("mla", "v4")
        else (c.head_dim or c.hidden_size // max(c.num_attention_heads, 1))
    )
    tables = 0
    if c.position == "rope":  # cos and sin, (positions, rope_dim / 2) each, and the angles they come from
        tables = 4 * c.max_position_embeddings * (rope_dim // 2) * FLOAT_BYTES
    elif c.position == "sinusoidal":
        tables = c.max_position_embeddings * c.hidden_size * FLOAT_BYTES
    parts = {
        "weights": weights,
        "tables": tables,
        "activations": batch_tokens * c.hidden_size * FLOAT_BYTES,
        "kv_cache": kv_cache_tokens * kv_bytes_per_token,
    }
    return {**parts, "total": sum(parts.values())}


# ------------------------------------------------------------------------------------ the check


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable (Linux), else physical memory, at most
    the address-space limit (`ulimit -v`) when one is set. `NANOSEEK_MEMORY_LIMIT` (bytes) overrides."""
    if os.environ.get("NANOSEEK_MEMORY_LIMIT"):
        return int(float(os.environ["NANOSEEK_MEMORY_LIMIT"]))
    total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return 1 << 62  # unknown: do not refuse
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            total = min(total, soft)
    except (ImportError, OSError, ValueError):
        pass
    return total


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def largest_field(c, estimate) -> str:
    """The size field whose value makes `estimate(config)` largest: the one that, set back to its
    default, shrinks the estimate the most."""
    from nanoseek.config.model import ModelConfig

    default = ModelConfig.__dataclass_fields__
    full = estimate(c)
    best, best_ratio = SIZE_FIELDS[0], 0.0
    for name in SIZE_FIELDS:
        value, base = getattr(c, name), default[name].default
        if value is None or base is None or value <= base:
            continue
        smaller = copy.copy(c)
        object.__setattr__(smaller, name, base)
        try:
            ratio = full / max(estimate(smaller), 1)
        except (ZeroDivisionError, ValueError):
            continue
        if ratio > best_ratio:
            best, best_ratio = name, ratio
    return best


def check_memory(
    c,
    purpose: str,
    bytes_per_param: int = FLOAT_BYTES,
    batch_tokens: int = 0,
    kv_cache_tokens: int = 0,
    kv_bytes_per_token: int = 0,
    limit: int | None = None,
    where: str = "model.",
    flag: str | None = None,
) -> int:
    """Refuse (one line) a model whose estimated memory for `purpose` exceeds what is available;
    return the estimate. `flag` names a command-line flag to blame for batch or cache parts."""
    limit = available_memory() if limit is None else limit
    parts = estimate_bytes(c, bytes_per_param, batch_tokens, kv_cache_tokens, kv_bytes_per_token)
    if parts["total"] <= limit:
        return parts["total"]
    biggest = max(("weights", "tables", "activations", "kv_cache"), key=parts.__getitem__)
    if biggest in ("activations", "kv_cache") and flag:
        culprit = flag
    elif biggest == "tables":
        culprit = f"{where}max_position_embeddings={c.max_position_embeddings}"
    else:
        name = largest_field(c, lambda x: estimate_bytes(x, bytes_per_param)["total"])
        culprit = f"{where}{name}={getattr(c, name)}"
    raise NanoseekError(
        f"{culprit}: {purpose} needs about {human_bytes(parts['total'])} of memory "
        f"(weights {human_bytes(parts['weights'])}, position tables {human_bytes(parts['tables'])}"
        + (f", activations {human_bytes(parts['activations'])}" if parts["activations"] else "")
        + (f", KV cache {human_bytes(parts['kv_cache'])}" if parts["kv_cache"] else "")
        + f"), more than the {human_bytes(limit)} available; lower it"
    )
