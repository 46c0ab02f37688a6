"""The anchored objective:  min_θ  L_fine(θ) + λ ‖θ − θ*‖²₂  (L2-SP).

θ* is a frozen copy of the pretrained weights the run started from. The penalty never goes
through autograd: its gradient is known in closed form, so we apply it directly to the
parameters' gradients (``coupled``) or as a decoupled pull on the parameters after the
optimizer step (``decoupled``), with fused multi-tensor ``torch._foreach_*`` kernels.

Pure torch, no Ray: usable from any training loop.

    anchor = build_anchor(named_params, lam=0.01, mode="coupled")
    ...  loss.backward()                      # DDP all-reduces the fine-tuning gradient
    add_anchor_grad_(anchor)                  # grad += 2λ(θ − θ*)   (coupled)
    optimizer.step()
    pull_toward_anchor_(anchor, lr)           # θ ← θ − lr·λ(θ − θ*)  (decoupled)

The two modes scale differently: the decoupled step is lr times the gradient of
(λ/2)‖θ − θ*‖², the coupled term the gradient of λ‖θ − θ*‖², and it then passes through
Adam's per-coordinate scaling. A decoupled λ is therefore not a coupled λ (see the README's
"Choosing λ").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

AnchorMode = Literal["coupled", "decoupled"]
ANCHOR_MODES: tuple[str, ...] = ("coupled", "decoupled")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Anchor:
    """Live parameters θ and their pretrained values θ*, aligned by position."""

    names: list[str]
    params: list[torch.Tensor]  # the model's own nn.Parameters (updated in place)
    targets: list[torch.Tensor]  # θ*, detached copies in the anchor dtype
    lam: float
    mode: AnchorMode
    # decoupled mode: the part of the pull that fp32 rounding has not applied yet (see
    # pull_toward_anchor_); empty in coupled mode
    residuals: list[torch.Tensor] = field(default_factory=list)
    # under FSDP the process group over which θ's shards are spread (drift sums are
    # all-reduced over it); None when every rank holds all of θ
    group: object | None = None

    @property
    def local_params(self) -> list[torch.Tensor]:
        """θ as this rank holds it: the parameters, or their local shards (views: updating
        them updates the parameters)."""
        return [local_part(p) for p in self.params]

    @property
    def theta_star_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.targets)

    @property
    def num_bytes(self) -> int:
        """Memory the anchor holds on this rank: θ*, plus the rounding residuals in decoupled
        mode (under FSDP only this rank's shards of both)."""
        return sum(t.numel() * t.element_size() for t in [*self.targets, *self.residuals])

    def carry(self) -> list[torch.Tensor]:
        """The pull that rounding has not applied yet (decoupled mode), for a checkpoint: a
        resumed run that dropped it would lose up to one rounding step per coordinate."""
        return list(self.residuals)

    def restore_carry(self, saved: list[torch.Tensor]) -> bool:
        """Put a checkpoint's carry back; False when it does not fit (other shards)."""
        return restore_tensors(self.residuals, saved)


class AnchorTerm(Protocol):
    """What the loop needs of an anchor besides ``Anchor`` itself (LoRA's closed form)."""

    lam: float
    mode: AnchorMode

    def add_grad_(self) -> None: ...
    def pull_(self, lr: float) -> None: ...
    def drift_squares(self) -> list[tuple[str, float]]: ...
    def carry(self) -> list[torch.Tensor]: ...
    def restore_carry(self, saved: list[torch.Tensor]) -> bool: ...


def build_anchor(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    lam: float,
    mode: AnchorMode = "coupled",
    anchor_dtype: str = "float32",
) -> Anchor | None:
    """Snapshot θ* for the given parameters; None (and no allocation) when λ = 0.

    The caller chooses the scope: L2-SP anchors only trainable parameters that were loaded
    from the pretrained checkpoint (see ``anchored_parameters``).

    With a half-precision ``anchor_dtype`` the parameters themselves are rounded to that
    dtype first (they stay fp32 tensors): θ then starts exactly at the stored θ*, instead of
    being pulled toward a point one rounding away (on MiniLM ‖θ − round(θ*)‖ ≈ 0.2 at step 0,
    more than most runs drift). The price is that rounding of the pretrained weights (a
    relative 2⁻⁹ for bf16), the same one bf16 inference pays.
    """
    if lam < 0:
        raise ValueError(f"objective.lambda must be >= 0, got {lam}")
    if mode not in ANCHOR_MODES:
        raise ValueError(f"objective.mode must be one of {ANCHOR_MODES}, got {mode!r}")
    if anchor_dtype not in _DTYPES:
        raise ValueError(
            f"objective.anchor_dtype must be one of {sorted(_DTYPES)}, got {anchor_dtype!r}"
        )
    names, params = [], []
    for name, p in named_params:
        names.append(name)
        params.append(p)
    dtype = _DTYPES[anchor_dtype]
    local = [local_part(p) for p in params]  # under FSDP θ* is kept for this rank's shards only
    with torch.no_grad():
        if dtype != torch.float32:
            # θ₀ := θ* as stored; at λ = 0 too, so the control arm starts from the same point
            for p in local:
                p.copy_(p.to(dtype))
        if lam == 0:
            return None
        targets = [p.detach().to(dtype=dtype, copy=True) for p in local]
        residuals = [torch.zeros_like(p) for p in local] if mode == "decoupled" else []
    return Anchor(names, params, targets, float(lam), mode, residuals, shard_group(params))


@torch.no_grad()
def restore_tensors(into: list[torch.Tensor], saved: list[torch.Tensor]) -> bool:
    """Copy ``saved`` into ``into`` in place when every shape matches; else change nothing."""
    if [a.shape for a in into] != [b.shape for b in saved]:
        return False
    for a, b in zip(into, saved, strict=True):
        a.copy_(b)
    return True


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP (DTensor) parameter or
    gradient, a view that in-place updates write through; any other tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def shard_group(params: list[torch.Tensor]):
    """The process group θ is sharded over (None when it is not sharded)."""
    if params and _is_dtensor(params[0]):
        return params[0].device_mesh.get_group()
    return None


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def anchored_parameters(
    model: torch.nn.Module, new_param_names: set[str]
) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters that came from the pretrained checkpoint (L2-SP scope).

    Newly initialised parameters (e.g. a classification head) have no pretrained value to
    stay close to, and frozen parameters cannot drift, so neither is anchored.
    """
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and name not in new_param_names
    ]


def _targets_like_params(anchor: Anchor) -> list[torch.Tensor]:
    """θ* in the parameters' dtype (a temporary only when θ* is stored in half precision)."""
    if anchor.targets and anchor.targets[0].dtype != anchor.params[0].dtype:
        return [t.to(anchor.params[0].dtype) for t in anchor.targets]
    return anchor.targets


def _drift(anchor: Anchor) -> list[torch.Tensor]:
    """θ − θ* per parameter (this rank's shards), in the parameters' dtype (a temporary the
    size of θ)."""
    return torch._foreach_sub(
        [p.detach() for p in anchor.local_params], _targets_like_params(anchor)
    )


@torch.no_grad()
def add_anchor_grad_(anchor: Anchor | AnchorTerm | None) -> None:
    """Coupled mode: grad += 2λ(θ − θ*), the exact gradient of λ‖θ − θ*‖².

    Call once per optimizer step, after backward (so after DDP's all-reduce: every replica
    holds the same θ and adds the same term) and before clipping and the optimizer step.
    With fp32 θ and θ*: two fused in-place passes (grad += 2λθ; grad −= 2λθ*) instead of
    materialising θ − θ* (measured: half the op's time on MiniLM, CPU); their rounding error
    is that of |2λθ| in fp32, ~1e-7 of the term. Otherwise one pass on the drift, whose
    rounding is the drift's own.
    """
    if anchor is None or anchor.mode != "coupled":
        return
    if not isinstance(anchor, Anchor):  # another AnchorTerm (tether.adapters: LoRA factors)
        anchor.add_grad_()
        return
    for p in anchor.params:
        if p.grad is None:  # a parameter the batch did not touch still feels the anchor
            p.grad = torch.zeros_like(p)
    grads = [local_part(p.grad) for p in anchor.params]  # FSDP: reduce-scattered shards
    all_fp32 = anchor.params[0].dtype == torch.float32 == anchor.targets[0].dtype
    if all_fp32:
        local = [p.detach() for p in anchor.local_params]
        torch._foreach_add_(grads, local, alpha=2.0 * anchor.lam)
        torch._foreach_add_(grads, anchor.targets, alpha=-2.0 * anchor.lam)
    else:
        torch._foreach_add_(grads, _drift(anchor), alpha=2.0 * anchor.lam)


@torch.no_grad()
def pull_toward_anchor_(anchor: Anchor | AnchorTerm | None, lr: float) -> None:
    """Decoupled mode: θ ← θ − lr·λ(θ − θ*), without losing the pull to fp32 rounding.

    Call once per optimizer step, after ``optimizer.step()`` (AdamW-style decoupling: the pull
    does not pass through Adam's per-coordinate scaling).

    The pull w·(θ − θ*) with w = lr·λ is often far below θ's rounding step: at w = 3e-9, a
    drift of 1e-3 and weights of 0.05 a plain lerp applied 0.2% of it (measured). So the pull
    is compensated (Kahan): what rounding did not apply this step is kept in ``residuals`` and
    added to the next step's pull, and the realised pull equals the formula's.
    """
    if anchor is None or anchor.mode != "decoupled":
        return
    if not isinstance(anchor, Anchor):
        anchor.pull_(lr)
        return
    weight = min(lr * anchor.lam, 1.0)  # never overshoot θ*
    params, residuals = anchor.local_params, anchor.residuals
    scratch = torch._foreach_sub(params, _targets_like_params(anchor))  # θ − θ*
    torch._foreach_add_(residuals, scratch, alpha=weight)  # u = carried + w(θ − θ*)
    torch._foreach_copy_(scratch, params)  # θ before the step
    torch._foreach_sub_(params, residuals)  # θ ← θ − u, rounded
    torch._foreach_sub_(scratch, params)  # what was applied (exact: the values are close)
    torch._foreach_sub_(residuals, scratch)  # carried = u − applied


@torch.no_grad()
def drift_norms(anchor: Anchor | None) -> list[float]:
    """‖θ − θ*‖₂ of each anchored parameter (no autograd). Under FSDP every rank must call
    it: the shards' sums of squares are all-reduced, once for all parameters."""
    if anchor is None:
        return []
    norms = torch._foreach_norm(_drift(anchor))
    if anchor.group is None:
        return [float(n) for n in norms]
    import torch.distributed as dist

    squares = torch.stack(norms).double() ** 2 if norms else torch.zeros(0, dtype=torch.float64)
    dist.all_reduce(squares, group=anchor.group)
    return [float(sq) ** 0.5 for sq in squares.cpu()]


def drift_squares(anchor: AnchorTerm) -> list[tuple[str, float]]:
    """(name, ‖θ − θ*‖²) for every anchored weight."""
    if not isinstance(anchor, Anchor):
        return anchor.drift_squares()
    return [(name, n * n) for name, n in zip(anchor.names, drift_norms(anchor), strict=True)]


def anchor_loss(anchor: AnchorTerm | None) -> float:
    """λ‖θ − θ*‖², the penalty's value (0 when there is no anchor)."""
    if anchor is None:
        return 0.0
    return anchor.lam * sum(sq for _, sq in drift_squares(anchor))


def num_anchored_tensors(anchor: AnchorTerm | None) -> int:
    if anchor is None:
        return 0
    return len(anchor.params) if isinstance(anchor, Anchor) else anchor.num_tensors


_LAYER = re.compile(r"^(.*?\.(?:layer|layers|h|block|blocks)\.\d+)\.")


def drift_group(name: str) -> str:
    """Group a parameter name by layer: 'bert.encoder.layer.3.x.weight' → 'bert.encoder.layer.3'."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def drift_report(anchor: Anchor | AnchorTerm | None) -> dict[str, float]:
    """Overall and per-layer drift, plus the penalty: the numbers logged at each evaluation."""
    if anchor is None:  # λ = 0 keeps no θ*: the drift is not known, not 0
        return {"anchor_loss": 0.0}
    squares = drift_squares(anchor)
    groups: dict[str, float] = {}
    for name, sq in squares:
        key = drift_group(name)
        groups[key] = groups.get(key, 0.0) + sq
    total_sq = sum(sq for _, sq in squares)
    report = {"anchor_loss": anchor.lam * total_sq, "drift_l2": total_sq**0.5}
    report.update({f"drift/{k}": v**0.5 for k, v in groups.items()})
    return report


def weights_hash(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names and fp32 bytes: the identity of θ* recorded in every checkpoint."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
