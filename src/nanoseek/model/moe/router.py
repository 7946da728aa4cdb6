"""The DeepSeekMoE router: which K of the E routed experts each token goes to, and with what weight.

Logits in fp32, s = affinity:
    V2 (softmax):  s = softmax(x W_g^T); greedy top-K of s, or group-limited: keep the `topk_group`
                   groups with the highest max score, zero the rest, then top-K.
    V3 (sigmoid, noaux_tc):  s = sigmoid(x W_g^T); selection uses s + b (per-expert bias b);
                   group score = sum of the top-2 biased scores in the group, keep `topk_group`
                   groups (others -inf), then top-K.  Weights come from the UNBIASED s.
    V4 (sqrtsoftplus):  s = sqrt(softplus(x W_g^T)); top-K of s + b, no groups.  Its first
                   `num_hash_layers` MoE layers choose by a fixed table instead: TopK = tid2eid[token id].
    w = s_TopK (/ sum, if norm_topk_prob) * routed_scaling_factor

Names follow Hugging Face: `gate.weight` [E, D], `gate.e_score_correction_bias` [E].

    >>> router = Router(ModelConfig.from_preset("deepseek-v3-tiny"))
    >>> idx_NK, w_NK, scores_NE = router(torch.randn(5, 64))
    >>> idx_NK.shape, scores_NE.shape
    (torch.Size([5, 2]), torch.Size([5, 4]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


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
            self.register_buffer("tid2eid", torch.rand(config.vocab_size, e).argsort(-1)[:, : self.top_k].contiguous())
        elif self.method == "noaux_tc":  # the balancing bias exists only where it steers selection
            self.register_buffer("e_score_correction_bias", torch.zeros(e))

    def scores(self, x_ND: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_ND.device.type, enabled=False):  # autocast would make this product bf16
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
