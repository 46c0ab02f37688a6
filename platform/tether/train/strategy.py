"""How the loop is parallelised: a small Protocol, so FSDP can plug in beside DDP.

The loop only calls these methods; it never asks which strategy it runs under.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol

import torch
import torch.distributed as dist


class Strategy(Protocol):
    rank: int
    world: int
    device: torch.device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def no_sync(self, model: torch.nn.Module, enabled: bool): ...
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...
    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float | None) -> float: ...
    def replicas_agree(self, digest: str) -> bool: ...


class DataParallel:
    """DDP (gloo on CPU, NCCL on GPU) through Ray Train; world 1 wraps nothing."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP when world > 1

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        ddp = torch.nn.parallel.DistributedDataParallel
        return model.module if isinstance(model, ddp) else model

    def no_sync(self, model: torch.nn.Module, enabled: bool):
        """Skip the gradient all-reduce (all micro-batches but the last of a step)."""
        ddp = torch.nn.parallel.DistributedDataParallel
        return model.no_sync() if enabled and isinstance(model, ddp) else contextlib.nullcontext()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1 or not dist.is_initialized():
            return t
        # NCCL reduces CUDA tensors only; gloo is happy with CPU float64
        moved = t.to(self.device) if self.device.type == "cuda" else t.clone()
        dist.all_reduce(moved)
        return moved.cpu()

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf))

    def replicas_agree(self, digest: str) -> bool:
        """Do all replicas hold the same weights? Compares the weight hashes across ranks."""
        if self.world == 1 or not dist.is_initialized():
            return True
        value = int(digest[:15], 16)  # 60 bits of the sha256: fits an int64 exactly
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # equal everywhere ⟺ max == min
        return int(t[0]) == -int(t[1])
