"""How the loop is parallelised: a small Protocol, so FSDP plugs in beside DDP.

The loop only calls these methods; it never asks which strategy it runs under.

- ``DataParallel`` (DDP): every worker holds all of θ, θ*, gradients and Adam state.
- ``FullySharded`` (FSDP2): each worker holds 1/world of them, θ* included; a block's full
  weights exist only while it computes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp")


class Strategy(Protocol):
    rank: int
    world: int
    device: torch.device
    sharded: bool  # each rank holds a part of θ (collectives in forward: all ranks run it)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def no_sync(self, model: torch.nn.Module, enabled: bool): ...
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...
    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float | None) -> float: ...
    def replicas_agree(self, digest: str) -> bool: ...
    def full_model(
        self, model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]
    ) -> torch.nn.Module | None: ...


def make_strategy(name: str, rank: int, world: int, device: torch.device, precision: str):
    if name == "fsdp":
        return FullySharded(rank, world, device, precision)
    return DataParallel(rank, world, device)


class DataParallel:
    """DDP (gloo on CPU, NCCL on GPU) through Ray Train; world 1 wraps nothing."""

    sharded = False

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # every replica holds all of θ

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
        return all_reduce_sum(t, self.world, self.device)

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

    def full_model(self, model, rebuild):
        """The trained model, whole, on rank 0 (for the export); None on the other ranks."""
        return self.unwrap(model) if self.rank == 0 else None


class FullySharded:
    """PyTorch FSDP2: ``fully_shard`` on every transformer block, then on the root, over an
    explicit 1-D device mesh (gloo on CPU, NCCL on GPU).

    Not Ray's ``prepare_model(parallel_strategy="fsdp")``: in Ray 2.60 that wraps FSDP1 and
    refuses CPU. Parameters become DTensors sharded on dim 0; the loop and the anchor work on
    their local shards (``tether.anchor.local_part``), so θ* is sharded exactly like θ.
    """

    sharded = True

    def __init__(self, rank: int, world: int, device: torch.device, precision: str = "fp32"):
        self.rank, self.world, self.device = rank, world, device
        self.precision = precision

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        # bf16 compute and all-gathers, fp32 gradient reduction and master weights (GPU)
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16-mixed"
            else MixedPrecisionPolicy()
        )
        for block in sharding_units(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings, head, norms
        # transformers' generate() then keeps every rank stepping until all have finished
        # (synced_gpus): a rank that stopped early would leave the others' all-gathers waiting
        model._is_fsdp_managed_module = True
        return model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # sharded in place by shard()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def no_sync(self, model: torch.nn.Module, enabled: bool):
        """Accumulate unreduced gradients on all micro-batches but the last of a step."""
        if not enabled:
            return contextlib.nullcontext()
        return _gradient_sync_off(model)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.world, self.device)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        # the norm of sharded gradients is a DTensor: its value is all-reduced on demand
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def replicas_agree(self, digest: str) -> bool:
        return True  # no replicas: each rank holds different shards

    def full_model(self, model, rebuild):
        """Gather the full state dict to rank 0's CPU (every rank takes part) and load it into
        a fresh, unsharded copy of the model there; None on the other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.rank != 0:
            return None
        whole = rebuild()
        whole.load_state_dict(full)
        return whole


def sharding_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: the classes the model says must not be split
    (transformers' ``_no_split_modules``: LlamaDecoderLayer, BertLayer, ...), else the
    entries of its largest ModuleList. Never nested: a unit inside a unit is left to it."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units: list[torch.nn.Module] = []
    for module in model.modules():
        if module is not model and type(module).__name__ in names:
            if not any(_contains(u, module) for u in units):
                units.append(module)
    if units:
        return units
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


@contextlib.contextmanager
def _gradient_sync_off(model: torch.nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce_sum(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    if world == 1 or not dist.is_initialized():
        return t
    # NCCL reduces CUDA tensors only; gloo is happy with CPU float64
    moved = t.to(device) if device.type == "cuda" else t.clone()
    dist.all_reduce(moved)
    return moved.cpu()
