"""DeepSeekMoE: shared experts plus fine-grained routed experts, with auxiliary-loss-free balancing.

    y = SharedMLP(x) + sum_{e in TopK(x)} w_e * Expert_e(x),    Expert_e(x) = W2_e (SiLU(W1_e x) * W3_e x)

Router (model/moe/router.py): TopK and the weights w from the affinities s of x to the experts
(softmax, sigmoid with a balancing bias b used only for the choice, or V4's sqrt-softplus / hash table).

Auxiliary-loss-free balancing (V3): after each optimizer step, b_e += gamma * sign(mean_load - load_e),
so an overloaded expert gets chosen less. b is a buffer, never trained by the optimizer. The load is
what the training forward returned (a training forward appends each layer's (E,) token counts to its
`SideOutputs`); the trainer sums it over micro-batches and ranks and calls `update_balance_bias`.
Optional sequence-wise balance loss: alpha * sum_e f_e P_e with f_e = E/(K T) * #tokens of the
sequence routed to e and P_e = mean_t s'_{e,t} (s' = scores normalized per token).

Dispatch is vectorized: the T*K (token, expert) pairs are sorted by expert and the routed experts
(model/moe/experts.py) run each expert's rows together; the outputs return to (token, slot) order
by the inverse permutation and each token's K rows are summed.
For a handful of tokens (decoding: T*K <= E, or any inference under torch.compile) each pair instead
gathers its expert's weights and runs one batched matmul: no sort, no host sync, static shapes (so a
compiled decode step stays one graph).

Names follow Hugging Face in memory: `gate` (the router), `experts`, `shared_experts`.

    >>> moe = MoE(ModelConfig.from_preset("deepseek-v3-tiny"))
    >>> moe(torch.randn(2, 3, 64)).shape
    torch.Size([2, 3, 64])
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.ffn import SwiGLU
from nanoseek.model.moe.experts import RoutedExperts
from nanoseek.model.moe.router import Router
from nanoseek.model.side_outputs import SideOutputs

PER_PAIR_MAX_COMPILED = 64  # compiled decode steps gather per-pair weights up to this many pairs


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

    def forward(
        self, x_BTD: torch.Tensor, token_ids: torch.Tensor | None = None, side: SideOutputs | None = None
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); `token_ids` (B, T): the tokens of x, which hash routing needs.
        `side` (given in training): gets this layer's load (E,) and, with aux_loss_alpha, its balance loss."""
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(-1, d)
        idx_NK, w_NK, scores_NE = self.gate(x_ND, token_ids)
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
            # the experts gather the copies themselves and apply the router weights (GroupedExperts
            # then keeps no (N k, D) tensor for backward), then back to (token, slot) order and a
            # plain sum over the k copies
            y_MD = self.experts(x_ND, counts_E, w_NK.flatten().index_select(0, order_M), rows_M)
            out_ND = y_MD.index_select(0, slot_M).view(-1, self.top_k, d).sum(1)
        else:  # expert parallel: the weights stay here; one bmm sums each token's k weighted outputs
            x_MD = x_ND.index_select(0, rows_M)
            y_MD = self.remote_experts(x_MD, counts_E)
            y_NKD = y_MD.index_select(0, slot_M).view(-1, self.top_k, d)
            out_ND = torch.bmm(w_NK[:, None, :].to(y_NKD.dtype), y_NKD)[:, 0]
        if self.shared_experts is not None:
            out_ND = out_ND + self.shared_experts(x_ND)
        if side is not None:
            side.expert_loads.append(counts_E.detach())
            if self.aux_alpha:
                side.balance_losses.append(self.sequence_balance_loss(scores_NE, idx_NK, b, t))
        return out_ND.view(b, t, d).to(x_BTD.dtype)

    def sequence_balance_loss(self, scores_NE, idx_NK, b: int, t: int) -> torch.Tensor:
        """alpha * sum_e f_e P_e per sequence, averaged over the batch."""
        e, k = self.n_experts, self.top_k
        s_BTE = (scores_NE / scores_NE.sum(-1, keepdim=True)).view(b, t, e)
        hits_BE = torch.zeros(b, e, device=scores_NE.device).scatter_add_(
            1, idx_NK.view(b, t * k), torch.ones(b, t * k, device=scores_NE.device)
        )
        f_BE = hits_BE * e / (k * t)
        return self.aux_alpha * (f_BE * s_BTE.mean(1)).sum(-1).mean()

    @torch.no_grad()
    def update_balance_bias(self, load_E: torch.Tensor, update: bool = True) -> dict:
        """b_e += gamma * sign(mean load - load_e) from the token counts load_E (E,) of a step; returns
        their statistics ({} when no token was routed). `update=False` only reads the load."""
        load = load_E.float()
        total = load.sum()
        if not total > 0:
            return {}
        mean = load.mean()
        if self.balance_bias and self.gamma and update:
            self.gate.e_score_correction_bias += self.gamma * torch.sign(mean - load)
        return {"max_over_mean": (load.max() / mean).item(), "load": (load / total).tolist()}
