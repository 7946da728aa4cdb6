"""What the layers of one training forward report besides their output.

`Transformer.forward` makes one `SideOutputs` per training forward and passes it down, block by
block, to the layers that report something; each appends its own entry, so the lists are in layer
order (the blocks, then the MTP blocks). The Transformer turns them into its output: the losses
into `ModelOutput.aux`, the loads into `ModelOutput.expert_load`. Nothing is kept on the modules,
so a forward's side outputs are exactly the ones it returns (also under activation checkpointing,
whose recomputation in backward appends to a collector nobody reads any more).

    balance_losses  MoE: alpha * sum_e f_e P_e, the sequence-wise balance loss (model/moe/moe.py)
    expert_loads    MoE: (E,) how many token copies each routed expert received
    index_losses    DSA / V4 CSA: the lightning indexer's distillation KL (model/attention/dsa.py)

    >>> side = SideOutputs()
    >>> side.expert_loads.append(torch.tensor([3, 1]))
    >>> len(side.expert_loads), side.balance_losses
    (1, [])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SideOutputs:
    balance_losses: list[torch.Tensor] = field(default_factory=list)
    expert_loads: list[torch.Tensor] = field(default_factory=list)
    index_losses: list[torch.Tensor] = field(default_factory=list)
