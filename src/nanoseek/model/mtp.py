"""Multi-token prediction (MTP, DeepSeek-V3): D sequential modules predict tokens further ahead.

For depth k = 1..D and position i (h^0 = the main model's last hidden state):
    h'_i  = W_eh [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]      (embedding first, as checkpoints store it)
    h^k   = Block_k(h')                                             (a full decoder layer)
    P^k_i = softmax(Head(RMSNorm(h^k_i)))   predicts t_{i+1+k}
    L_MTP = (lambda / D) * sum_k CE(P^k, t_{.+1+k})
The embedding and the output head are shared with the main model. At inference the modules are
optional: they can draft tokens for self-speculative decoding.

Names follow the checkpoints: `enorm`, `hnorm`, `eh_proj`, the block's own keys, `shared_head.norm`.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, block_cls):
        super().__init__()
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block_cls(config, layer)
        self.shared_head = SharedHead(config)

    def forward(
        self, h_prev_BTD: torch.Tensor, emb_next_BTD: torch.Tensor, rope, cache=None, start: int = 0, side=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h^k, RMSNorm_head(h^k)): the state the next depth reads and the input of the shared head.

        Both come out of forward so that every parameter is used inside it (FSDP gathers a module's
        parameters only for its forward). `side` (training) collects what the block's layers report."""
        joined = torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1)
        h_BTD = self.block(self.eh_proj(joined), rope, cache, start, side=side)
        return h_BTD, self.shared_head.norm(h_BTD)
