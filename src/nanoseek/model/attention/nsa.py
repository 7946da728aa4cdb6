"""Native Sparse Attention (NSA, Yuan et al. 2025): three branches mixed by per-head gates.

For query t (H heads in H_kv groups), with keys/values of its own per branch c:
    o_t = sum_{c in {cmp, slc, win}} g^c_t * Attn(q_t, K^c_t, V^c_t),   g_t = sigmoid(W_g x_t)  (per head)
Compressed (cmp): the sequence in blocks of l tokens (stride d = l here), each block j summarized as
    k^cmp_j = W_k phi(k_{jl} .. k_{jl+l-1}),  phi = flatten(k_block + P),  P = a learned intra-block
    position table (l, d_k); likewise v^cmp_j. Query t sees block j once it is complete: jl + l - 1 <= t.
Selected (slc): blocks of l' = l tokens are ranked by the compressed attention the group gives them,
    p^slc_j = sum_{h in group} softmax_j(q_{t,h} . k^cmp_j)  (with l' = l = d, p^slc = p^cmp);
    the top-n blocks, plus always the first block and the query's own and previous block, are
    attended token by token.
Window (win): the last w tokens (sliding-window attention).

When the sequence has no more blocks than nsa_topn, every block is selected and the selected
branch is plain causal attention (one SDPA, no selection pass).

CPU form (one deviation by default, stated): the block selection is shared by the l queries of a
query block (their p^slc summed, using only blocks that are complete before the query block starts,
so the choice never depends on the future). Each query block then runs ONE dense SDPA over its
n * l selected keys instead of a per-token gather: O(T * n * l) work in SDPA's fast kernel.
`nsa_query_group` = m < l shares a selection among m queries only (m = 1: per token, as the paper):
each group attends to its own n * l keys (one masked SDPA over all keys while B H T S is small; then
gathered per group, in chunks recomputed in backward). Queries asking for different far tokens side
by side (retrieval) need it: a shared choice must cover them all.
With n covering every block, the selected branch is exactly causal attention (tested).
The compressed branch's attention and the selection scores p^cmp come from one softmax
(`compressed_block_attention`); the fast path (kernels/nsa.py) runs it over chunks of queries and
recomputes p in backward.

Decoding: the cache (`NSACache`) keeps each branch's keys/values and the block summaries k^cmp_j,
v^cmp_j, computed once when block j's last token is written. A step at per-row positions
(`decode_rows`) picks blocks from its own query's scores, as a one-query block would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.attention.core import allowed_keys, attention_probs, causal_attention, sdpa
from nanoseek.model.kv_cache import DenseKVCache
from nanoseek.model.position import apply_rope, softmax_scale

BRANCHES = ("cmp", "slc", "win")
MASKED_SELECTION_ELEMENTS = 1 << 26  # query groups smaller than a block: up to this B H T S, one masked SDPA
GROUP_CHUNK_BYTES = 64 << 20  # beyond: gathered picks of this many bytes at a time


class NativeSparseAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.n_kv_heads
        self.head_dim = hd = config.attn_head_dim
        self.block, self.n_select, self.window = config.nsa_block, config.nsa_topn, config.sliding_window
        self.query_group = config.nsa_query_group or config.nsa_block  # queries sharing one selection
        self.interleave = config.rope_interleave
        self.scale = softmax_scale(config, hd)
        kv = self.n_kv_heads * hd
        # q, then k/v for each of the three branches
        self.qkv_proj = nn.Linear(config.hidden_size, self.n_heads * hd + 6 * kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, config.hidden_size, bias=config.attention_bias)
        self.gate_proj = nn.Linear(config.hidden_size, 3 * self.n_heads, bias=True)
        self.block_pos = nn.Parameter(torch.zeros(self.block, hd))
        self.compress_k = nn.Linear(self.block * hd, hd, bias=False)
        self.compress_v = nn.Linear(self.block * hd, hd, bias=False)
        self.whole_selection_shortcut = True  # False: always run the block selection (for tests)

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.normal_(self.block_pos, 0.0, std)
        nn.init.normal_(self.compress_k.weight, 0.0, std / math.sqrt(self.block))
        nn.init.normal_(self.compress_v.weight, 0.0, std / math.sqrt(self.block))
        nn.init.zeros_(self.gate_proj.bias)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> NSACache:
        caches = [
            DenseKVCache(batch, self.n_kv_heads, max_len, self.head_dim, self.head_dim, dtype, device) for _ in BRANCHES
        ]
        blocks = [
            torch.zeros(batch, self.n_kv_heads, max_len // self.block, self.head_dim, dtype=dtype, device=device)
            for _ in range(2)
        ]
        return NSACache(caches, blocks, self.block)

    # ------------------------------------------------------------------ forward
    def project(self, x: torch.Tensor, rope):
        """q (B, H, T, d) and the branches' [k_cmp, v_cmp, k_slc, v_slc, k_win, v_win] (B, G, T, d),
        keys rotated."""
        b, t, _ = x.shape
        hd, kv = self.head_dim, self.n_kv_heads * self.head_dim
        parts = self.qkv_proj(x).split([self.n_heads * hd] + [kv] * 6, dim=-1)
        q = parts[0].view(b, t, self.n_heads, hd).transpose(1, 2)
        kvs = [p.view(b, t, self.n_kv_heads, hd).transpose(1, 2) for p in parts[1:]]
        if rope is not None:
            q = apply_rope(q, *rope, self.interleave)
            kvs = [apply_rope(p, *rope, self.interleave) if i % 2 == 0 else p for i, p in enumerate(kvs)]
        return q, kvs

    def forward(self, x: torch.Tensor, rope=None, cache=None, start=0) -> torch.Tensor:
        if isinstance(start, torch.Tensor) and x.shape[1] == 1:  # decoding at per-row positions
            return self.decode_rows(x, rope, cache, start)
        if isinstance(start, torch.Tensor):  # several tokens per row: one row at a time
            rows = [
                self.forward(
                    x[i : i + 1],
                    None if rope is None else (rope[0][i], rope[1][i]),
                    cache.rows(i, i + 1),
                    int(start[i]),
                )
                for i in range(x.shape[0])
            ]
            return torch.cat(rows)
        b, t, _ = x.shape
        hd = self.head_dim
        q, kvs = self.project(x, rope)
        branches = [(kvs[0], kvs[1]), (kvs[2], kvs[3]), (kvs[4], kvs[5])]
        if cache is not None:
            branches = [c.update(start, k, v) for c, (k, v) in zip(cache.caches, branches)]
        (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win) = branches
        if cache is not None:
            k_blocks, v_blocks = self.update_blocks(cache, k_cmp, v_cmp, start, t)
        else:
            k_blocks, v_blocks = self.compress(k_cmp), self.compress(v_cmp, values=True)
        if self.covers_every_block(start, t):  # the selection is every causal block: one causal SDPA
            o_cmp, _ = self.compressed_attention(q, k_blocks, v_blocks, start, with_scores=False)
            o_slc = causal_attention(q, k_slc, v_slc, start, self.scale)
        else:
            o_cmp, p_cmp = self.compressed_attention(q, k_blocks, v_blocks, start)
            o_slc = self.selected_attention(q, k_slc, v_slc, p_cmp, start)
        o_win = self.window_attention(q, k_win, v_win, start)
        g = torch.sigmoid(self.gate_proj(x)).view(b, t, 3, self.n_heads).permute(2, 0, 3, 1)[..., None]
        o = g[0] * o_cmp + g[1] * o_slc + g[2] * o_win
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * hd))

    def update_blocks(self, cache: NSACache, k_cmp, v_cmp, start: int, t: int):
        """The compressed blocks after positions start..start+t-1 were written: only the blocks that
        completed in this call are compressed (a decode step compresses one block every l tokens
        instead of the whole prefix), the rest come from the cache. A block is recompressed whenever
        its last position is written again, so a rewritten suffix (speculative decoding) stays exact;
        callers rewrite positions only by writing on from there (every caller here does)."""
        first, end = start // self.block, (start + t) // self.block
        if end > first:
            span = slice(first * self.block, end * self.block)
            for buffer, x, values in zip(cache.blocks, (k_cmp, v_cmp), (False, True)):
                buffer[:, :, first:end] = self.compress(x[:, :, span], values=values)
        return cache.blocks[0][:, :, :end], cache.blocks[1][:, :, :end]

    def update_row_blocks(self, cache: NSACache, k_cmp, v_cmp, positions: torch.Tensor):
        """`update_blocks` for one token per row at per-row positions (B,), in tensor ops: a row whose
        token ends block j = (p + 1) / l - 1 writes that block's summary; the others rewrite what they
        had. Returns every block of the cache (B, G, L // l, d); `visible` masks the incomplete ones."""
        b, g, s, d = k_cmp.shape
        l = self.block
        if cache.blocks[0].shape[2] == 0:  # a view shorter than one block: none can complete
            return cache.blocks[0], cache.blocks[1]
        ends = (positions + 1) % l == 0
        j = ((positions + 1) // l - 1).clamp(min=0)  # (B,)
        token = (j[:, None] * l + torch.arange(l, device=positions.device)).clamp(max=s - 1)  # (B, l)
        rows = torch.arange(b, device=positions.device)
        for buffer, x, values in zip(cache.blocks, (k_cmp, v_cmp), (False, True)):
            tokens = x.gather(2, token[:, None, :, None].expand(b, g, l, d))  # (B, G, l, d)
            summary = self.compress(tokens, values=values)[:, :, 0]  # (B, G, d)
            buffer[rows, :, j] = torch.where(ends[:, None, None], summary, buffer[rows, :, j])
        return cache.blocks[0], cache.blocks[1]

    def decode_rows(self, x: torch.Tensor, rope, cache: NSACache, positions: torch.Tensor) -> torch.Tensor:
        """One token per row at per-row positions (B,) against static caches: the same branches as
        `forward` with an int position, in tensor ops only (no host read, so a compiled decode step
        is one graph for every position). Row b sees the blocks complete at p_b = positions[b]
        ((p_b + 1) // l of them) and picks among those before its own block's predecessor, as
        `choose_blocks` does for a one-query block. The selected branch gathers the picked blocks'
        tokens (K l keys, those after p_b masked) and the window its last w: a step reads
        K l + w + L / l keys per group whatever the cache length L, not 3 L."""
        b = x.shape[0]
        g, hd, l = self.n_kv_heads, self.head_dim, self.block
        q, kvs = self.project(x, rope)
        branches = [c.update(positions, k, v) for c, k, v in zip(cache.caches, kvs[0::2], kvs[1::2])]
        (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win) = branches
        s = k_slc.shape[2]
        q_BGRd = q.reshape(b, g, self.n_heads // g, hd)
        k_blocks, v_blocks = self.update_row_blocks(cache, k_cmp, v_cmp, positions)
        o_cmp, scores_BGn = self.compressed_decode(q_BGRd, k_blocks, v_blocks, positions)
        blocks, valid = self.choose_blocks(scores_BGn, (positions // l)[:, None])  # (B, G, K)
        token = (blocks[..., None] * l + torch.arange(l, device=x.device)).flatten(-2)  # (B, G, K l)
        keep = valid.repeat_interleave(l, dim=-1) & (token <= positions[:, None, None])
        o_slc = gathered_one_query_attention(q_BGRd, k_slc, v_slc, token.clamp(max=s - 1), keep, self.scale)
        w = min(self.window, s)
        window = positions[:, None] - w + 1 + torch.arange(w, device=x.device)  # (B, w): the last w positions
        keep = (window >= 0)[:, None].expand(b, g, w)
        window = window.clamp(min=0)[:, None].expand(b, g, w)
        o_win = gathered_one_query_attention(q_BGRd, k_win, v_win, window, keep, self.scale)
        gates = torch.sigmoid(self.gate_proj(x)).view(b, 1, 3, self.n_heads).permute(2, 0, 3, 1)[..., None]
        o_cmp, o_slc, o_win = (o.reshape(b, self.n_heads, 1, hd) for o in (o_cmp, o_slc, o_win))  # (B, H, 1, d)
        o = gates[0] * o_cmp + gates[1] * o_slc + gates[2] * o_win
        return self.o_proj(o.transpose(1, 2).reshape(b, 1, self.n_heads * hd))

    def compressed_decode(self, q_BGRd, k_blocks, v_blocks, positions):
        """The compressed branch for one query per row over the cache's blocks (B, G, n, d): (output
        (B, G, R, d), selection scores (B, G, n) = its block probabilities summed over the group's
        heads). A row sees the blocks complete at its position; one with none gets 0."""
        n = k_blocks.shape[2]
        visible = torch.arange(n, device=q_BGRd.device) < ((positions + 1) // self.block)[:, None]  # (B, n)
        logits = torch.matmul(q_BGRd, k_blocks.transpose(-1, -2))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * self.scale
        probs = logits.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1)
        probs = probs.masked_fill(~visible.any(-1)[:, None, None, None], 0.0)  # no complete block: 0, not NaN
        return torch.matmul(probs.to(v_blocks.dtype), v_blocks), probs.sum(2)

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B, H, T, T), allowed (B, T, T)) per token key: the gated selected and window
        attention plus the compressed attention spread evenly over each block's tokens; allowed = the
        tokens of the selected blocks (any KV group) and the window."""
        b, t, _ = x.shape
        l = self.block
        q, kvs = self.project(x, rope)
        k_blocks = self.compress(kvs[0])
        _, scores = self.compressed_attention(q, k_blocks, self.compress(kvs[1], values=True), 0)
        nb, n, m = (t - 1) // l + 1, k_blocks.shape[2], self.query_group
        own = torch.arange(scores.shape[2], device=x.device) * m // l  # each query group's block
        blocks, valid = self.choose_blocks(scores, own)  # (B, G, groups, K)
        chosen = torch.zeros(b, self.n_kv_heads, len(own), nb + 1, dtype=torch.bool, device=x.device)
        chosen = chosen.scatter_(-1, blocks.masked_fill(~valid, nb), True)[..., :nb]  # invalid picks: a spare column
        block_of = torch.arange(t, device=x.device) // l
        group_of = torch.arange(t, device=x.device) // m
        selected = chosen[:, :, group_of][..., block_of] & allowed_keys(t, None, x.device)  # (B, G, T, T)
        group = self.n_heads // self.n_kv_heads
        p_slc = attention_probs(q, kvs[2], selected.repeat_interleave(group, dim=1), self.scale)
        p_win = attention_probs(q, kvs[4], allowed_keys(t, self.window, x.device), self.scale)
        p_cmp = torch.zeros_like(p_win)
        if n:
            visible = (torch.arange(n, device=x.device) * l + l - 1)[None, :] <= torch.arange(t, device=x.device)[
                :, None
            ]
            p_blocks = attention_probs(q, k_blocks, visible, self.scale).nan_to_num(0.0)  # (B, H, T, n)
            p_cmp[..., : n * l] = p_blocks.repeat_interleave(l, dim=-1) / l
        g = torch.sigmoid(self.gate_proj(x)).view(b, t, 3, self.n_heads).permute(2, 0, 3, 1)[..., None]
        weights = g[0] * p_cmp + g[1] * p_slc + g[2] * p_win
        return weights, selected.any(1) | allowed_keys(t, self.window, x.device)

    # ------------------------------------------------------------------ branches
    def compress(self, x_BGSD: torch.Tensor, values: bool = False) -> torch.Tensor:
        """One summary per complete block of l tokens: (B, G, S // l, d)."""
        b, g, s, d = x_BGSD.shape
        n = s // self.block
        blocks = x_BGSD[:, :, : n * self.block].reshape(b, g, n, self.block, d) + self.block_pos
        proj = self.compress_v if values else self.compress_k
        return proj(blocks.flatten(-2))

    def covers_every_block(self, start: int, t: int) -> bool:
        """True when the last query block may select every block before it (first, previous, own and
        nsa_topn - 3 chosen): the selected branch is then exactly causal attention (tested)."""
        return self.whole_selection_shortcut and (start + t - 1) // self.block + 1 <= self.n_select

    def compressed_attention(self, q, k_blocks, v_blocks, start: int, with_scores: bool = True):
        """Attention over the complete blocks, and per query group (`nsa_query_group` queries; a whole
        query block by default) the selection scores p^slc (B, G, groups, n): softmax_j(q_t . k^cmp_j)
        summed over the group's queries and the KV group's heads (no gradient: the choice of blocks is
        not differentiable). One pass gives both
        (`block_attention`)."""
        b, _, t, _ = q.shape
        n, l = k_blocks.shape[2], self.block
        nb = (start + t - 1) // l - start // l + 1
        out, probs_BGTn = self.block_attention(q, k_blocks, v_blocks, start, with_scores)
        if not with_scores:
            return out, None
        front = start - (start // l) * l
        if front or (front + t) % l:  # partial first or last query block: pad to whole blocks
            probs_BGTn = F.pad(probs_BGTn, (0, 0, front, nb * l - front - t))
        m = self.query_group
        return out, probs_BGTn.view(b, self.n_kv_heads, nb * l // m, m, n).sum(3)

    def block_attention(self, q, k_blocks, v_blocks, start: int, with_probs: bool):
        """The compressed branch's output and block probabilities (`compressed_block_attention`); the
        kernels' subclass (kernels/nsa.py) computes them in chunks, recomputing p in backward."""
        return compressed_block_attention(q, k_blocks, v_blocks, start, self.block, self.scale, with_probs)

    def window_attention(self, q, k, v, start: int):
        """The window branch: each query over its last `sliding_window` keys (kernels/nsa.py's
        subclass runs it as tiles of key blocks on the CPU)."""
        return causal_attention(q, k, v, start, self.scale, window=self.window)

    def selected_attention(self, q, k, v, p_cmp, start: int):
        """Every query block at once: batched SDPA, each block over its own selected key blocks.
        `p_cmp` holds the selection scores (B, G, nb, n) from `compressed_attention`.

        Slot 2 of every block's keys is its own block (`pick_blocks`), so once a query block has a
        valid pick in every slot (absolute block >= max(2, K - 1)) its mask is the same for all:
        every key visible but the own block's future, one shared (l, K l) mask. Only the first
        blocks (missing picks) build per-block masks, in a second SDPA call."""
        if self.query_group < self.block:
            return self.selected_attention_by_group(q, k, v, p_cmp, start)
        b, h, t, d = q.shape
        l, g, s = self.block, self.n_kv_heads, k.shape[2]
        first, last = start // l, (start + t - 1) // l
        nb, front, back = last - first + 1, start - first * l, (last + 1) * l - (start + t)
        blocks, valid = self.pick_blocks(p_cmp, first, nb)  # (B, G, nb, K)
        n_keys = blocks.shape[-1] * l
        token = (blocks[..., None] * l + torch.arange(l, device=q.device)).flatten(-2)  # (B, G, nb, K*l)
        k_sel, v_sel = (gather_blocks(x, blocks, l).view(b, nb, g, n_keys, -1) for x in (k, v))
        q_blocks = (F.pad(q, (0, 0, front, back)) if front or back else q).view(b, h, nb, l, d).transpose(1, 2)
        early = min(nb, max(0, max(2, blocks.shape[-1] - 1) - first))  # query blocks with a missing pick
        parts = [early, nb - early]
        outs = []
        for i, (q_i, k_i, v_i) in enumerate(zip(*(x.split(parts, dim=1) for x in (q_blocks, k_sel, v_sel)))):
            if not parts[i]:
                continue
            if i == 0:
                query_pos = first * l + torch.arange(early * l, device=q.device).view(early, l)
                token_ok = valid[:, :, :early].repeat_interleave(l, dim=-1) & (token[:, :, :early] < s)
                mask = token_ok[..., None, :] & (token[:, :, :early, None, :] <= query_pos[None, None, :, :, None])
                mask = mask.transpose(1, 2).flatten(0, 1)  # (B * early, G, l, K*l)
                if g > 1:
                    mask = mask.repeat_interleave(h // g, dim=1)
            else:
                mask = torch.ones(l, n_keys, dtype=torch.bool, device=q.device)
                mask[:, 2 * l : 3 * l] = torch.ones(l, l, dtype=torch.bool, device=q.device).tril_()
            o = sdpa(q_i.flatten(0, 1), k_i.flatten(0, 1), v_i.flatten(0, 1), attn_mask=mask, scale=self.scale)
            outs.append(o.view(b, parts[i], h, l, -1))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (B, nb, H, l, d)
        return out.transpose(1, 2).reshape(b, h, nb * l, -1)[:, :, front : front + t]

    def selected_attention_by_group(self, q, k, v, p_cmp, start: int):
        """`selected_attention` when groups of m < l queries (`nsa_query_group`; m = 1: every query its
        own choice, as in the NSA paper) share a selection. Small (B H T S within
        MASKED_SELECTION_ELEMENTS): one SDPA over all keys with a mask of each query's picks. Longer:
        each group gathers its own K l keys and runs SDPA over them, masked per query (picked,
        complete, not in its future), GROUP_CHUNK_BYTES of gathered keys at a time (under autograd
        recomputed in backward rather than kept: they are l / m times the block path's). `p_cmp`
        holds the scores (B, G, groups, n) of the groups from the first query block's start."""
        b, h, t, d = q.shape
        l, m, s = self.block, self.query_group, k.shape[2]
        first = start // l
        front = start - first * l
        n_groups = p_cmp.shape[2]  # whole query blocks' worth, padded at both ends
        own = first + torch.arange(n_groups, device=q.device) * m // l  # each group's query block
        blocks, valid = self.choose_blocks(p_cmp, own)  # (B, G, groups, K)
        if b * h * t * s <= MASKED_SELECTION_ELEMENTS:
            return self.masked_selection(q, k, v, blocks, valid, start)
        q_BHTd = F.pad(q, (0, 0, front, n_groups * m - front - t))
        per_group = b * blocks.shape[-1] * l * (k.shape[1] * (d + v.shape[-1])) * k.element_size()
        step = max(1, GROUP_CHUNK_BYTES // per_group)
        outs = []
        for a in range(0, n_groups, step):
            z = min(n_groups, a + step)
            args = (q_BHTd[:, :, a * m : z * m], k, v, blocks[:, :, a:z], valid[:, :, a:z], first * l + a * m)
            if torch.is_grad_enabled():
                outs.append(checkpoint(self.gathered_groups, *args, use_reentrant=False))
            else:
                outs.append(self.gathered_groups(*args))
        return torch.cat(outs, dim=2)[:, :, front : front + t]

    def gathered_groups(self, q_BHTd, k, v, blocks_BGnK, valid_BGnK, first_pos: int):
        """Consecutive query groups (their queries from position first_pos), each over its own gathered
        picks: (B, H, groups * m, d_v)."""
        b, h, _, d = q_BHTd.shape
        l, m, g, s = self.block, self.query_group, self.n_kv_heads, k.shape[2]
        n_groups = blocks_BGnK.shape[2]
        token = (blocks_BGnK[..., None] * l + torch.arange(l, device=q_BHTd.device)).flatten(-2)  # (B, G, n, K l)
        n_keys = token.shape[-1]
        k_sel, v_sel = (gather_blocks(x, blocks_BGnK, l).view(b * n_groups, g, n_keys, -1) for x in (k, v))
        q_groups = q_BHTd.view(b, h, n_groups, m, d).transpose(1, 2).flatten(0, 1)
        query_pos = first_pos + torch.arange(n_groups * m, device=q_BHTd.device).view(n_groups, m)
        token_ok = valid_BGnK.repeat_interleave(l, dim=-1) & (token < s)  # (B, G, n, K l)
        mask = token_ok[..., None, :] & (token[:, :, :, None, :] <= query_pos[None, None, :, :, None])
        mask = mask.transpose(1, 2).flatten(0, 1)  # (B n, G, m, K l); block 0 keeps every row non-empty
        if g > 1:
            mask = mask.repeat_interleave(h // g, dim=1)
        o = sdpa(q_groups, k_sel, v_sel, attn_mask=mask, scale=self.scale)  # (B n, H, m, d_v)
        return o.view(b, n_groups, h, m, -1).transpose(1, 2).reshape(b, h, n_groups * m, -1)

    def masked_selection(self, q, k, v, blocks_BGnK, valid_BGnK, start: int):
        """The selected branch as one SDPA over all S keys with a (B, H, T, S) mask of each query's
        group's picks: T x S work, but in one large call (many small gathered calls cost more while
        T x S stays small)."""
        b, h, t, _ = q.shape
        l, m, g, s = self.block, self.query_group, self.n_kv_heads, k.shape[2]
        n_blocks = (s - 1) // l + 1
        chosen = torch.zeros(*blocks_BGnK.shape[:3], n_blocks + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, blocks_BGnK.masked_fill(~valid_BGnK, n_blocks), True)  # invalid picks: a spare column
        query_pos = torch.arange(start, start + t, device=q.device)
        group_of = (query_pos - (start // l) * l) // m
        key_pos = torch.arange(s, device=q.device)
        mask = chosen[:, :, group_of][..., key_pos // l] & (key_pos <= query_pos[:, None])  # (B, G, T, S)
        if g > 1:
            mask = mask.repeat_interleave(h // g, dim=1)
        return sdpa(q, k, v, attn_mask=mask, scale=self.scale)

    def pick_blocks(self, score_BGbn: torch.Tensor, first: int, nb: int):
        """Block ids (B, G, nb, K) and their validity for query blocks first..first+nb-1."""
        return self.choose_blocks(score_BGbn, torch.arange(first, first + nb, device=score_BGbn.device))

    def choose_blocks(self, score: torch.Tensor, own: torch.Tensor):
        """Block ids (..., K) and their validity for score rows (..., n) whose query block is `own`
        (broadcastable to score.shape[:-1]): the first, previous and own block (always slots 0, 1, 2),
        then the top (nsa_topn - 3) of the blocks complete before the query block by their score."""
        n = score.shape[-1]
        own = own.expand(score.shape[:-1])
        forced = torch.stack([torch.zeros_like(own), (own - 1).clamp(min=0), own], -1)
        valid = torch.stack([torch.ones_like(own, dtype=torch.bool), own > 1, own > 0], -1)
        n_free = min(self.n_select - 3, n)
        if n_free <= 0:
            return forced, valid
        candidate = torch.arange(n, device=score.device)
        usable = (candidate < own[..., None] - 1) & (candidate > 0)  # complete before, and not forced
        top = score.masked_fill(~usable, float("-inf")).topk(n_free, dim=-1)
        return torch.cat([forced, top.indices], -1), torch.cat([valid, top.values > float("-inf")], -1)


def gather_blocks(x_BGSd: torch.Tensor, blocks_BGnK: torch.Tensor, l: int) -> torch.Tensor:
    """(B, nb, G, K, l, d): the l rows of each picked block, in (B, nb, G) order. One index_select over
    whole blocks (each a contiguous l x d copy; per row it ran at a third of the speed); the keys are
    zero-padded to whole blocks first where S is not a multiple of l (what lies past S is masked)."""
    b, g, s, d = x_BGSd.shape
    n_blocks = -(-s // l)
    if n_blocks * l != s:
        x_BGSd = F.pad(x_BGSd, (0, 0, 0, n_blocks * l - s))
    heads = torch.arange(b * g, device=x_BGSd.device).view(b, g, 1, 1) * n_blocks
    rows = (blocks_BGnK.clamp(0, n_blocks - 1) + heads).transpose(1, 2)  # (B, nb, G, K)
    picked = x_BGSd.reshape(b * g * n_blocks, l * d).index_select(0, rows.flatten())
    return picked.view(*rows.shape, l, d)


def gathered_one_query_attention(q_BGRd, k, v, index_BGN, keep_BGN, scale: float) -> torch.Tensor:
    """softmax(q k_I^T * scale) v_I over the N cached keys each row and group reads (positions `index`,
    those `keep` drops masked), one query per row and R query heads per key head: (B, G, R, d_v).
    Every row keeps at least one key (its own position)."""
    b, g, n = index_BGN.shape
    k_I = k.gather(2, index_BGN[..., None].expand(b, g, n, k.shape[-1]))
    v_I = v.gather(2, index_BGN[..., None].expand(b, g, n, v.shape[-1]))
    scores = torch.matmul(q_BGRd, k_I.transpose(-1, -2))  # (B, G, R, N)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    probs = scores.masked_fill(~keep_BGN[:, :, None], float("-inf")).softmax(-1)
    return torch.matmul(probs.to(v_I.dtype), v_I)


class NSACache:
    """One dense K/V cache per branch (cmp, slc, win), and the compressed branch's block summaries
    k^cmp, v^cmp (B, G, L // l, d), each written once, when its block's last token is."""

    def __init__(self, caches: list[DenseKVCache], blocks: list[torch.Tensor], block: int):
        self.caches, self.blocks, self.block = caches, blocks, block

    def rows(self, lo: int, hi: int, length: int | None = None) -> NSACache:
        n = None if length is None else length // self.block
        return NSACache(
            [c.rows(lo, hi, length) for c in self.caches], [x[lo:hi, :, :n] for x in self.blocks], self.block
        )

    def move_row(self, src: int, dst: int) -> None:
        for c in self.caches:
            c.move_row(src, dst)
        for x in self.blocks:
            x[dst] = x[src]

    def select_rows(self, index: torch.Tensor) -> None:
        for c in self.caches:
            c.select_rows(index)
        self.blocks = [x.index_select(0, index) for x in self.blocks]


# ---------------------------------------------------------------------------- compressed branch


def visible_blocks(start: int, t: int, block: int, n: int, device):
    """(T, n) boolean: block j is complete at query position p (j * l + l - 1 <= p)."""
    seen = (torch.arange(start, start + t, device=device) + 1) // block  # complete blocks per query
    return torch.arange(n, device=device)[None, :] < seen[:, None]


def block_probs(q_BGRTd, k_BGnd, start: int, block: int, scale: float) -> torch.Tensor:
    """p (B, G, R, T, n): softmax_j(q_t . k^cmp_j * scale) over the blocks complete at each query, in
    fp32 or wider; queries with no complete block get 0."""
    b, g, r, t, d = q_BGRTd.shape
    n = k_BGnd.shape[2]
    logits = torch.matmul(q_BGRTd.reshape(b, g, r * t, d), k_BGnd.transpose(-1, -2)).view(b, g, r, t, n)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    visible = visible_blocks(start, t, block, n, q_BGRTd.device)
    blind = ~visible.any(-1, keepdim=True)  # (T, 1): rows with every block masked would give NaN
    return logits.masked_fill(~(visible | blind), float("-inf")).softmax(-1).masked_fill(blind, 0.0)


def compressed_block_attention(
    q, k_blocks, v_blocks, start: int, block: int, scale: float, with_probs: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's compressed branch: o_t = sum_j p_tj v^cmp_j, p_t = softmax over the blocks complete at t
    (`block_probs`; o_t = 0 before the first block completes). q (B, H, T, d); k, v (B, G, n, .).

    Returns o (B, H, T, d_v) and p summed over each KV group's heads (B, G, T, n) in fp32, for the
    block selection (no gradient; (B, G, 0, n) without `with_probs`). The plain form holds p whole;
    kernels/nsa.py computes the same over chunks of queries and recomputes p in backward."""
    b, h, t, d = q.shape
    g, n = k_blocks.shape[1], k_blocks.shape[2]
    p = block_probs(q.reshape(b, g, h // g, t, d), k_blocks, start, block, scale)
    out = torch.matmul(p.to(v_blocks.dtype).flatten(2, 3), v_blocks).view(b, h, t, -1)
    probs = p.detach().sum(2).float() if with_probs else p.new_zeros(b, g, 0, n, dtype=torch.float32)
    return out, probs
