"""Distributed training on PyTorch's own engine: torchrun + DDP or FSDP2.

    torchrun --nproc-per-node N -m nanoseek train --dist.strategy=ddp|fsdp ...
    nanoseek train --nproc N ...            (the same, launched for you)

Process group: gloo on CPU, nccl when CUDA is available. Each rank draws its own rows of the same
global batch (`BatchLoader(rank, world)`: the batch of step s is fixed by (seed, s), rank r takes
rows r*B..(r+1)*B), so per-rank batch B on W ranks trains exactly like batch W*B on one process:
    global batch = per-rank batch x ranks x accumulation steps; the schedule counts global tokens.
- ddp:  every rank holds the whole model; gradients are averaged by all-reduce during backward.
- fsdp: FSDP2 `fully_shard` on every block and on the root: parameters, gradients and optimizer
        moments are sharded across ranks and gathered per block for its forward/backward; optional
        activation checkpointing per block and a bf16 mixed-precision policy. Not MoE models yet:
        with MoE blocks the ranks hang in a collective (refused with a message).
MoE load counts are summed over ranks before the balancing-bias update, so the router bias stays
identical everywhere. Checkpoints hold full (gathered) state dicts keyed by parameter name, written
by rank 0 only, so a checkpoint from any world size resumes on any other (and in one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import NanoseekError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(strategy: str) -> DistContext:
    """Join the torchrun process group (if launched by torchrun); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(strategy="none")
    if strategy == "none":
        raise NanoseekError("launched with WORLD_SIZE > 1 but dist.strategy='none'; use --dist.strategy=ddp or fsdp")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, strategy)


def shutdown(ctx: DistContext):
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, mixed_precision: bool = False) -> nn.Module:
    """The module the training step calls: DDP, FSDP2-sharded, or the model itself.

    (Activation checkpointing is the model's own `gradient_checkpointing` flag, so that parameter
    names stay the same for every strategy.)"""
    if not ctx.enabled:
        return model
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        config = model.config
        if config.ffn == "moe":
            raise NanoseekError("dist.strategy=fsdp does not support MoE models yet (the ranks fall out of "
                                "step in a collective and hang); use --dist.strategy=ddp")
        kwargs = {}
        if mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, **kwargs)
        for module in model.mtp:
            fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise NanoseekError(f"dist.strategy={ctx.strategy!r}; choose one of: none, ddp, fsdp")


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / ctx.world


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if it is true on one (stop requests, time budgets)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_expert_load(model: nn.Module, ctx: DistContext):
    """Sum every MoE layer's token counts over ranks before the balancing-bias update."""
    if not ctx.enabled:
        return
    for name, buf in model.named_buffers():
        if name.endswith("tokens_per_expert"):
            dist.all_reduce(buf)


def barrier(ctx: DistContext):
    if ctx.enabled:
        dist.barrier()


# ------------------------------------------------------------------------------------ full state dicts


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> full tensor (gathered from the shards under FSDP); collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """Optimizer state keyed by parameter name (not position), full tensors; collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict):
    """Put full state dicts back (into shards under FSDP); every rank passes the same dicts."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())
