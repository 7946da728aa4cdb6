"""V4's long prefill, fast: CSA's and HCA's layers (model/attention/compressed.py's
`CompressedAttention.attend`, same picks, same math).

The reference runs each chunk of CHUNK queries as one SDPA over the chunk's band of window keys
plus every entry closed so far (CSA: the indexer's top-k applied as a mask), the sink as one more
logit: each CSA query computes T/m entries to use k of them. Here each query gets only its own keys,
through DSA's gathered attention (kernels/dsa.py's `GatheredAttention`, the C++ kernel on the CPU):

    keys      K = [kv_0 .. kv_{S-1} ; e_0 .. e_{W-1}]     (one matrix, built once; values = keys)
    query t   picks its window  rel_t - w + 1 .. rel_t   (those >= 0), and
              CSA: its top-k entries by the indexer  S + e    (csrc/indexer_topk.cpp with rate m: the
                   query sees (rel_t + 1) // m entries; the same picks as the reference's mask +
                   `earliest_topk`; a chunk that sees at most top-k entries picks every visible
                   one without scoring them), from the first chunk that sees an entry;
              HCA: every entry closed by then  S + e,  e < (rel_t + 1) // m
    sink      the kernel's per-head sink logit s_h with a zero value: each query head's softmax starts
              from it (its gradient, -sum_t p_sink D_t, from the kernel's D = dO . O)

so o_{t,h} = softmax([q_{t,h} . K_picks / sqrt(D_h) ; s_h]) K_picks, as the reference. Backward goes
through the same kernel (recomputed from the saved logsumexp); the gradients of the keys and entries
come back through the concatenation.

Where: an eager prefill (not a per-row decode step, not inside a compiled graph) on the CPU with the
C++ kernel built for q's dtype (fp32, or bf16 on AVX-512 BF16). CSA: in inference (no indexer KL loss
to compute, no dense warm-up), the chunks before the first gathered one (none yet sees an entry) by
the reference's masked SDPA. HCA: in inference and in training without attention dropout (its picks
need no indexer). Elsewhere HCA and V4's sliding layers run as block-sparse tiles (`attend_tiles`),
slower for HCA than the gathered kernel where both run (benchmarks/RESULTS.md, the 64K section).

    >>> from nanoseek import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.from_preset("deepseek-v4-tiny"))
    >>> type(model.layers[0].self_attn).__name__
    'SparseCompressedAttention'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.kernels.block_attention import block_sparse_attention, tiles_pay, window_blocks
from nanoseek.kernels.dsa import GatheredAttention, Scratch, native_ops, native_topk, scores_into, widened
from nanoseek.model.attention.compressed import CHUNK, CompressedAttention

# a chunk gathers once it sees more than GATHER_FROM * top-k entries (0: from the first that sees one). A
# query's window and picks through the kernel cost less than its row of the reference's masked SDPA over
# the chunk's band (CHUNK + w keys) and every closed entry, even before the chunk sees top-k entries:
# gathering from there rather than from 1.5 * top-k entries took V4's 8 x 512 layout (top-512, w = 128) from
# 0.15 / 0.30 to 0.09 / 0.16 s forward / backward at 1K tokens, 0.95 / 1.70 to 0.70 / 1.21 at 4K and
# 5.3 / 6.7 to 4.7 / 6.0 at 16K (one Zen 4 core, fp32, alternating in one process)
GATHER_FROM = 0
V4_TILE = 32  # tokens per query and key block of HCA's (and V4 sliding layers') tiles
PICKS_BYTES = 256 << 20  # an HCA prefill's picks (int32 + a bool each) per gathered call, at most


class SparseCompressedAttention(CompressedAttention):
    """CompressedAttention whose long CSA prefill gives each query only its window, its picked entries
    and the sink (see the module docstring); everything else is the reference's."""

    def attend(
        self, q, keys, start, offset, pos, entries, index_entries, index_in, cos, sin, side=None
    ) -> torch.Tensor:
        if self.tiles_run(q, start):
            if self.kind == "hca" and entries is not None and native_ops(q) is not None:
                return self.attend_every_entry(q, keys, start - offset, entries)
            return self.attend_tiles(q, keys, start - offset, entries)
        first = self.first_gathered(q, start, offset, entries, side)
        if first is None:
            return super().attend(q, keys, start, offset, pos, entries, index_entries, index_in, cos, sin, side)
        if first == 0:  # unsplit: split's backward would copy dq whole
            return self.attend_gathered(q, keys, start, offset, 0, entries, index_entries, index_in, cos, sin)
        q_near, q_far = q.split([first, q.shape[1] - first], dim=1)
        rope = (cos[..., :first, :], sin[..., :first, :])
        near = super().attend(q_near, keys, start, offset, pos[..., :first], entries, index_entries, index_in, *rope)
        far = self.attend_gathered(q_far, keys, start, offset, first, entries, index_entries, index_in, cos, sin)
        return torch.cat([near, far], dim=1)

    def tiles_run(self, q, start) -> bool:
        """Whether an HCA (or V4 sliding) layer leaves the reference's chunks: on the CPU, eagerly, more
        than one query at an int position, no dropout in training. HCA then gathers where the C++ kernel
        takes q (`attend_every_entry`); otherwise, and V4's sliding layers, run as tiles (every entry a
        layer sees is attended, so a query block shares its keys: its window's blocks, the closed
        entries, the sink)."""
        return (
            self.kind in ("hca", "sliding")
            and self.window is not None
            and not isinstance(start, torch.Tensor)
            and tiles_pay(q.transpose(1, 2))
            and not (self.training and self.dropout)
        )

    def attend_tiles(self, q, keys, rel0: int, entries) -> torch.Tensor:
        """o (B, T, H, D_h) of the queries at key indices rel0.. over their window, the entries closed
        by then and the sink, as `block_sparse_attention` tiles of V4_TILE tokens. One key table:
        [keys ; sink, entries], each part padded to whole blocks; a row's position (`key_pos`) is its
        index for the keys, -inf for the sink and the index of its last pooled token for an entry
        (visible once closed); the window applies to the keys only. A query block computes only the
        extra blocks up to its last closed entry (`used`: at 64K an early block sees a few of the 512
        entries). The sink is sink_sdpa's: one more key [0 .. 0, 1] with a zero value, met by a query
        channel holding s_h / scale."""
        b, t, h, d = q.shape
        c, s, device = V4_TILE, keys.shape[1], q.device
        m = None if entries is None else self.compressor.rate
        n_entries = 0 if entries is None else min(entries.shape[1], (rel0 + t) // m)
        n_kv, n_extra = -(-s // c) * c, -(-(n_entries + 1) // c) * c
        sink = F.pad(keys.new_ones(b, 1, 1), (d, 0))  # [0 .. 0, 1]
        parts = [F.pad(keys, (0, 1, 0, n_kv - s)), sink]
        if n_entries:
            parts.append(F.pad(entries[:, :n_entries].to(keys.dtype), (0, 1)))
        table = F.pad(torch.cat(parts, dim=1), (0, 0, 0, n_extra - n_entries - 1))[:, None]  # (B, 1, rows, D_h + 1)
        never, always = 1 << 40, -(1 << 40)
        key_pos = torch.cat(
            [
                torch.arange(s, device=device),
                torch.full((n_kv - s,), never, device=device),
                torch.tensor([always], device=device),
                (torch.arange(n_entries, device=device) + 1) * (m or 1) - 1,
                torch.full((n_extra - n_entries - 1,), never, device=device),
            ]
        )
        windowed = torch.arange(n_kv + n_extra, device=device) < n_kv
        near = window_blocks(rel0, t, self.window, c, device)  # (nq, window blocks)
        extra = (n_kv // c + torch.arange(n_extra // c, device=device)).expand(len(near), -1)
        key_blocks = torch.cat([near.clamp(min=0), extra], dim=1).expand(b, 1, -1, -1)
        valid = torch.cat([near >= 0, torch.ones_like(extra, dtype=torch.bool)], dim=1).expand(b, 1, -1, -1)
        # each query block reads the sink and the entries closed by its last query: a prefix of the extra blocks
        closed = ((near[:, -1] + 1) * c // (m or 1)).clamp(max=n_entries)
        used = (near.shape[1] + (closed + c) // c).expand(b, 1, -1)
        sink_q = (self.sinks.to(q.dtype) / self.scale).view(1, h, 1, 1).expand(b, h, t, 1)
        q_all = torch.cat([q.transpose(1, 2), sink_q], dim=-1)  # (B, H, T, D_h + 1)
        out = block_sparse_attention(
            q_all, table, table[..., :d], key_blocks, valid, rel0, c, self.scale, self.window, key_pos, windowed, used
        )
        return out.transpose(1, 2)

    def attend_every_entry(self, q, keys, rel0: int, entries) -> torch.Tensor:
        """o (B, T, H, D_h) of an HCA layer's queries at key indices rel0..: each over its window, every
        entry closed by then and the sink, through GatheredAttention. The picks (int32, and a validity
        mask) run to the last entry any query of a call sees; a query's later ones are invalid, and
        the kernel skips them. One call while its picks fit PICKS_BYTES (at 64K tokens, window 128,
        rate 128: 210 MB), else calls over runs of queries, each to its own last closed entry."""
        b, t = q.shape[:2]
        m, w, device = self.compressor.rate, self.window, q.device
        s, n_entries = keys.shape[1], entries.shape[1]
        k_most = w + min(n_entries, (rel0 + t) // m)
        per_query = 5 * b * k_most  # bytes of picks (int32 + a bool), for each row of the batch
        run = t if t * per_query <= PICKS_BYTES else max(CHUNK, PICKS_BYTES // per_query // CHUNK * CHUNK)
        k_all = self.key_table(keys, entries)
        outs = []
        for a, q_run in zip(range(0, t, run), q.split(run, dim=1)):
            rel = rel0 + a + torch.arange(q_run.shape[1], device=device, dtype=torch.int32)
            window = rel[:, None] - w + 1 + torch.arange(w, device=device, dtype=torch.int32)
            seen = torch.arange(min(n_entries, (rel0 + a + q_run.shape[1]) // m), device=device, dtype=torch.int32)
            picked = torch.cat([window.clamp(min=0), (s + seen).expand(len(rel), -1)], -1)
            valid = torch.cat([window >= 0, seen < ((rel[:, None] + 1) // m)], -1)
            outs.append(self.attend_picks(q_run, k_all, picked.expand(b, -1, -1), valid.expand(b, -1, -1)))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def first_gathered(self, q, start, offset, entries, side) -> int | None:
        """The first query (a multiple of CHUNK) from which the queries gather, or None: none do."""
        eligible = (
            not torch.compiler.is_compiling()  # a compiled prefill's short windows keep the reference
            and self.kind == "csa"
            and self.window is not None
            and not self.training
            and not self.dsa_warmup
            and side is None
            and not isinstance(start, torch.Tensor)
            and entries is not None
            and native_ops(q) is not None
            and native_topk(q) is not None
        )
        if not eligible:
            return None
        m, need = self.compressor.rate, GATHER_FROM * self.indexer.topk
        t = q.shape[1]
        for c0 in range(0, t, CHUNK):
            if (start + min(t, c0 + CHUNK) - offset) // m > need:  # entries this chunk sees
                return c0
        return None

    def attend_gathered(self, q, keys, start, offset, first, entries, index_entries, index_in, cos, sin):
        """o (B, C, H, D_h) of queries first..first+C-1: each over its window, its top-k entries and
        the sink, in one GatheredAttention."""
        b, c = q.shape[:2]
        s, device = keys.shape[1], q.device
        rel = start + first - offset + torch.arange(c, device=device)  # each query's index into keys
        window = rel[:, None] - self.window + 1 + torch.arange(self.window, device=device)  # (C, w)
        entry_picks, entry_ok = self.entry_picks(start, offset, first, c, index_entries, index_in, cos, sin)
        picked = torch.cat([window.clamp(min=0).expand(b, c, -1), s + entry_picks], dim=-1)
        valid = torch.cat([(window >= 0).expand(b, c, -1), entry_ok], dim=-1)
        return self.attend_picks(q, self.key_table(keys, entries), picked, valid)

    @staticmethod
    def key_table(keys, entries) -> torch.Tensor:
        """[keys ; entries] (B, 1, S + W, D_h): the rows the picks index (one key head)."""
        return torch.cat([keys, entries.to(keys.dtype)], dim=1)[:, None]

    def attend_picks(self, q, k_all, picked, valid) -> torch.Tensor:
        """o (B, C, H, D_h): each query over its picks (B, C, K) among the rows of `key_table` and the
        sink, through GatheredAttention (the values are the keys; the sinks are its per-head logits)."""
        out = GatheredAttention.apply(
            q.transpose(1, 2), k_all, None, q.shape[-1], picked.to(torch.int32), valid, self.scale, self.sinks
        )
        return out.transpose(1, 2)

    @torch.no_grad()
    def entry_picks(self, start, offset, first, c, index_entries, index_in, cos, sin):
        """(picked (B, C, k), valid (B, C, k)): each query's top-k visible entries by the indexer, CHUNK
        queries at a time over the entries closed by each chunk's end (the reference's scores)."""
        x, q_latent = index_in
        m, topk = self.compressor.rate, self.indexer.topk
        top = native_topk(index_entries)
        scratch = Scratch(index_entries.device, index_entries.shape[1])
        width = min(topk, index_entries.shape[1])
        picks, oks = [], []
        for a in range(first, first + c, CHUNK):
            z = min(first + c, a + CHUNK)
            closed = (start + z - offset) // m
            if closed <= topk:  # every visible entry is picked: no scores
                seen = (start + a - offset + 1 + torch.arange(z - a, device=x.device)) // m
                picked = torch.arange(width, device=x.device).expand(x.shape[0], z - a, -1)
                picks.append(picked)
                oks.append(picked < seen[:, None])
                continue
            rope = (cos[..., a:z, :], sin[..., a:z, :])
            scores = self.chunk_scores(x[:, a:z], q_latent[:, a:z], rope, index_entries[:, :closed], scratch)
            # query a + i sees (rel_a + i + 1) // m entries
            picked, ok = top.indexer_topk(widened(scores, scratch), start + a - offset + 1, topk, m)
            picks.append(picked)
            oks.append(ok)
        return torch.cat(picks, dim=1), torch.cat(oks, dim=1)

    def chunk_scores(self, x_BCD, q_latent_BCQ, rope, entries_BWI, scratch: Scratch) -> torch.Tensor:
        """`Indexer.scores` in `scratch`'s reused buffers (kernels/dsa.py's `scores_into`: at 64K a
        chunk's products are 128 MiB); overwritten by the next chunk's."""
        b, c, _ = x_BCD.shape
        return scores_into(scratch, *self.indexer.queries(x_BCD, q_latent_BCQ, *rope), entries_BWI).view(b, c, -1)
