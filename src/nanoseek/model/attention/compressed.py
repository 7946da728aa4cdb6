"""DeepSeek-V4 attention: one shared key/value head with per-head sinks, over a sliding window of
recent tokens plus compressed entries of the whole past (CSA: rate m = 4, the entries a lightning
indexer picks; HCA: rate m' = 128, every closed window).

Per token t (H heads of width D_h; RoPE on the trailing R channels, pairs interleaved; W = window):
    c_Q = RMSNorm(W_QA x_t),   q_{t,h} = RMSNorm_unweighted((W_QB c_Q)_h),   q_{t,h} = RoPE(q_{t,h}, t)
    kv_t = RoPE(RMSNorm(W_KV x_t), t)                     (a single head: keys and values are the same)
Compressor over windows of m tokens (window w = positions wm .. wm+m-1), C = W_C x, Z = W_Z x, B = a
learned (m, .) position bias:
    HCA:  e_w = RMSNorm(sum_j softmax_j(Z_j + B_j) * C_j)      (softmax over the m slots, per channel)
    CSA:  C, Z have two halves a | b; e_w pools 2m slots: the a-half of window w-1 and the b-half of
          window w (window 0 has no a-slots)
    e_w = RoPE(e_w, wm);   query t sees e_w iff w < (t + 1) // m   (the window has closed)
CSA indexer: its own compressor (width d_I) gives e^I_w; q^I_{t,h} = RoPE((W_IQ c_Q)_h, t) and
    I_{t,w} = sum_h w_{t,h} ReLU(q^I_{t,h} . e^I_w) / sqrt(d_I),   w_t = W_w x_t / sqrt(H_I);
    the query attends the index_topk visible entries with the highest I (ties: the earliest entry).
Attention over K_t = [kv_s : t - W < s <= t] ++ [the visible / selected e_w], with a sink logit s_h:
    p = softmax([q_{t,h} . K_t / sqrt(D_h) ; s_h]) without its last column,   o_{t,h} = p K_t,
    o_{t,h} = RoPE(o_{t,h}, -t)   (the values carried their keys' rotation; this leaves relative angles),
    out = W_OB concat_g(W_OA,g [o_{t,h} : h in group g])     (block-diagonal grouped output projection)
A `sliding` layer has no compressor, a `dense` one attends every earlier token (no window). CSA and
HCA layers use the `compress` rotary table (compress_rope_theta, YaRN from rope_scaling, cos/sin not
rescaled), the others the plain one (rope_theta).

The indexer's top-k is not differentiable; in training it learns from a KL loss toward the heads'
attention over the entries it picked (the `index_loss` a training forward returns, as DSA in
attention/dsa.py; `train.dsa_warmup_steps` runs CSA layers over every visible entry while only the indexers learn).

Queries run in chunks of CHUNK through SDPA (the sink enters as one extra key): each chunk reads only
its band of local keys plus the entries (CSA: a mask of the indexer's picks), so no T x T tensor
exists and backward keeps no attention weights; a decode step gathers its window of keys per row.
Weight names follow Hugging Face (`q_a_proj`, `q_a_norm`, `q_b_proj`, `kv_proj`, `kv_norm`,
`o_a_proj`, `o_b_proj`, `sinks`, `compressor.{kv_proj,gate_proj,position_bias,kv_norm}`,
`compressor.indexer.{..., q_b_proj, scorer.weights_proj}`).

    >>> cfg = ModelConfig.from_preset("deepseek-v4-tiny")
    >>> CompressedAttention(cfg, 0)(torch.randn(1, 9, cfg.hidden_size)).shape
    torch.Size([1, 9, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention.core import sdpa
from nanoseek.model.attention.dsa import earliest_topk, indexer_kl
from nanoseek.model.kv_cache import CompressedKVCache
from nanoseek.model.norm import RMSNorm
from nanoseek.model.position import rope_inv_freq
from nanoseek.model.side_outputs import SideOutputs

CHUNK = 256  # queries per step in prefill and training


def rotate_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the trailing 2 * cos.shape[-1] channels of x, pairs (2i, 2i+1), layout kept."""
    r = 2 * cos.shape[-1]
    head, tail = x[..., :-r], x[..., -r:]
    a, b = tail[..., 0::2].float(), tail[..., 1::2].float()
    rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    return torch.cat([head, rotated.to(x.dtype)], dim=-1)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm over the last dim."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def gather_rows(x_BSX: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, ...]]: index (B, ...) per row, or (1, ...) shared by every row."""
    index = index.expand(x_BSX.shape[0], *index.shape[1:])
    rows = torch.arange(x_BSX.shape[0], device=x_BSX.device).view(-1, *([1] * (index.dim() - 1)))
    return x_BSX[rows, index]


class RopeTable(nn.Module):
    """cos/sin of the rotary angles at any positions (computed, not tabled: V4 contexts reach 1M)."""

    def __init__(self, dim: int, theta: float, scaling: dict | None = None, max_positions: int | None = None):
        super().__init__()
        self.args = (dim, theta, scaling, max_positions)
        self.register_buffer("inv_freq", rope_inv_freq(dim, theta, scaling, max_positions), persistent=False)

    def fresh(self) -> RopeTable:
        """A copy with real buffers (a model built on the meta device rebuilds them from this)."""
        return RopeTable(*self.args)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = pos[..., None].float() * self.inv_freq
        return angles.cos(), angles.sin()


class Compressor(nn.Module):
    """Pools each window of `rate` tokens into one entry; `overlap` = CSA's two series (2m slots)."""

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, eps)

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.zeros_(self.position_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv_proj(x), self.gate_proj(x)

    def pool(self, raw_kv: torch.Tensor, raw_gate: torch.Tensor, windows, offset, rope) -> torch.Tensor:
        """Entries (B, n, dim) of `windows` from per-token projections (B, S, width) whose index i is
        position i + offset, rotated at each window's first position. `windows`: a range (consecutive
        windows: their rows are read as views of the projections) or a tensor (n,) or (B, n) (gathered,
        as a decode step's). Each window's slots pool as one piece over the full width
        (`softmax_partial`); CSA's entry w then merges window w's b-half with window w - 1's a-half
        (`merge_partials`), so the slots are never copied, only (B, n, width) pieces shifted by one
        window."""
        m, d = self.rate, self.dim
        starts = window_starts(windows, raw_kv.device)
        if isinstance(windows, range):  # for CSA from one window earlier
            lo = max(windows.start - self.overlap, 0)
            rows = [window_span(raw, lo, windows.stop, m) for raw in (raw_kv, raw_gate)]
            pieces = softmax_partial(*rows, self.position_bias)
            now = [x[:, windows.start - lo :] for x in pieces]
            before = [x[:, : max(windows.stop - 1 - lo, 0)] for x in pieces]  # windows start - 1 .. stop - 2
        else:
            windows = windows if windows.dim() == 2 else windows[None]
            now = softmax_partial(*(window_gather(raw, windows, m) for raw in (raw_kv, raw_gate)), self.position_bias)
            if self.overlap:
                earlier = (windows - 1).clamp(min=0)
                before = softmax_partial(
                    *(window_gather(raw, earlier, m) for raw in (raw_kv, raw_gate)), self.position_bias
                )
        if self.overlap:
            now = merge_partials([x[..., d:] for x in now], [x[..., :d] for x in before], starts > 0)
        _, total, weighted = now
        entries = self.kv_norm((weighted / total).to(raw_kv.dtype))
        cos, sin = rope(starts * m + offset)
        return rotate_tail(entries, cos, sin)


def window_starts(windows, device) -> torch.Tensor:
    """The windows' indices as a tensor: (n,) for a range, else as given ((n,) or (B, n))."""
    return torch.arange(windows.start, windows.stop, device=device) if isinstance(windows, range) else windows


def window_span(raw: torch.Tensor, lo: int, hi: int, m: int) -> torch.Tensor:
    """raw's rows of windows lo .. hi - 1 as a view (B, hi - lo, m, width); sliced only when they are not
    all of raw (a slice's backward zero-fills a gradient as large as raw)."""
    rows = raw if (lo, hi * m) == (0, raw.shape[1]) else raw[:, lo * m : hi * m]
    return rows.unflatten(1, (hi - lo, m))


def window_gather(raw: torch.Tensor, windows: torch.Tensor, m: int) -> torch.Tensor:
    """raw's rows (B, n, m, width) of windows (B or 1, n)."""
    return gather_rows(raw, windows[..., None] * m + torch.arange(m, device=windows.device))


def softmax_partial(kv: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor):
    """One piece of a softmax pooled over slots: with z = gate + bias (fp32 or wider) over the m slots
    (dim 2) of kv and gate (B, n, m, X), the (B, n, X) tensors
        top = max z,   total = sum exp(z - top),   weighted = sum exp(z - top) kv.
    top is a shift the softmax does not depend on: no gradient flows through it."""
    z = gate.to(torch.promote_types(gate.dtype, torch.float32)) + bias
    top = z.detach().amax(2)
    e = z.sub_(top[:, :, None]).exp_()  # in place: a fresh tensor of the slots' size costs its page faults
    return top, e.sum(2), (e * kv).sum(2)


def merge_partials(later, earlier, present: torch.Tensor):
    """The softmax over two pieces' slots: entry w pools `later`'s window w and, where `present` ((n,) or
    (B, n)) holds, `earlier`'s (window w - 1's; fewer than n of them for a range from window 0, the
    first missing). With t = max(top_l, top_e) each piece's total and weighted sum are scaled by
    exp(top - t) and added."""
    n = later[0].shape[1]
    earlier = [F.pad(x, (0, 0, n - x.shape[1], 0)) for x in earlier]
    top_e = earlier[0].masked_fill(~present[..., None], float("-inf"))
    top = torch.maximum(later[0], top_e)
    a, b = torch.exp(later[0] - top), torch.exp(top_e - top)
    return top, later[1] * a + earlier[1] * b, later[2] * a + earlier[2] * b


class IndexScorer(nn.Module):
    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.weights_proj = nn.Linear(hidden, n_heads, bias=False)


class Indexer(Compressor):
    """CSA's lightning indexer: a compressor at width d_I plus query heads and per-head weights."""

    def __init__(self, config: ModelConfig, rate: int):
        super().__init__(config.hidden_size, config.index_head_dim, rate, True, config.rms_norm_eps)
        self.n_heads, self.topk = config.index_n_heads, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * self.dim, bias=False)
        self.scorer = IndexScorer(config.hidden_size, self.n_heads)

    def scores(self, x_BCD, q_latent_BCQ, cos, sin, entries_BWI) -> torch.Tensor:
        """I (B, C, W) in fp32 (under autocast in its dtype: the products run under it)."""
        b, c, _ = x_BCD.shape
        q_BXI, w_BC1H = self.queries(x_BCD, q_latent_BCQ, cos, sin)
        dots_BCHW = (q_BXI @ entries_BWI.float().transpose(1, 2)).view(b, c, self.n_heads, -1)
        return (w_BC1H @ F.relu(dots_BCHW))[:, :, 0]

    def queries(self, x_BCD, q_latent_BCQ, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """(q^I rotated, as (B, C H, d_I) rows, and the head weights w / sqrt(H_I d_I) as (B, C, 1, H)), fp32."""
        b, c, _ = x_BCD.shape
        q_BCHI = rotate_tail(
            self.q_b_proj(q_latent_BCQ).view(b, c, self.n_heads, self.dim), cos.unsqueeze(-2), sin.unsqueeze(-2)
        )
        w_BC1H = self.scorer.weights_proj(x_BCD).float()[:, :, None] * (self.n_heads * self.dim) ** -0.5
        return q_BCHI.float().reshape(b, c * self.n_heads, self.dim), w_BC1H


def sink_probs(q_BCHX, parts, sinks_H, scale: float) -> list[torch.Tensor]:
    """The attention weights of each part, (B, C, H, S), under a softmax over every part's keys plus a
    per-head sink logit: the explicit form, for attention maps and the indexer's KL target (the
    forward pass runs `sink_sdpa`). parts: (keys (B, S, X) shared by the chunk's queries, mask
    (B or 1, C, S))."""
    b, c, h, _ = q_BCHX.shape
    logits = [
        torch.einsum("bchx,bsx->bchs", q_BCHX, keys).float().mul(scale).masked_fill(~mask.unsqueeze(-2), float("-inf"))
        for keys, mask in parts
    ]
    sink = sinks_H.float().view(1, 1, h, 1).expand(b, c, h, 1)
    probs = torch.cat(logits + [sink], dim=-1).softmax(-1).to(q_BCHX.dtype)
    return list(probs.split([lg.shape[-1] for lg in logits] + [1], dim=-1)[:-1])


def sink_sdpa(q_BCHX, parts, sinks_H, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention under `sink_probs`' weights, through SDPA (keys shared by the chunk's queries): the sink is one
    more key, [0 .. 0, 1], met by a query channel holding s_h / scale, with a zero value; so
    logit_sink = s_h exactly, and nothing T x S is kept for backward."""
    b, c, h, x = q_BCHX.shape
    keys = torch.cat([k for k, _ in parts], dim=1)  # (B, S, X)
    mask = torch.cat([m.expand(b, c, -1) for _, m in parts] + [keys.new_ones(b, c, 1, dtype=torch.bool)], -1)
    sink_q = (sinks_H.to(q_BCHX.dtype) / scale).view(1, 1, h, 1).expand(b, c, h, 1)
    q = torch.cat([q_BCHX, sink_q], -1).transpose(1, 2)  # (B, H, C, X + 1)
    k = F.pad(F.pad(keys, (0, 1)), (0, 0, 0, 1))
    k[:, -1, -1] = 1.0
    v = F.pad(keys, (0, 1, 0, 1))  # q, k and v of one width: SDPA's fused kernel, not its math path
    out = sdpa(q, k[:, None], v[:, None], attn_mask=mask[:, None], dropout_p=dropout, scale=scale)
    return out[..., :x].transpose(1, 2)


class CompressedAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.kind = config.layer_sparse(layer)  # dense | sliding | csa | hca
        self.n_heads, self.head_dim, self.eps = h, config.attn_head_dim, config.rms_norm_eps
        self.window = None if self.kind == "dense" else config.sliding_window
        self.groups, self.dropout = config.o_groups, config.attention_dropout
        self.scale = self.head_dim**-0.5
        compressed = self.kind in ("csa", "hca")
        self.rope = (
            RopeTable(
                config.qk_rope_head_dim,
                config.compress_rope_theta,
                config.rope_scaling,
                config.max_position_embeddings,
            )
            if compressed
            else RopeTable(config.qk_rope_head_dim, config.rope_theta)
        )
        self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, h * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(d, self.head_dim, bias=False)
        self.kv_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_a_proj = nn.Linear(h * self.head_dim // self.groups, self.groups * config.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(self.groups * config.o_lora_rank, d, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        self.compressor = None
        if compressed:
            rate = config.compress_rate_csa if self.kind == "csa" else config.compress_rate_hca
            self.compressor = Compressor(d, self.head_dim, rate, self.kind == "csa", config.rms_norm_eps)
            self.compressor.indexer = Indexer(config, rate) if self.kind == "csa" else None
        self.indexed = self.kind == "csa"  # has a lightning indexer (Transformer.dsa_layers)
        self.dsa_warmup = False  # a training phase (Transformer.set_dsa_warmup): every visible entry attended

    @property
    def indexer(self) -> Indexer | None:
        return self.compressor.indexer if self.compressor is not None else None

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.zeros_(self.sinks)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> CompressedKVCache:
        widths = {"kv": (max_len, self.head_dim)}
        if self.compressor is not None:
            c = self.compressor
            n_windows = max(max_len // c.rate, 1)
            widths |= {
                "raw_kv": (max_len, c.kv_proj.out_features),
                "raw_gate": (max_len, c.kv_proj.out_features),
                "entries": (n_windows, self.head_dim),
            }
            if self.indexer is not None:
                i = self.indexer
                widths |= {
                    "index_raw_kv": (max_len, 2 * i.dim),
                    "index_raw_gate": (max_len, 2 * i.dim),
                    "index_entries": (n_windows, i.dim),
                }
        return CompressedKVCache.allocate(batch, max_len, widths, dtype, device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        rope=None,
        cache: CompressedKVCache | None = None,
        start=0,
        side: SideOutputs | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) at positions start.. (or per-row positions, a LongTensor (B,), for one token).
        A CSA layer given `side` (training) appends its indexer's loss there."""
        b, t, _ = x.shape
        pos = (start[:, None] if isinstance(start, torch.Tensor) else start) + torch.arange(t, device=x.device)
        cos, sin = self.rope(pos)
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = unit_rms(self.q_b_proj(q_latent).view(b, t, self.n_heads, self.head_dim), self.eps)
        q = rotate_tail(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        kv = rotate_tail(self.kv_norm(self.kv_proj(x)), cos, sin)
        keys, offset = (kv, start) if cache is None else (self.cached_keys(cache, start, kv), 0)
        entries, index_entries = self.compressed_entries(x, cache, start, t)
        index_in = (x.detach(), q_latent.detach()) if self.indexer is not None else None
        o = self.attend(q, keys, start, offset, pos, entries, index_entries, index_in, cos, sin, side)
        o = rotate_tail(o, cos.unsqueeze(-2), -sin.unsqueeze(-2))
        return self.project_out(o)

    def attend(
        self, q, keys, start, offset, pos, entries, index_entries, index_in, cos, sin, side: SideOutputs | None = None
    ) -> torch.Tensor:
        """o (B, T, H, D_h) over the local keys and the entries, CHUNK queries at a time; given `side`
        also the indexer's loss (CSA), appended there."""
        t = q.shape[1]
        outs, losses = [], []
        # split, not sliced per chunk: a slice's backward zero-fills a gradient of all of q each time
        # (at 8K tokens that was 60% of HCA's backward)
        for c0, q_chunk in zip(range(0, t, CHUNK), q.split(CHUNK, dim=1)):
            c1 = min(t, c0 + CHUNK)
            parts, index_scores = self.key_parts(
                keys,
                start,
                offset,
                pos[..., c0:c1],
                entries,
                index_entries,
                index_in,
                (cos[..., c0:c1, :], sin[..., c0:c1, :]),
                c0,
                c1,
            )
            outs.append(sink_sdpa(q_chunk, parts, self.sinks, self.scale, self.dropout if self.training else 0.0))
            if index_scores is not None and side is not None:  # KL target: the heads' weights on its picks
                with torch.no_grad():
                    probs = sink_probs(q_chunk, parts, self.sinks, self.scale)
                losses.append(indexer_kl(probs[-1].transpose(1, 2), index_scores, parts[-1][1]) * (c1 - c0))
        if losses:
            side.index_losses.append(torch.stack(losses).sum() / t)
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B, H, T, T + W), allowed (B, T, T + W)): the token keys, then the W compressed
        entries (the window, plus every closed entry for HCA or the indexer's picks for CSA)."""
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device)
        cos, sin = self.rope(pos)
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = rotate_tail(
            unit_rms(self.q_b_proj(q_latent).view(b, t, self.n_heads, self.head_dim), self.eps),
            cos.unsqueeze(-2),
            sin.unsqueeze(-2),
        )
        kv = rotate_tail(self.kv_norm(self.kv_proj(x)), cos, sin)
        entries, index_entries = self.compressed_entries(x, None, 0, t)
        index_in = (x, q_latent) if self.indexer is not None else None
        parts, _ = self.key_parts(kv, 0, 0, pos, entries, index_entries, index_in, (cos, sin), 0, t)
        probs = sink_probs(q, parts, self.sinks, self.scale)
        allowed = torch.cat([mask.expand(b, t, -1) for _, mask in parts], -1)
        return torch.cat(probs, -1).transpose(1, 2), allowed

    def project_out(self, o_BTHX: torch.Tensor) -> torch.Tensor:
        b, t = o_BTHX.shape[:2]
        grouped = o_BTHX.reshape(b, t, self.groups, -1)
        w_GOI = self.o_a_proj.weight.view(self.groups, -1, grouped.shape[-1])
        return self.o_b_proj(torch.einsum("btgi,goi->btgo", grouped, w_GOI).flatten(2))

    def cached_keys(self, cache: CompressedKVCache, start, kv: torch.Tensor) -> torch.Tensor:
        end = cache.write("kv", start, kv)
        return cache["kv"][:, :end]

    def compressed_entries(self, x, cache, start, t: int):
        """Every entry the queries may read: (B, W, D_h) and, for CSA, the indexer's (B, W, d_I)."""
        if self.compressor is None:
            return None, None
        modules = [(self.compressor, "")] + ([(self.indexer, "index_")] if self.indexer is not None else [])
        found = []
        for module, prefix in modules:
            raw_kv, raw_gate = module.project(x if prefix == "" else x.detach())
            m = module.rate
            if cache is None:
                found.append(module.pool(raw_kv, raw_gate, range(t // m), start, self.rope))
                continue
            cache.write(prefix + "raw_kv", start, raw_kv)
            end = cache.write(prefix + "raw_gate", start, raw_gate)
            buffer = cache[prefix + "entries"]
            if isinstance(start, torch.Tensor) and cache[prefix + "raw_kv"].shape[1] < m:
                found.append(buffer)  # a cache shorter than one window: nothing ever closes
                continue
            if isinstance(start, torch.Tensor):  # one token per row: re-pool each row's last closed window
                windows = ((start + 1) // m - 1).clamp(min=0)[:, None]
                new = module.pool(cache[prefix + "raw_kv"], cache[prefix + "raw_gate"], windows, 0, self.rope)
                buffer[torch.arange(x.shape[0], device=x.device), windows[:, 0]] = new[:, 0].to(buffer.dtype)
                found.append(buffer)
                continue
            windows = range(start // m, end // m)
            if len(windows):
                new = module.pool(
                    cache[prefix + "raw_kv"][:, :end], cache[prefix + "raw_gate"][:, :end], windows, 0, self.rope
                )
                buffer[:, start // m : end // m] = new.to(buffer.dtype)
            found.append(buffer[:, : end // m])
        return found[0], (found[1] if len(found) > 1 else None)

    def key_parts(self, keys, start, offset, pos_q, entries, index_entries, index_in, rope_q, c0: int, c1: int):
        """[(local keys, mask), (entries, mask)] for queries c0..c1-1 at positions pos_q ((C,) or (B, 1)),
        keys shared by the chunk's queries, masks (B or 1, C, S); for CSA the entries' mask holds the
        indexer's picks and its scores (B, C, W) come back too (for the KL loss), else None."""
        rel = pos_q - offset  # query positions as indices into keys
        b = keys.shape[0]
        if isinstance(start, torch.Tensor):  # one token per row
            if self.window is not None:  # gather each row's window
                index = rel - self.window + 1 + torch.arange(self.window, device=keys.device)  # (B, W)
                parts = [(gather_rows(keys, index.clamp(min=0)), (index >= 0)[:, None, :])]
            else:
                key_idx = torch.arange(keys.shape[1], device=keys.device)
                parts = [(keys, key_idx <= rel[..., None])]
        else:
            first, last = start + c0 - offset, start + c1 - 1 - offset
            lo = 0 if self.window is None else max(0, first - self.window + 1)
            key_idx = torch.arange(lo, last + 1, device=keys.device)
            mask = key_idx <= rel[..., None]
            if self.window is not None:
                mask = mask & (key_idx > rel[..., None] - self.window)
            parts = [(keys[:, lo : last + 1], mask[None])]
        if entries is None or entries.shape[1] == 0:
            return parts, None
        m = self.compressor.rate
        if not isinstance(start, torch.Tensor):  # entries closed after this chunk's last query are never read
            closed = (start + c1 - offset) // m
            entries = entries[:, :closed]
            index_entries = None if index_entries is None else index_entries[:, :closed]
            if closed == 0:
                return parts, None
        visible = torch.arange(entries.shape[1], device=keys.device) < ((rel + 1) // m)[..., None]
        visible = visible if visible.dim() == 3 else visible[None]
        if self.indexer is None or (not self.training and entries.shape[1] <= self.indexer.topk):
            return parts + [(entries, visible)], None  # (at most top-k entries: the picks are all of them)
        x, q_latent = index_in
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.training):  # the KL needs its graph
            scores = self.indexer.scores(x[:, c0:c1], q_latent[:, c0:c1], *rope_q, index_entries)
        visible = visible.expand(b, scores.shape[1], -1)
        k = entries.shape[1] if self.dsa_warmup else min(self.indexer.topk, entries.shape[1])
        top = earliest_topk(scores.detach().masked_fill(~visible, float("-inf")), k)  # (B, C, k); picks: no graph
        picked = torch.zeros_like(visible).scatter_(-1, top, visible.gather(-1, top))
        parts.append((entries, picked))
        return parts, scores
