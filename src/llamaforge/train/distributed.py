"""One process or many: torchrun's environment, DDP/FSDP wrapping, and gathering full state dicts.

``torchrun --nproc_per_node N -m llamaforge.cli pretrain ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; the
trainer then joins a process group (gloo on CPU, nccl on CUDA) and wraps its loss module in
DistributedDataParallel ("ddp") or FSDP2's ``fully_shard`` ("fsdp", one shard group per block).
Without those variables everything runs in-process and these helpers are no-ops.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def setup(strategy: str = "ddp", device: str | None = None) -> DistContext:
    """Join torchrun's process group when launched by it; otherwise a single-process context."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    ctx = DistContext(rank, world, local, dev, strategy)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        ctx.initialized_here = True
        log.info("rank %d/%d joined (%s, %s)", rank, world, "nccl" if use_cuda else "gloo", strategy)
    return ctx


def wrap(module: nn.Module, ctx: DistContext, blocks: list[nn.Module] | None = None) -> nn.Module:
    """DDP or FSDP around the module the trainer calls; the module itself when single-process."""
    if not ctx.enabled:
        return module
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in blocks or []:
            fully_shard(block)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel as DDP
    kw: dict[str, Any] = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
    return DDP(module, **kw)


def no_sync(wrapped: nn.Module, ctx: DistContext, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if ctx.enabled and not last:
        if ctx.strategy == "ddp":
            return wrapped.no_sync()
        if hasattr(wrapped, "set_requires_gradient_sync"):
            wrapped.set_requires_gradient_sync(False)
            return nullcontext()
    if ctx.enabled and ctx.strategy == "fsdp" and hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(True)
    return nullcontext()


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(wrapped: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Unsharded state dict (on CPU); every rank must call it under FSDP."""
    if ctx.enabled and ctx.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(wrapped, options=_sd_options())
    inner = wrapped.module if hasattr(wrapped, "module") and ctx.enabled else wrapped
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(wrapped, optimizer, options=_sd_options())


def load_full_states(wrapped: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                     optim_state: dict[str, Any], ctx: DistContext) -> None:
    """Inverse of full_model_state/full_optimizer_state (model_state may hold only the trained tensors)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(wrapped, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=_sd_options(strict=False))
