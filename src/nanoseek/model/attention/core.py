"""Scaled dot-product attention: the causal, sliding-window and one-query forms every attention
module of the model runs through.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V          (M = causal mask: -inf above the diagonal)

Sliding-window attention (`window` = w) keeps only the last w keys of each query,
    M[t, s] = 0 if t - w < s <= t else -inf,
and never builds the T x T mask: queries go in chunks of C, each against its band of
C + w - 1 keys (batched SDPA over the chunks with one C x (C + w - 1) boolean mask), so time and
memory grow as T * (C + w).

A distance bias b(i - j) (ALiBi, T5; `bias`, see model/position.py) goes in as a float mask: the bias
with -inf where M hides the key. Within sliding-window chunks the distance of query r to band key j is
r - j + w - 1 in every chunk, so one (H, C, C + w - 1) bias serves them all.

A decode step (one query per row) skips the fused kernel: the H / H_kv query heads of each key
head become that head's queries, and two small matmuls with an explicit softmax read every cached
key once for all of them (`one_query_attention`).

The kernel is PyTorch's `scaled_dot_product_attention`, called through `sdpa`, which passes grouped
K/V heads as they are where the kernel that will run accepts them and expands them to H heads where
it does not (see there). bf16/fp16 on the CPU with at most EXPLICIT_MAX_KEYS keys runs the same
formula as two explicit matmuls instead (`explicit_attention`; the flash kernel's per-tile calls cost
more than the arithmetic there).

    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> causal_attention(q, k, v, 0, 8 ** -0.5).shape
    torch.Size([1, 2, 5, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.moe.experts import matmul_dtype

BAND_CHUNK = 256  # queries per chunk of the sliding window (one batched SDPA over all chunks);
# windows longer than 2 * BAND_CHUNK use chunks of window / 2, so the copied bands stay ~3x the keys


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start,
    scale: float | None = None,
    dropout: float = 0.0,
    window: int | None = None,
    keep: torch.Tensor | None = None,
    bias=None,
) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for queries at positions start..start+T-1.

    q (B, H, T, d), k (B, H_kv, S, d), v (B, H_kv, S, d_v) where S = start + T keys. `start` may
    also be a LongTensor (B,) of per-row positions for one query per row (T = 1): row b then sees
    keys 0..start[b] of the S cached positions. With `window`, a query sees only its last
    `window` keys (itself included). `keep` (B, T, S), a boolean mask that already includes
    causality (DSA's selected keys), replaces the causal mask. `bias`, a `DistanceBias` (distances ->
    (H, ...) float), adds b(i - j) to the logits.
    """
    if q.shape[-2] == 1:
        return one_query_attention(q, k, v, start, scale, window, keep, dropout, bias)
    if bias is not None:
        return biased_attention(q, k, v, start, scale, dropout, window, bias)
    d_v = v.shape[-1]
    if d_v != q.shape[-1]:  # the CPU flash kernel needs equal head dims; zero padding changes nothing
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        width = max(d_v, q.shape[-1])
        q, k, v = (F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x for x in (q, k, v))
        return causal_attention(q, k, v, start, scale, dropout, window, keep)[..., :d_v]
    t, s = q.shape[-2], k.shape[-2]
    if keep is not None:
        return sdpa(q, k, v, attn_mask=keep[:, None], scale=scale, dropout_p=dropout)
    if window is not None and window < s:
        return banded_attention(q, k, v, start, window, scale, dropout)
    if t == s:
        return sdpa(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)
    query_pos = torch.arange(start, start + t, device=q.device)[:, None]
    mask = torch.arange(s, device=q.device)[None, :] <= query_pos
    return sdpa(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout)


def biased_attention(q, k, v, start: int, scale, dropout: float, window: int | None, bias) -> torch.Tensor:
    """Causal (or sliding-window) attention with the distance bias b(i - j) in SDPA's float mask."""
    t, s = q.shape[-2], k.shape[-2]
    if window is not None and window < s:
        return banded_attention(q, k, v, start, window, scale, dropout, bias)
    distance = torch.arange(start, start + t, device=q.device)[:, None] - torch.arange(s, device=q.device)
    hidden = (distance < 0) if window is None else (distance < 0) | (distance >= window)
    mask = bias(distance).to(q.dtype).masked_fill(hidden, float("-inf"))  # (H, T, S)
    return sdpa(q, k, v, attn_mask=mask[None], scale=scale, dropout_p=dropout)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for q (B, H, T, d) against k, v with H_kv heads, H_kv dividing H.

    Grouped heads go in as `enable_gqa` (no copy) wherever the fused kernel that will run takes them:
    the CPU's flash kernel, CUDA's flash kernel (fp16/bf16, no mask). On CUDA with a mask or in
    fp32 only the memory-efficient kernel can run, and torch 2.11's takes no grouped heads: SDPA
    then falls back to its math path, which holds the B x H x T x S weights (tens of GB at 16K
    tokens). There K and V are expanded to H heads
    first: H / H_kv times their size, never T x S."""
    if explicit_attention_pays(q, k, dropout_p):
        return explicit_attention(q, k, v, attn_mask, is_causal, scale)
    gqa = q.shape[1] != k.shape[1]
    if gqa and expands_kv_heads(q, attn_mask):
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        gqa = False
    if gqa and folds_grouped_heads(q, attn_mask, is_causal):
        return folded_sdpa(q, k, v, attn_mask, scale, dropout_p)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
    )


EXPLICIT_MAX_KEYS = 128  # bf16/fp16 on the CPU: at most this many keys run as explicit matmuls


def explicit_attention_pays(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Whether `sdpa` runs `explicit_attention`: bf16/fp16 on the CPU, up to EXPLICIT_MAX_KEYS keys,
    no dropout. There the CPU's flash kernel calls oneDNN once per 32 x 64 tile (its backward ~2,300
    times a step at 12 x 8 heads x 64 tokens) and pays more in calls than in arithmetic: on a Zen 4
    (AVX-512-bf16) at (12, 8, 64, 48) forward + backward takes 8.7 ms, the explicit form 3.6 ms;
    at 256 keys the flash kernel is ahead."""
    return (
        q.device.type == "cpu"
        and compute_dtype(q) in (torch.bfloat16, torch.float16)
        and k.shape[-2] <= EXPLICIT_MAX_KEYS
        and dropout_p == 0.0
    )


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in at q: `matmul_dtype` for fp32 q (autocast's where it is on), else
    q's own (autocast leaves fp64 alone)."""
    return matmul_dtype(q) if q.dtype == torch.float32 else q.dtype


def explicit_attention(q, k, v, attn_mask=None, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v as two batched matmuls: the logits and the softmax in fp32
    (as the flash kernels keep them; bf16 logits would round to ~3 significant digits), the
    weights times v in the compute dtype (autocast's, else q's). Grouped heads fold into rows: the R = H / H_kv
    query heads of a key head multiply its keys once, (B, H_kv, R T, d) x (B, H_kv, d, S). A bool
    mask keeps True; a float mask adds; is_causal keeps s <= t. A row whose keys are all hidden gives
    zeros, as SDPA does."""
    b, h, t, d = q.shape
    g, s = k.shape[1], k.shape[-2]
    if h % g or (is_causal and attn_mask is not None):
        raise ValueError(f"explicit_attention: {h} query heads over {g} key heads, or a mask with is_causal")
    scale = d**-0.5 if scale is None else scale
    dtype = compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the fp32 logits in bf16
        logits = ATTENTION_LOGITS(q.reshape(b, g, -1, d), k).mul_(scale).view(b, h, t, s)
        if is_causal:
            logits = logits.masked_fill(torch.ones(t, s, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        elif attn_mask is not None and attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            logits = logits + attn_mask.float()
        blind = None
        if attn_mask is not None:  # a row with every key hidden: zeros, as SDPA gives (softmax: NaN)
            blind = logits.amax(-1, keepdim=True) == float("-inf")
            logits = logits.masked_fill(blind, 0.0)
        weights = torch.softmax(logits, dim=-1)
        weights = (weights if blind is None else weights.masked_fill(blind, 0.0)).to(dtype)
        return torch.matmul(weights.view(b, g, -1, s), v.to(dtype)).view(b, h, t, -1)


class AttentionLogits(nn.Module):
    """q k^T in fp32 for `explicit_attention`: q, k (bf16/fp16 values) widened to fp32 first, so the
    products are exact and summed in fp32, as a half-precision GEMM with an fp32 output would give
    (the CPU has no such op; at these sizes the fp32 product is no slower). A module only so that
    dtype accounting (analysis/dtype_flops.py) can name these products as fp32 on purpose."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q.float(), k.float().transpose(-1, -2))


ATTENTION_LOGITS = AttentionLogits()


FOLD_GROUPED_HEADS = True


def folds_grouped_heads(q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
    """Whether `sdpa` folds grouped heads into rows: on the CPU, with a mask shared by all heads or
    given per head (is_causal has no mask to repeat)."""
    if not FOLD_GROUPED_HEADS or attn_mask is None or is_causal or q.device.type != "cpu":
        return False
    return attn_mask.dim() < 3 or attn_mask.shape[-3] in (1, q.shape[1])


def folded_sdpa(q, k, v, attn_mask, scale, dropout_p: float) -> torch.Tensor:
    """`sdpa` with a mask on the CPU, grouped heads folded into rows: the R = H / H_kv query heads
    sharing a key head become R T rows of one head, (B, H_kv, R T, d), with the mask repeated for
    each (a view where it has all H heads). Same output; the CPU's flash kernel then reads each key
    tile once for R times the rows (at width 512 and 8 heads on one key head, ~6-9% faster)."""
    b, h, t, d = q.shape
    g = k.shape[1]
    r = h // g
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + attn_mask.shape)  # SDPA's broadcasting
    mask = mask.expand(mask.shape[0], h, t, mask.shape[-1]).reshape(mask.shape[0], g, r * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(
        q.reshape(b, g, r * t, d), k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p
    )
    return out.view(b, h, t, -1)


def expands_kv_heads(q: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """Whether `sdpa` expands grouped K/V heads: on CUDA, unless its flash kernel can run."""
    return q.device.type == "cuda" and (attn_mask is not None or q.dtype not in (torch.float16, torch.bfloat16))


def one_query_attention(
    q,
    k,
    v,
    start,
    scale,
    window: int | None = None,
    keep: torch.Tensor | None = None,
    dropout: float = 0.0,
    bias=None,
) -> torch.Tensor:
    """One query per row (decoding): two small matmuls instead of a fused kernel.

    The G = H / H_kv query heads of a key head become G queries of that head, so a single key
    head (MQA, MLA's absorbed latent) is read once for all heads: scores (B, H_kv, G, S)."""
    b, h, _, d = q.shape
    h_kv, s = k.shape[1], k.shape[-2]
    scale = scale if scale is not None else d**-0.5
    q_BKGD = q.reshape(b, h_kv, h // h_kv, d)
    scores_BKGS = torch.matmul(q_BKGD, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores_BKGS = scores_BKGS + one_query_bias(bias, start, s, q.device).view(-1, h_kv, h // h_kv, s)
    mask = one_query_mask(start, s, window, keep, q.device)
    if mask is not None:
        scores_BKGS = scores_BKGS.masked_fill(~mask, float("-inf"))
    probs_BKGS = torch.softmax(scores_BKGS, dim=-1).to(v.dtype)
    if dropout:
        probs_BKGS = F.dropout(probs_BKGS, dropout)
    return torch.matmul(probs_BKGS, v).reshape(b, h, 1, v.shape[-1])


def one_query_bias(bias, start, s: int, device) -> torch.Tensor:
    """The distance bias of one query per row at `start` (int, or per row (B,)) against S keys: (B|1, H, S)."""
    key_pos = torch.arange(s, device=device)
    if isinstance(start, torch.Tensor):
        return bias(start[:, None] - key_pos).transpose(0, 1).float()
    return bias(start - key_pos)[None].float()


def one_query_mask(start, s: int, window: int | None, keep: torch.Tensor | None, device):
    """The keys one query per row may see, broadcastable to (B, H_kv, G, S); None = all of them."""
    if keep is not None:  # (B, 1, S), causality included
        return keep[:, None]
    key_pos = torch.arange(s, device=device)
    if isinstance(start, torch.Tensor):  # per-row positions against a longer cache
        mask = key_pos[None, :] <= start[:, None]
        if window is not None:
            mask &= key_pos[None, :] > start[:, None] - window
        return mask[:, None, None]
    if window is None or window >= s:
        return None
    return key_pos > start - window


def banded_attention(q, k, v, start: int, window: int, scale, dropout: float, bias=None) -> torch.Tensor:
    """Sliding-window causal attention as batched SDPA: the queries in chunks of C, each chunk
    against its band of the C + w - 1 keys it can see, all chunks side by side in the batch.

    Query r of a chunk sees band key j iff r <= j <= r + w - 1: one (C, C + w - 1) mask shared by
    every chunk, except the first few, whose bands reach before position 0 (they get their own
    mask, in a second SDPA call). The bands are windows of the keys padded by w - 1 rows in front
    (`unfold`, one copy): no per-chunk slices, whose backward would each zero-fill a gradient of
    the whole sequence (at 16K that was half of NSA's backward).

    From position 0, the first w queries see every earlier key: they run as one causal SDPA (whose
    kernel skips the blocks above the diagonal) and only the rest as bands; at T = 2w that is 1.0x
    instead of 1.5x the work of causal attention over all T."""
    b, h, t, d = q.shape
    if start == 0 and window < t:
        q_head, k_head, v_head = q[:, :, :window], k[:, :, :window], v[:, :, :window]
        if bias is None:
            head = sdpa(q_head, k_head, v_head, is_causal=True, scale=scale, dropout_p=dropout)
        else:
            head = biased_attention(q_head, k_head, v_head, 0, scale, dropout, None, bias)
        rest = banded_attention(q[:, :, window:], k, v, window, window, scale, dropout, bias)
        return torch.cat([head, rest], dim=2)
    c = min(max(BAND_CHUNK, window // 2), t)  # bands hold at most ~3x the keys, and ~1.5x the work
    nb, span = -(-t // c), c + window - 1
    q_chunks = F.pad(q, (0, 0, 0, nb * c - t)).view(b, h, nb, c, d).transpose(1, 2)  # (B, nb, H, C, d)
    k_bands, v_bands = (band_windows(x[..., : start + t, :], start, window, nb, c) for x in (k, v))
    j = torch.arange(span, device=q.device)
    r = torch.arange(c, device=q.device)[:, None]
    band = (j >= r) & (j <= r + window - 1)  # (C, span)
    band_bias = None if bias is None else bias(r - j + window - 1).to(q.dtype).masked_fill(~band, float("-inf"))
    early = min(nb, max(0, -(-(window - 1 - start) // c)))  # chunks whose band starts before position 0
    outs = []
    for lo, hi in ((0, early), (early, nb)):
        if hi == lo:
            continue
        if hi == early:  # key positions start + iC - w + 1 + j must be >= 0
            key_pos = start + torch.arange(hi, device=q.device)[:, None] * c - window + 1 + j
            mask = (band & (key_pos[:, None, :] >= 0)).repeat(b, 1, 1)[:, None]
            if band_bias is not None:  # (B * early, H, C, span)
                mask = band_bias.masked_fill(~mask, float("-inf"))
        else:
            mask = band if band_bias is None else band_bias
        q_f, k_f, v_f = (x[:, lo:hi].reshape(b * (hi - lo), *x.shape[2:]) for x in (q_chunks, k_bands, v_bands))
        o = sdpa(q_f, k_f, v_f, attn_mask=mask, scale=scale, dropout_p=dropout)
        outs.append(o.view(b, hi - lo, h, c, -1))
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).reshape(b, h, nb * c, -1)[:, :, :t]


def band_windows(x: torch.Tensor, start: int, window: int, nb: int, c: int) -> torch.Tensor:
    """(B, nb, H_kv, C + w - 1, d): chunk i's keys at positions start + iC - w + 1 ... start + iC + C - 1
    (zeros before position 0 and past the last key; the mask hides them)."""
    s = x.shape[2]
    padded = F.pad(x, (0, 0, window - 1, start + nb * c - s))  # index = position + w - 1
    windows = padded[:, :, start:].unfold(2, c + window - 1, c)  # (B, H_kv, nb, d, C + w - 1)
    return windows.permute(0, 2, 1, 4, 3)


def allowed_keys(t: int, window: int | None, device=None) -> torch.Tensor:
    """(T, T) boolean: causal, and within the window when there is one."""
    pos = torch.arange(t, device=device)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale (+ bias (H, T, S))) over the allowed keys, (B, H, T, S), for pictures and tests."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


def layer_window(config: ModelConfig, layer: int) -> int | None:
    """The sliding window of this layer, or None for full causal attention."""
    return config.sliding_window if config.layer_sparse(layer) == "sliding" else None
