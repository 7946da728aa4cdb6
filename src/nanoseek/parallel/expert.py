"""Expert parallelism: the routed experts of every MoE layer sharded across ranks.

With W ranks and E routed experts, rank r holds experts r*E/W .. (r+1)*E/W - 1 (E divisible by W);
the router, shared experts, attention and everything else stay replicated (and DDP averages their
gradients). A forward on rank r, for its own tokens:

    route locally; sort the (token, expert) pairs by expert                (as without EP)
    all-to-all #1: how many rows each rank sends to each expert of each other rank
    all-to-all #2: the token rows, chunk j to the rank that owns its experts
    grouped matmul over the received rows, re-sorted by local expert
    all-to-all #3: the expert outputs back to the ranks their tokens came from
    weight by the router and scatter-add into the tokens                   (as without EP)

The row all-to-alls are differentiable (torch.distributed.nn.functional.all_to_all_single), so the
backward sends gradients along the same paths in reverse. An expert on rank r then holds
sum_s dL_s/dW over the batches of all ranks s; a gradient hook divides it by W, so every parameter
gets the gradient of the mean loss, exactly like one process with the global batch. The exchange
runs on its own process group so that it never interleaves with DDP's gradient all-reduces.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.model.moe import MoE


class ExpertShard:
    """Which experts this rank owns, and the group that exchanges tokens."""

    def __init__(self, group, rank: int, world: int, n_experts: int):
        if n_experts % world:
            raise ValueError(f"n_routed_experts={n_experts} is not divisible by {world} ranks")
        self.group, self.rank, self.world = group, rank, world
        self.local = n_experts // world
        self.first = rank * self.local

    def all_to_all_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts_E (E,) rows this rank sends per expert -> (W, E_local) rows it receives."""
        received = torch.empty_like(counts_E)
        dist.all_to_all_single(received, counts_E, group=self.group)
        return received.view(self.world, self.local)

    def exchange(self, x: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single

        out = x.new_empty((sum(receive), *x.shape[1:]))
        return all_to_all_single(out, x.contiguous(), receive, send, group=self.group)


def run_sharded_experts(
    experts: nn.Module, shard: ExpertShard, x_MD: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """Expert outputs for the rows x_MD (sorted by global expert id, `counts_E` per expert)."""
    received_WL = shard.all_to_all_counts(counts_E)
    send = counts_E.view(shard.world, shard.local).sum(1).tolist()
    receive = received_WL.sum(1).tolist()
    x_RD = shard.exchange(x_MD, send, receive)  # grouped by source rank, then by local expert
    local_expert_R = torch.repeat_interleave(
        torch.arange(shard.local, device=x_MD.device).repeat(shard.world), received_WL.flatten()
    )
    by_expert = local_expert_R.argsort(stable=True)
    y_RD = experts(x_RD[by_expert], received_WL.sum(0))
    y_RD = y_RD[by_expert.argsort()]  # back to (source rank, expert) order
    return shard.exchange(y_RD, receive, send)


def shard_experts(model: nn.Module, rank: int, world: int) -> list[str]:
    """Keep this rank's slice of every MoE layer's experts; return the sharded parameter names."""
    group = dist.new_group(list(range(world)))
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            shard = ExpertShard(group, rank, world, module.n_experts)
            module.expert_shard = shard
            module.remote_experts = partial(run_sharded_experts, module.experts, shard)
            for pname, param in list(module.experts.named_parameters(recurse=False)):
                local = nn.Parameter(param.data[shard.first : shard.first + shard.local].clone())
                local.register_hook(lambda g, w=world: g / w)
                setattr(module.experts, pname, local)
                names.append(f"{name}.experts.{pname}")
    return names


def local_slice(name: str, tensor: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The part of a full expert tensor (E, ...) that this rank holds; other tensors unchanged."""
    module = model.get_submodule(name.rsplit(".experts.", 1)[0]) if ".experts." in name else None
    shard = getattr(module, "expert_shard", None)
    if shard is None or tensor.dim() == 0:
        return tensor
    return tensor[shard.first : shard.first + shard.local]


def gather_full(name: str, tensor: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """All ranks' shards of an expert tensor, concatenated in expert order (collective)."""
    module = model.get_submodule(name.rsplit(".experts.", 1)[0]) if ".experts." in name else None
    shard = getattr(module, "expert_shard", None)
    if shard is None or tensor.dim() == 0:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(shard.world)]
    dist.all_gather(parts, tensor.contiguous(), group=shard.group)
    return torch.cat(parts)
