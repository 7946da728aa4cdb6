"""Distributed training on PyTorch's own engine: torchrun + DDP or FSDP2.

    torchrun --nproc-per-node N -m nanoseek train --dist.strategy=ddp|fsdp ...
    nanoseek train --nproc N ...            (the same, launched for you)

Process group: gloo on CPU, nccl when the run's device (`train.device`) is a GPU, each rank on
cuda:LOCAL_RANK. Each rank draws its own rows of the same
global batch (`BatchLoader(rank, world)`: the batch of step s is fixed by (seed, s), rank r takes
rows r*B..(r+1)*B), so per-rank batch B on W ranks trains exactly like batch W*B on one process:
    global batch = per-rank batch x ranks x accumulation steps; the schedule counts global tokens.
- ddp:  every rank holds the whole model; gradients are averaged by all-reduce during backward.
- fsdp: FSDP2 `fully_shard` on every block and on the root: parameters, gradients and optimizer
        moments are sharded across ranks and gathered per block for its forward/backward; optional
        activation checkpointing per block and a bf16 mixed-precision policy. MoE blocks are sharded
        like the rest (each rank holds a slice of every expert; use expert_parallel for whole experts).
- ddp + expert_parallel: as ddp, but each MoE layer's routed experts are split across the ranks and
        tokens travel to their experts by all-to-all (parallel/expert.py); DDP skips the
        expert weights, whose gradients already combine every rank's tokens.
MoE load counts are summed over ranks before the balancing-bias update, so the router bias stays
identical everywhere. Checkpoints hold full (gathered) state dicts keyed by parameter name, written
by rank 0 only, so a checkpoint from any world size resumes on any other (and in one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.device import resolve_device
from nanoseek.errors import NanoseekError
from nanoseek.parallel.expert import gather_full, local_slice, shard_experts


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    strategy: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(strategy: str, device: str = "cpu") -> DistContext:
    """Join the torchrun process group (if launched by torchrun); a single process otherwise.
    `device` is train.device ("auto", "cpu", "cuda", "cuda:N"): on a GPU each rank takes
    cuda:LOCAL_RANK and the group talks nccl, else gloo (one process may name its GPU, ranks may not)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    where = resolve_device(device, local, where="train.device")
    if world > 1 and strategy == "none":
        raise NanoseekError("launched with WORLD_SIZE > 1 but dist.strategy='none'; use --dist.strategy=ddp or fsdp")
    if world > 1 and where.type == "cuda" and ":" in device:
        raise NanoseekError(
            f"train.device={device!r} would put every rank on one GPU; under torchrun use "
            f"cuda or auto (local rank r takes GPU r)"
        )
    if where.type == "cuda":  # current device = the run's (CUDA RNG state, default streams, FSDP)
        torch.cuda.set_device(where)
    if world <= 1:
        return DistContext(strategy="none", device=where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), strategy, where)


def shutdown(ctx: DistContext):
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module, ctx: DistContext, mixed_precision: bool = False, expert_parallel: bool = False
) -> nn.Module:
    """The module the training step calls: DDP, FSDP2-sharded, or the model itself.

    (Activation checkpointing is the model's own `gradient_checkpointing` flag, so that parameter
    names stay the same for every strategy.)"""
    if expert_parallel:
        check_expert_parallel(model, ctx)
    if not ctx.enabled:
        return model
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if expert_parallel:
            sharded = shard_experts(model, ctx.rank, ctx.world)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # buffers (the router bias) are kept identical by the code that updates them (from the load
        # sync_expert_load summed over ranks); no need to broadcast rank 0's at every forward
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    if ctx.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # fully_shard's default mesh is torch's accelerator (cuda whenever one is visible) and it
        # moves the parameters there: pin it to train.device (cpu + gloo stays on the CPU)
        kwargs = {"mesh": init_device_mesh(ctx.device.type, (ctx.world,))}
        if mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, **kwargs)
        for module in model.mtp:
            fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise NanoseekError(f"dist.strategy={ctx.strategy!r}; choose one of: none, ddp, fsdp")


def check_expert_parallel(model: nn.Module, ctx: DistContext) -> None:
    config = model.config
    if config.ffn != "moe":
        raise NanoseekError(f"dist.expert_parallel needs an MoE model (model.ffn='moe'), got ffn={config.ffn!r}")
    if ctx.enabled and ctx.strategy != "ddp":
        raise NanoseekError(f"dist.expert_parallel works with dist.strategy='ddp', not {ctx.strategy!r}")
    if ctx.enabled and config.n_routed_experts % ctx.world:
        raise NanoseekError(
            f"dist.expert_parallel: n_routed_experts={config.n_routed_experts} must be "
            f"divisible by the {ctx.world} ranks"
        )


def is_expert_sharded(model: nn.Module) -> bool:
    return any(getattr(m, "expert_shard", None) is not None for m in model.modules())


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the global gradient: under expert parallelism the sharded expert
    gradients of all ranks count once each (sum of squares all-reduced), the replicated ones once."""
    if not is_expert_sharded(model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    sharded, replicated, group = [], [], None
    for m in model.modules():
        shard = getattr(m, "expert_shard", None)
        if shard is not None:
            sharded += [p for p in m.experts.parameters() if p.grad is not None]
            group = shard.group
    ids = {id(p) for p in sharded}
    replicated = [p for p in model.parameters() if p.grad is not None and id(p) not in ids]
    device = next(model.parameters()).device
    local = sum((p.grad.detach().float().pow(2).sum() for p in sharded), torch.zeros((), device=device))
    dist.all_reduce(local, group=group)  # in place: the two sums must not share a start tensor
    rest = sum((p.grad.detach().float().pow(2).sum() for p in replicated), torch.zeros((), device=device))
    total = (local + rest).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in sharded + replicated:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.world


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if it is true on one (stop requests, time budgets)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_expert_load(expert_load: torch.Tensor | None, ctx: DistContext) -> torch.Tensor | None:
    """The step's expert load (n_moe_layers, E), summed over ranks (in place) before the balancing-bias
    update, so every rank nudges the router bias alike."""
    if ctx.enabled and expert_load is not None:
        dist.all_reduce(expert_load)
    return expert_load


def barrier(ctx: DistContext):
    if ctx.enabled:
        dist.barrier()


# ------------------------------------------------------------------------------------ full state dicts


def _options(model: nn.Module | None = None):
    """Full state dicts; on rank 0 only (cpu_offload) except under expert parallelism, where
    every rank keeps its own experts' tensors until they are gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    everywhere = model is not None and is_expert_sharded(unwrap(model))
    return StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> full tensor (gathered from the shards under FSDP or EP); collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(model))
    return map_expert_tensors(state, unwrap(model), "gather")


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """Optimizer state keyed by parameter name (not position), full tensors; collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(model))
    if is_expert_sharded(unwrap(model)):
        state["state"] = {
            name: map_expert_tensors(per_param, unwrap(model), "gather", name)
            for name, per_param in state["state"].items()
        }
    return state


def local_model_state(model: nn.Module, full_state: dict) -> dict:
    """The inverse for loading: full expert tensors cut to this rank's shard (no-op without EP)."""
    return map_expert_tensors(full_state, unwrap(model), "slice")


def load_full_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict):
    """Put full state dicts back (into shards under FSDP or EP); every rank passes the same dicts."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    inner = unwrap(model)
    if is_expert_sharded(inner):
        model_state = map_expert_tensors(model_state, inner, "slice")
        optimizer_state = {
            **optimizer_state,
            "state": {
                name: map_expert_tensors(per_param, inner, "slice", name)
                for name, per_param in optimizer_state["state"].items()
            },
        }
    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())


def map_expert_tensors(state: dict, model: nn.Module, how: str, param_name: str | None = None) -> dict:
    """Gather (all ranks' shards -> full) or slice (full -> this rank's shard) the expert tensors
    of a state dict; `param_name` names the parameter when `state` is one parameter's optimizer state."""
    if not is_expert_sharded(model):
        return state

    fn = gather_full if how == "gather" else local_slice
    return {
        key: fn(param_name or key, value, model) if isinstance(value, torch.Tensor) else value
        for key, value in state.items()
    }
