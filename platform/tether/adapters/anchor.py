"""The anchor for LoRA adapters, in closed form.

A LoRA layer computes with W = W₀ + s·B·A (W₀ frozen, d×k; B d×r; A r×k; s = alpha/r), and
W₀ *is* θ* for that weight, so the drift is exactly θ − θ* = s·B·A. The L2-SP penalty is then

    λ‖s·B·A‖²_F = λs²·tr((BᵀB)(AAᵀ))

with gradients 2λs²·B(AAᵀ) for B and 2λs²·(BᵀB)A for A: r×r products, never the d×k matrix.
Both are applied directly to the factors' gradients (``coupled``, before clipping, like the
full anchor) or as a step after the optimizer's (``decoupled``: lr times the gradient of
(λ/2)‖s·B·A‖², the same scaling as the full decoupled pull).

This is not weight decay on A and B. Decay penalises ‖A‖² + ‖B‖², a different norm of the
update (it bounds the nuclear norm of BA) that is not zero at B = 0: with B = 0 at the start it
shrinks A while the anchor term is exactly 0 and leaves A alone. And since the anchor starts at
0 and grows like ‖BA‖², a LoRA λ needs its own range (README, "Choosing λ").

Pure torch, no peft: the caller hands over the factor pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tether.anchor import (
    Anchor,
    AnchorMode,
    add_anchor_grad_,
    drift_squares,
    pull_toward_anchor_,
    restore_tensors,
)


@dataclass
class LowRankPair:
    """One adapted weight: its name in the base model, and its factors."""

    name: str  # the base weight's name, e.g. 'model.layers.0.self_attn.q_proj.weight'
    a: torch.nn.Parameter  # r × k
    b: torch.nn.Parameter  # d × r
    scaling: float  # s = alpha / r


@dataclass
class LowRankAnchor:
    """λ‖θ − θ*‖² for a LoRA run: exact on the adapted weights (θ − θ* = s·B·A), and the
    ordinary anchor on pretrained weights trained in full (``full``, e.g. modules_to_save)."""

    pairs: list[LowRankPair]
    lam: float
    mode: AnchorMode
    full: Anchor | None = None
    residuals: list[torch.Tensor] = field(default_factory=list)  # decoupled: per factor

    @property
    def num_tensors(self) -> int:
        return 2 * len(self.pairs) + (len(self.full.params) if self.full else 0)

    @property
    def num_bytes(self) -> int:
        """Memory the anchor holds: no θ* for the adapted weights (it is the frozen W₀), the
        factors' rounding residuals in decoupled mode, and the full anchor's share."""
        own = sum(t.numel() * t.element_size() for t in self.residuals)
        return own + (self.full.num_bytes if self.full else 0)

    @torch.no_grad()
    def add_grad_(self) -> None:
        """Coupled: grad_A += 2λs²(BᵀB)A, grad_B += 2λs²B(AAᵀ), from the factors before the
        step; then the full anchor's grad += 2λ(θ − θ*)."""
        for pair in self.pairs:
            a, b = pair.a.detach(), pair.b.detach()
            factor = 2.0 * self.lam * pair.scaling**2
            grad_a, grad_b = (b.T @ b) @ a, b @ (a @ a.T)
            for p, g in ((pair.a, grad_a), (pair.b, grad_b)):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g, alpha=factor)
        add_anchor_grad_(self.full)

    @torch.no_grad()
    def pull_(self, lr: float) -> None:
        """Decoupled: A ← A − lr·λs²(BᵀB)A and B ← B − lr·λs²B(AAᵀ), both from the factors
        before the pull (one gradient step on (λ/2)‖s·B·A‖²); then the full anchor's pull.

        Like the full pull, compensated: a step below the factors' fp32 rounding (lr·λs² of
        1e-8 is common) is carried to the next step instead of being lost (``residuals``).
        """
        self._start_residuals()
        for i, pair in enumerate(self.pairs):
            a, b = pair.a.detach(), pair.b.detach()
            step = lr * self.lam * pair.scaling**2
            pulls = (step * ((b.T @ b) @ a), step * (b @ (a @ a.T)))  # from the old factors
            for factor, pull, carried in zip(
                (a, b), pulls, self.residuals[2 * i : 2 * i + 2], strict=True
            ):
                wanted = carried + pull
                before = factor.clone()
                factor.sub_(wanted)
                carried.copy_(wanted - (before - factor))  # what rounding did not apply
        pull_toward_anchor_(self.full, lr)

    def _start_residuals(self) -> None:
        if not self.residuals:
            self.residuals = [torch.zeros_like(t) for p in self.pairs for t in (p.a, p.b)]

    def carry(self) -> list[torch.Tensor]:
        """The factors' and the full anchor's pull not applied yet (decoupled), for a
        checkpoint."""
        if self.mode != "decoupled":
            return []
        self._start_residuals()
        return list(self.residuals) + (self.full.carry() if self.full else [])

    def restore_carry(self, saved: list[torch.Tensor]) -> bool:
        if self.mode != "decoupled":
            return not saved
        self._start_residuals()
        own, rest = saved[: len(self.residuals)], saved[len(self.residuals) :]
        full = self.full.restore_carry(rest) if self.full else not rest
        return full and restore_tensors(self.residuals, own)

    @torch.no_grad()
    def drift_squares(self) -> list[tuple[str, float]]:
        """(name, ‖θ − θ*‖²) per anchored weight; an adapted one's is s²·Σ (BᵀB)∘(AAᵀ)."""
        out = []
        for pair in self.pairs:
            a, b = pair.a.detach().double(), pair.b.detach().double()
            out.append((pair.name, pair.scaling**2 * float(((b.T @ b) * (a @ a.T)).sum())))
        if self.full is not None:
            out += drift_squares(self.full)
        return out
