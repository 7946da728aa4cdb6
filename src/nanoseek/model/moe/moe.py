"""DeepSeekMoE: shared experts plus fine-grained routed experts, with auxiliary-loss-free balancing.

    y = SharedMLP(x) + sum_{e in TopK(x)} w_e * Expert_e(x),    Expert_e(x) = W2_e (SiLU(W1_e x) * W3_e x)

Router (logits in fp32, s = affinity):
    V2 (softmax):  s = softmax(x W_g^T); greedy top-K of s, or group-limited: keep the `topk_group`
                   groups with the highest max score, zero the rest, then top-K.
    V3 (sigmoid, noaux_tc):  s = sigmoid(x W_g^T); selection uses s + b (per-expert bias b);
                   group score = sum of the top-2 biased scores in the group, keep `topk_group`
                   groups (others -inf), then top-K.  Weights come from the UNBIASED s.
    V4 (sqrtsoftplus):  s = sqrt(softplus(x W_g^T)); top-K of s + b, no groups.  Its first
                   `num_hash_layers` MoE layers choose by a fixed table instead: TopK = tid2eid[token id].
    w = s_TopK (/ sum, if norm_topk_prob) * routed_scaling_factor

Auxiliary-loss-free balancing (V3): after each optimizer step, b_e += gamma * sign(mean_load - load_e),
so an overloaded expert gets chosen less. b is a buffer, never trained by the optimizer.
Optional sequence-wise balance loss: alpha * sum_e f_e P_e with f_e = E/(K T) * #tokens of the
sequence routed to e and P_e = mean_t s'_{e,t} (s' = scores normalized per token).

Dispatch is vectorized: the T*K (token, expert) pairs are sorted by expert and every expert's tokens
go through one grouped matmul (`torch._grouped_mm` with offsets; a per-expert matmul fallback); the
outputs return to (token, slot) order by the inverse permutation and each token's K rows are summed
with its weights as one batched (1 x K) @ (K x D) product.
For a handful of tokens (decoding: T*K <= E, or any inference under torch.compile) each pair instead
gathers its expert's weights and runs one batched matmul: no sort, no host sync, static shapes (so a
compiled decode step stays one graph).

Names follow Hugging Face in memory: `gate.weight` [E, D], `gate.e_score_correction_bias` [E],
`experts.gate_up_proj` [E, 2I, D] (gate rows first), `experts.down_proj` [E, D, I], `shared_experts`.

    >>> moe = MoE(ModelConfig.from_preset("deepseek-v3-tiny"))
    >>> moe(torch.randn(2, 3, 64)).shape
    torch.Size([2, 3, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.device import compute_dtype
from nanoseek.model.ffn import SwiGLU, swiglu, swiglu_down


PER_PAIR_MAX_COMPILED = 64  # compiled decode steps gather per-pair weights up to this many pairs


class Router(nn.Module):
    def __init__(self, config: ModelConfig, hash_routing: bool = False):
        super().__init__()
        e = config.n_routed_experts
        self.n_experts, self.top_k = e, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring, self.method = config.scoring_func, config.topk_method
        self.normalize, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(e, config.hidden_size))
        self.hash_routing = hash_routing
        if hash_routing:  # a fixed random table of distinct experts per token id (never trained)
            self.register_buffer("tid2eid", torch.rand(config.vocab_size, e).argsort(-1)[:, :self.top_k].contiguous())
        elif self.method == "noaux_tc":  # the balancing bias exists only where it steers selection
            self.register_buffer("e_score_correction_bias", torch.zeros(e))

    def scores(self, x_ND: torch.Tensor) -> torch.Tensor:
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        if self.scoring == "sqrtsoftplus":
            return F.softplus(logits_NE).sqrt()
        return logits_NE.sigmoid() if self.scoring == "sigmoid" else logits_NE.softmax(-1)

    def select(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """Indices (N, K) of the chosen experts; the bias (noaux_tc) influences only this choice."""
        if self.method == "noaux_tc":
            choice_NE = scores_NE + self.e_score_correction_bias
        else:
            choice_NE = scores_NE
        if self.n_group > 1 and self.method != "greedy":
            n = choice_NE.shape[0]
            grouped_NGX = choice_NE.view(n, self.n_group, -1)
            if self.method == "noaux_tc":
                group_NG = grouped_NGX.topk(min(2, grouped_NGX.shape[-1]), dim=-1).values.sum(-1)
                fill = float("-inf")
            else:
                group_NG = grouped_NGX.amax(-1)
                fill = 0.0
            keep_NG = group_NG.topk(self.topk_group, dim=-1).indices
            mask_NG = torch.ones_like(group_NG, dtype=torch.bool).scatter_(1, keep_NG, False)
            choice_NE = grouped_NGX.masked_fill(mask_NG[..., None], fill).view(n, -1)
        return choice_NE.topk(self.top_k, dim=-1, sorted=False).indices

    def forward(self, x_ND: torch.Tensor, token_ids: torch.Tensor | None = None):
        scores_NE = self.scores(x_ND)
        if self.hash_routing:
            if token_ids is None:
                raise ValueError("a hash-routed MoE layer needs the token ids (Transformer.forward passes them)")
            idx_NK = self.tid2eid[token_ids.reshape(-1)]
        else:
            idx_NK = self.select(scores_NE)
        w_NK = scores_NE.gather(1, idx_NK)
        if self.normalize:
            w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
        return idx_NK, w_NK * self.scaling, scores_NE


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, applied with a grouped matmul."""

    def per_pair(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """sum_k w_nk Expert_{idx_nk}(x_n) with each pair's expert weights gathered (few tokens)."""
        n, k = idx_NK.shape
        dtype = compute_dtype(x_ND)
        idx_P = idx_NK.flatten()
        # index_select copies the P experts' weights (~6x faster than w[idx] on CPU) and each
        # pair is a row vector times W^T (a column-vector bmm is ~6x slower here)
        up_PXD = torch.index_select(self.gate_up_proj, 0, idx_P).to(dtype)
        down_PDI = torch.index_select(self.down_proj, 0, idx_P).to(dtype)
        x_P1D = x_ND.to(dtype).repeat_interleave(k, dim=0)[:, None, :]
        h_P1X = torch.bmm(x_P1D, up_PXD.transpose(1, 2))
        gate_P1I, up_P1I = h_P1X.split(self.hidden, dim=-1)
        y_PD = torch.bmm(swiglu(gate_P1I, up_P1I, self.limit), down_PDI.transpose(1, 2))[:, 0]
        return (y_PD.view(n, k, -1) * w_NK[..., None].to(dtype)).sum(1)

    def __init__(self, n_experts: int, dim: int, hidden: int, limit: float | None = None):
        super().__init__()
        self.hidden, self.limit = hidden, limit
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x: torch.Tensor, counts_E: torch.Tensor, w_M: torch.Tensor | None = None,
                rows_M: torch.Tensor | None = None) -> torch.Tensor:
        """Expert outputs (M, D) for the M token copies sorted by expert. x: the copies (M, D), or
        with `rows_M` the tokens (N, D) and the token of each copy (the copies x[rows_M] are then
        gathered inside the first grouped matmul and not kept for backward); counts_E: how many
        copies each expert owns; w_M: the router's weight of each copy, applied to the expert's
        hidden (None: unweighted)."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        aligned = all(n * x.element_size() % 16 == 0 for n in x.shape[1:] + (self.hidden,))  # grouped_mm's strides
        fused = self.limit is None and aligned and has_grouped_mm(x) and (rows_M is None or len(rows_M) > 0)
        if fused:  # two Functions that keep neither the gathered copies nor the hidden h for backward
            offsets = counts_E.cumsum(0).to(torch.int32)
            if rows_M is None:
                h_MX = grouped_matmul(x, self.gate_up_proj.to(dtype), counts_E)
            else:
                h_MX = GatheredGroupedMM.apply(x, rows_M, self.gate_up_proj.to(dtype), offsets)
            return swiglu_down(h_MX, self.down_proj.to(dtype), offsets=offsets, row_scale=w_M)
        x_MD = x if rows_M is None else x.index_select(0, rows_M)
        h_MX = grouped_matmul(x_MD, self.gate_up_proj.to(dtype), counts_E)
        gate_MI, up_MI = h_MX.split(self.hidden, dim=-1)
        y_MD = grouped_matmul(swiglu(gate_MI, up_MI, self.limit), self.down_proj.to(dtype), counts_E)
        return y_MD if w_M is None else y_MD * w_M[:, None].to(dtype)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GatheredGroupedMM(torch.autograd.Function):
    """y = x[rows] W_e^T for the rows of each expert e (offsets as torch._grouped_mm's), keeping x
    and the row ids for backward instead of the gathered copies (k per token):
        dW_e = dy_e^T x[rows]_e (re-gathered),   dx = index_add over rows of dy W_e."""

    @staticmethod
    def forward(ctx, x_ND, rows_M, w_EOK, offsets):
        ctx.save_for_backward(x_ND, rows_M, w_EOK, offsets)
        return torch._grouped_mm(x_ND.index_select(0, rows_M), w_EOK.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x_ND, rows_M, w_EOK, offsets = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[2]:
            dw = torch._grouped_mm(dy.T, x_ND.index_select(0, rows_M).to(dy.dtype), offs=offsets)
        if ctx.needs_input_grad[0]:
            dx_MK = torch._grouped_mm(dy, w_EOK.to(dy.dtype), offs=offsets)
            dx = torch.zeros_like(x_ND).index_add_(0, rows_M, dx_MK.to(x_ND.dtype))
        return dx, None, dw, None


def has_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm can run here, called directly: fp32/bf16/fp16 rows on CPU or CUDA (and under
    torch.compile, whose fake-tensor rule accepts only bf16, bf16 only; `grouped_matmul` then goes
    through the opaque `nanoseek::grouped_mm` op instead)."""
    return (hasattr(torch, "_grouped_mm") and x.device.type in ("cpu", "cuda") and x.shape[0] > 0
            and x.dtype in GROUPED_MM_DTYPES and not (torch.compiler.is_compiling() and x.dtype != torch.bfloat16))


def grouped_matmul(x_MK: torch.Tensor, w_EOK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of x owned by expert e times w[e]^T, for all experts at once."""
    if x_MK.shape[0] == 0:  # an empty product, not fresh zeros: keeps x and w in the autograd graph
        return x_MK @ w_EOK[0].T
    offsets = counts_E.cumsum(0).to(torch.int32)
    if has_grouped_mm(x_MK):
        try:
            return torch._grouped_mm(x_MK, w_EOK.transpose(1, 2), offs=offsets)
        except (RuntimeError, NotImplementedError):
            pass
    elif torch.compiler.is_compiling() and opaque_grouped_mm_fits(x_MK, w_EOK):
        return opaque_grouped_mm(x_MK, w_EOK.transpose(1, 2), offsets)  # one graph in fp32 too
    pieces = x_MK.split(counts_E.tolist())
    return torch.cat([p @ w_EOK[e].T for e, p in enumerate(pieces)])


def opaque_grouped_mm_fits(x_MK: torch.Tensor, w_EOK: torch.Tensor) -> bool:
    """`opaque_grouped_mm` takes these: fp32/bf16 on CPU or CUDA, rows and outputs 16-byte aligned
    (torch's kernels need it, and its CUDA output pads unaligned rows, which the fake rule does not)."""
    return (hasattr(torch, "_grouped_mm") and x_MK.device.type in ("cpu", "cuda")
            and x_MK.dtype in (torch.float32, torch.bfloat16)
            and all(n * x_MK.element_size() % 16 == 0 for n in (x_MK.shape[1], w_EOK.shape[1])))


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def opaque_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x (M, K), w (E, K, N), offs) -> (M, N) as an op torch.compile does not look
    into: its own fake-tensor rule, unlike torch's, takes fp32, so a compiled fp32 MoE step keeps the
    experts in its graph (torch's rule would break it at a host copy of the counts)."""
    return torch._grouped_mm(x.contiguous(), w, offs=offsets)  # x may be a broadcast gradient


@opaque_grouped_mm.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("nanoseek::grouped_mm_weight_grad", mutates_args=())
def opaque_grouped_mm_weight_grad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = x_e^T dy_e over each expert's rows: (E, K, N)."""
    return torch._grouped_mm(x.T, dy.contiguous(), offs=offsets)


@opaque_grouped_mm_weight_grad.register_fake
def _(x, dy, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    dx = opaque_grouped_mm(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    dw = opaque_grouped_mm_weight_grad(x, dy, offsets) if ctx.needs_input_grad[1] else None
    return dx, dw, None


opaque_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def expert_counts(idx_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Copies routed to each expert (E,): a scatter-add into E slots, whose shape, unlike bincount's,
    does not depend on the ids (so torch.compile keeps the layer in one graph)."""
    flat = idx_NK.flatten()
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, hash_routing: bool = False):
        super().__init__()
        d = config.hidden_size
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.gamma = config.bias_update_speed
        self.aux_alpha = config.aux_loss_alpha
        self.balance_bias = config.topk_method == "noaux_tc" and not hash_routing
        self.gate = Router(config, hash_routing)
        limit = config.swiglu_limit
        self.experts = RoutedExperts(config.n_routed_experts, d, config.moe_intermediate_size, limit)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = SwiGLU(d, shared, limit=limit) if shared else None
        self.token_ids: torch.Tensor | None = None  # hash routing: the ids of the tokens in x (set per forward)
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        # expert parallelism (parallel/expert.py) installs here a function (x_MD sorted by expert,
        # counts_E) -> y_MD that runs the routed experts on the ranks that hold them
        self.remote_experts = None

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.normal_(self.gate.weight, 0.0, std)
        nn.init.normal_(self.experts.gate_up_proj, 0.0, std)
        nn.init.normal_(self.experts.down_proj, 0.0, out_std)

    def inactive_params(self) -> int:
        """Parameters of the routed experts a token does not use (of the whole layer, under EP too)."""
        per_expert = self.experts.gate_up_proj[0].numel() + self.experts.down_proj[0].numel()
        return (self.n_experts - self.top_k) * per_expert

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(-1, d)
        idx_NK, w_NK, scores_NE = self.gate(x_ND, self.token_ids)
        pairs = idx_NK.numel()
        few = pairs <= self.n_experts or (torch.compiler.is_compiling() and pairs <= PER_PAIR_MAX_COMPILED)
        if self.remote_experts is None and few and not self.training:
            out_ND = self.experts.per_pair(x_ND, idx_NK, w_NK)  # decoding: a few tokens
            if self.shared_experts is not None:
                out_ND = out_ND + self.shared_experts(x_ND)
            return out_ND.view(b, t, d).to(x_BTD.dtype)
        counts_E = expert_counts(idx_NK, self.n_experts)
        order_M = idx_NK.flatten().argsort(stable=True)
        rows_M = order_M // self.top_k  # the token of each copy, copies sorted by expert
        slot_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(len(order_M), device=order_M.device))
        if self.remote_experts is None:
            # the experts gather the copies themselves and the router weights scale each copy's hidden
            # inside them (no (N k, D) tensor is kept for backward), then back to (token, slot) order
            # and a plain sum over the k copies
            y_MD = self.experts(x_ND, counts_E, w_NK.flatten().index_select(0, order_M), rows_M)
            out_ND = y_MD.index_select(0, slot_M).view(-1, self.top_k, d).sum(1)
        else:  # expert parallel: the weights stay here; one bmm sums each token's k weighted outputs
            x_MD = x_ND.index_select(0, rows_M)
            y_MD = self.remote_experts(x_MD, counts_E)
            y_NKD = y_MD.index_select(0, slot_M).view(-1, self.top_k, d)
            out_ND = torch.bmm(w_NK[:, None, :].to(y_NKD.dtype), y_NKD)[:, 0]
        if self.shared_experts is not None:
            out_ND = out_ND + self.shared_experts(x_ND)
        if self.training:
            self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
            self.aux_loss = self.sequence_balance_loss(scores_NE, idx_NK, b, t) if self.aux_alpha else None
        return out_ND.view(b, t, d).to(x_BTD.dtype)

    def sequence_balance_loss(self, scores_NE, idx_NK, b: int, t: int) -> torch.Tensor:
        """alpha * sum_e f_e P_e per sequence, averaged over the batch."""
        e, k = self.n_experts, self.top_k
        s_BTE = (scores_NE / scores_NE.sum(-1, keepdim=True)).view(b, t, e)
        hits_BE = torch.zeros(b, e, device=scores_NE.device).scatter_add_(
            1, idx_NK.view(b, t * k), torch.ones(b, t * k, device=scores_NE.device))
        f_BE = hits_BE * e / (k * t)
        return self.aux_alpha * (f_BE * s_BTE.mean(1)).sum(-1).mean()

    @torch.no_grad()
    def update_balance_bias(self, update: bool = True) -> dict:
        """b_e += gamma * sign(mean load - load_e); returns load statistics of the last step."""
        load = self.tokens_per_expert
        total = load.sum()
        stats = {}
        if total > 0:
            mean = load.mean()
            stats = {"max_over_mean": (load.max() / mean).item(), "load": (load / total).tolist()}
            if self.balance_bias and self.gamma and update:
                self.gate.e_score_correction_bias += self.gamma * torch.sign(mean - load)
        self.tokens_per_expert.zero_()
        return stats
