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
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

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

    @property
    def num_bytes(self) -> int:
        """Memory held by θ* (the only thing the anchor allocates)."""
        return sum(t.numel() * t.element_size() for t in self.targets)


def build_anchor(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    lam: float,
    mode: AnchorMode = "coupled",
    anchor_dtype: str = "float32",
) -> Anchor | None:
    """Snapshot θ* for the given parameters; None (and no allocation) when λ = 0.

    The caller chooses the scope: L2-SP anchors only trainable parameters that were loaded
    from the pretrained checkpoint (see ``anchored_parameters``).
    """
    if lam < 0:
        raise ValueError(f"objective.lambda must be >= 0, got {lam}")
    if mode not in ANCHOR_MODES:
        raise ValueError(f"objective.mode must be one of {ANCHOR_MODES}, got {mode!r}")
    if anchor_dtype not in _DTYPES:
        raise ValueError(
            f"objective.anchor_dtype must be one of {sorted(_DTYPES)}, got {anchor_dtype!r}"
        )
    if lam == 0:
        return None
    names, params = [], []
    for name, p in named_params:
        names.append(name)
        params.append(p)
    dtype = _DTYPES[anchor_dtype]
    with torch.no_grad():
        targets = [p.detach().to(dtype=dtype, copy=True) for p in params]
    return Anchor(names=names, params=params, targets=targets, lam=float(lam), mode=mode)


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


def _drift(anchor: Anchor) -> list[torch.Tensor]:
    """θ − θ* per parameter, in the parameters' dtype (a temporary the size of θ)."""
    if anchor.targets and anchor.targets[0].dtype != anchor.params[0].dtype:
        targets = [t.to(anchor.params[0].dtype) for t in anchor.targets]
    else:
        targets = anchor.targets
    return torch._foreach_sub([p.detach() for p in anchor.params], targets)


@torch.no_grad()
def add_anchor_grad_(anchor: Anchor | None) -> None:
    """Coupled mode: grad += 2λ(θ − θ*), the exact gradient of λ‖θ − θ*‖².

    Call once per optimizer step, after backward (so after DDP's all-reduce: every replica
    holds the same θ and adds the same term) and before clipping and the optimizer step.
    Two fused in-place passes (grad += 2λθ; grad −= 2λθ*) instead of materialising θ − θ*:
    no θ-sized temporary per step (measured: half the op's time on MiniLM, CPU).
    """
    if anchor is None or anchor.mode != "coupled":
        return
    for p in anchor.params:
        if p.grad is None:  # a parameter the batch did not touch still feels the anchor
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in anchor.params]
    torch._foreach_add_(grads, [p.detach() for p in anchor.params], alpha=2.0 * anchor.lam)
    torch._foreach_add_(grads, anchor.targets, alpha=-2.0 * anchor.lam)


@torch.no_grad()
def pull_toward_anchor_(anchor: Anchor | None, lr: float) -> None:
    """Decoupled mode: θ ← θ − lr·λ(θ − θ*), a lerp of θ toward θ* by lr·λ.

    Call once per optimizer step, after ``optimizer.step()`` (AdamW-style decoupling: the pull
    does not pass through Adam's per-coordinate scaling).
    """
    if anchor is None or anchor.mode != "decoupled":
        return
    weight = min(lr * anchor.lam, 1.0)  # never overshoot θ*
    if anchor.targets and anchor.targets[0].dtype == anchor.params[0].dtype:
        torch._foreach_lerp_(anchor.params, anchor.targets, weight)
    else:  # lerp needs equal dtypes: θ(1 − w) + w·θ*, still in place
        torch._foreach_mul_(anchor.params, 1.0 - weight)
        torch._foreach_add_(anchor.params, anchor.targets, alpha=weight)


@torch.no_grad()
def drift_norms(anchor: Anchor | None) -> list[float]:
    """‖θ − θ*‖₂ of each anchored parameter (no autograd)."""
    if anchor is None:
        return []
    return [float(n) for n in torch._foreach_norm(_drift(anchor))]


def anchor_loss(anchor: Anchor | None) -> float:
    """λ‖θ − θ*‖², the penalty's value (0 when there is no anchor)."""
    if anchor is None:
        return 0.0
    return anchor.lam * sum(n * n for n in drift_norms(anchor))


_LAYER = re.compile(r"^(.*?\.(?:layer|layers|h|block|blocks)\.\d+)\.")


def drift_group(name: str) -> str:
    """Group a parameter name by layer: 'bert.encoder.layer.3.x.weight' → 'bert.encoder.layer.3'."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def drift_report(anchor: Anchor | None) -> dict[str, float]:
    """Overall and per-layer drift, plus the penalty: the numbers logged at each evaluation."""
    if anchor is None:
        return {"anchor_loss": 0.0, "drift_l2": 0.0}
    norms = drift_norms(anchor)
    groups: dict[str, float] = {}
    for name, n in zip(anchor.names, norms, strict=True):
        key = drift_group(name)
        groups[key] = groups.get(key, 0.0) + n * n
    total_sq = sum(n * n for n in norms)
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
