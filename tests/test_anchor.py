"""The anchored objective, in pure torch (no Ray)."""

from __future__ import annotations

import copy

import pytest
import torch

from tether.anchor import (
    add_anchor_grad_,
    anchor_loss,
    anchored_parameters,
    build_anchor,
    drift_group,
    drift_report,
    pull_toward_anchor_,
    weights_hash,
)
from tether.models import freeze_parameters, label_kwargs, load_pretrained
from tether.train.setup import param_groups


def small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def fine_loss(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def test_coupled_gradient_equals_autograd_of_penalty():
    """Coupled mode adds exactly the autograd gradient of λ‖θ − θ*‖² to the fine-tuning grad."""
    lam = 0.37
    model = small_net()
    anchor = build_anchor(model.named_parameters(), lam, "coupled")
    perturb_(model)
    reference = copy.deepcopy(model)
    theta_star = [t.clone() for t in anchor.targets]

    fine_loss(model).backward()
    add_anchor_grad_(anchor)

    penalty = lam * sum(((p - t) ** 2).sum() for p, t in zip(reference.parameters(), theta_star))
    (fine_loss(reference) + penalty).backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)


def test_decoupled_pull_matches_formula():
    """Decoupled mode moves θ to θ − lr·λ(θ − θ*) and leaves gradients alone."""
    lam, lr = 0.5, 0.1
    model = small_net()
    anchor = build_anchor(model.named_parameters(), lam, "decoupled")
    perturb_(model)
    before = [p.detach().clone() for p in model.parameters()]
    add_anchor_grad_(anchor)  # a no-op in decoupled mode
    assert all(p.grad is None for p in model.parameters())
    pull_toward_anchor_(anchor, lr)
    for p, b, t in zip(model.parameters(), before, anchor.targets):
        torch.testing.assert_close(p.detach(), b - lr * lam * (b - t), rtol=1e-6, atol=1e-7)


def test_anchor_gradient_alone_converges_to_theta_star():
    """Optimizing only the anchor term must actually approach θ*."""
    model = small_net()
    anchor = build_anchor(model.named_parameters(), 1.0, "coupled")
    perturb_(model, scale=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = anchor_loss(anchor)
    for _ in range(100):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        add_anchor_grad_(anchor)
        opt.step()
    assert anchor_loss(anchor) < 1e-6 * start


def test_lambda_zero_allocates_nothing_and_matches_plain_fine_tuning():
    """λ = 0 builds no anchor and the training steps are bit-identical to plain AdamW."""
    assert build_anchor(small_net().named_parameters(), 0.0, "coupled") is None

    def train(use_tether_path: bool) -> list[torch.Tensor]:
        model = small_net()
        if use_tether_path:
            anchor = build_anchor(model.named_parameters(), 0.0, "coupled")
            groups = param_groups(
                model,
                {n for n, _ in model.named_parameters()},
                1e-2,
                0.01,
                1.0,
                decay_anchored=True,
            )
            opt = torch.optim.AdamW(groups, lr=1e-2)
        else:
            opt = torch.optim.AdamW(
                [
                    {
                        "params": [p for p in model.parameters() if p.ndim >= 2],
                        "weight_decay": 0.01,
                    },
                    {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
                ],
                lr=1e-2,
            )
        for step in range(5):
            opt.zero_grad()
            fine_loss(model, seed=step).backward()
            if use_tether_path:
                add_anchor_grad_(anchor)
            opt.step()
            if use_tether_path:
                pull_toward_anchor_(anchor, 1e-2)
        return [p.detach() for p in model.parameters()]

    for a, b in zip(train(True), train(False)):
        assert torch.equal(a, b)


def test_anchor_loss_is_zero_at_step_zero_and_grows_with_drift():
    """At θ = θ* the penalty and drift are exactly 0; after a perturbation they are positive."""
    model = small_net()
    anchor = build_anchor(model.named_parameters(), 0.1, "coupled")
    assert anchor_loss(anchor) == 0.0
    assert drift_report(anchor)["drift_l2"] == 0.0
    perturb_(model)
    report = drift_report(anchor)
    expected = sum(((p - t) ** 2).sum() for p, t in zip(model.parameters(), anchor.targets))
    assert report["anchor_loss"] == pytest.approx(0.1 * float(expected), rel=1e-5)
    assert report["drift_l2"] == pytest.approx(float(expected) ** 0.5, rel=1e-5)


def test_head_and_frozen_parameters_are_not_anchored(tiny_model_dir):
    """L2-SP scope: the new classifier head and frozen layers carry no anchor."""
    from transformers import AutoModelForSequenceClassification

    loaded = load_pretrained(
        str(tiny_model_dir), AutoModelForSequenceClassification, **label_kwargs(["a", "b"])
    )
    assert loaded.new_param_names == {"classifier.weight", "classifier.bias"}
    frozen = freeze_parameters(loaded.model, freeze_embeddings=True, freeze_layers=1)
    assert any("embeddings" in n for n in frozen) and any(".layer.0." in n for n in frozen)
    assert not any(".layer.1." in n for n in frozen)
    names = {n for n, _ in anchored_parameters(loaded.model, loaded.new_param_names)}
    assert names, "the remaining pretrained layers must be anchored"
    assert not names & loaded.new_param_names
    assert not names & set(frozen)
    assert any(".layer.1." in n for n in names)


def test_param_groups_keep_weight_decay_off_anchored_parameters():
    """Pretrained weights get no decay toward 0 (at every λ); the head keeps decay and lr scale."""
    model = small_net()
    anchored = {"0.weight", "0.bias"}
    groups = param_groups(model, anchored, 1e-3, 0.1, 10.0, decay_anchored=False)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["0.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["2.weight"])]["weight_decay"] == 0.1
    assert by_param[id(named["2.weight"])]["lr"] == pytest.approx(1e-2)
    assert by_param[id(named["2.bias"])]["weight_decay"] == 0.0
    assert groups[0]["lr_scale"] == 1.0 and named["0.weight"] in groups[0]["params"]


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_half_precision_anchor_halves_memory_and_still_pulls(mode):
    """A bf16 θ* takes half the bytes of fp32 and the update still points toward θ*.

    (Decoupled mode also keeps fp32 rounding residuals: the compensated pull needs them.)"""
    model = small_net()
    fp32 = build_anchor(model.named_parameters(), 0.5, mode, "float32")
    bf16 = build_anchor(model.named_parameters(), 0.5, mode, "bfloat16")
    assert bf16.theta_star_bytes * 2 == fp32.theta_star_bytes
    perturb_(model, 1.0)
    before = anchor_loss(fp32)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    add_anchor_grad_(bf16)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    pull_toward_anchor_(bf16, 0.2)
    assert anchor_loss(fp32) < before


def test_negative_lambda_and_unknown_mode_are_rejected():
    """Bad objective settings fail with the key in the message."""
    with pytest.raises(ValueError, match="objective.lambda"):
        build_anchor(small_net().named_parameters(), -0.1)
    with pytest.raises(ValueError, match="objective.mode"):
        build_anchor(small_net().named_parameters(), 0.1, "sideways")


def test_drift_groups_by_layer_and_hash_tracks_weights():
    """Drift is grouped per transformer layer; the θ* hash changes when any weight changes."""
    assert drift_group("bert.encoder.layer.3.attention.self.query.weight") == "bert.encoder.layer.3"
    assert drift_group("bert.embeddings.word_embeddings.weight") == "bert.embeddings"
    assert drift_group("classifier.weight") == "classifier"
    model = small_net()
    h0 = weights_hash(model.named_parameters())
    assert h0 == weights_hash(small_net().named_parameters())
    with torch.no_grad():
        model[0].bias[0] += 1e-3
    assert weights_hash(model.named_parameters()) != h0


def test_decoupled_pull_survives_fp32_rounding_at_small_weights():
    """At w = lr·λ = 3e-9 the realised pull follows (1 − w)^N to within one rounding step.

    A plain lerp applies almost none of it (the pull is far below θ's rounding step); the
    compensated pull keeps what rounding held back and applies it later.
    """
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(50_000) * 0.05)
    anchor = build_anchor([("w", theta)], lam=1e-4, mode="decoupled")
    with torch.no_grad():
        theta.add_(torch.randn_like(theta) * 1e-3)
    plain = theta.detach().clone()
    target = anchor.targets[0]
    d0 = theta.detach().double() - target.double()
    lr, steps = 3e-5, 3000
    w = lr * anchor.lam
    for _ in range(steps):
        pull_toward_anchor_(anchor, lr)
        plain.lerp_(target, w)  # what the pull did before: lost to rounding
    expected = d0 * (1 - w) ** steps
    realised = theta.detach().double() - target.double()
    ulp = torch.finfo(torch.float32).eps * theta.detach().abs().double().clamp(min=1e-3)
    assert ((realised - expected).abs() <= ulp).all()
    wanted = float((d0 - expected).abs().sum())
    assert float((d0 - (plain.double() - target.double())).abs().sum()) < 0.1 * wanted
    # what is still held back is the pull of at most one rounding step per coordinate
    pending = anchor.residuals[0].double()
    torch.testing.assert_close(realised - pending, expected, rtol=0, atol=1e-11)


def test_decoupled_pull_matches_the_formula_over_many_steps():
    """Summed over steps, the realised plus pending pull equals Σ w·(θ − θ*) exactly."""
    torch.manual_seed(1)
    model = small_net()
    anchor = build_anchor(model.named_parameters(), lam=2.0, mode="decoupled")
    perturb_(model, 0.5)
    before = [p.detach().double() - t.double() for p, t in zip(model.parameters(), anchor.targets)]
    for _ in range(10):
        pull_toward_anchor_(anchor, 1e-3)
    for p, t, d0, r in zip(model.parameters(), anchor.targets, before, anchor.residuals):
        torch.testing.assert_close(
            p.detach().double() - t.double() - r.double(), d0 * (1 - 2e-3) ** 10
        )


def test_half_precision_anchor_starts_theta_exactly_at_the_stored_theta_star():
    """With a bf16 θ*, θ is rounded too, so the drift (and the anchor's pull) is 0 at step 0."""
    model = small_net()
    perturb_(model, 0.37)  # values that bf16 cannot hold exactly
    anchor = build_anchor(model.named_parameters(), 1.0, "coupled", "bfloat16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert drift_report(anchor)["drift_l2"] == 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    add_anchor_grad_(anchor)
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def test_the_lambda_zero_arm_starts_from_the_same_rounded_weights():
    """With a bf16 θ*, λ = 0 allocates no anchor but rounds θ exactly as an anchored arm does,
    so the control differs from it only in λ."""
    plain, anchored = small_net(), small_net()
    perturb_(plain, 0.37)
    anchored.load_state_dict(plain.state_dict())
    assert build_anchor(plain.named_parameters(), 0.0, "coupled", "bfloat16") is None
    build_anchor(anchored.named_parameters(), 1.0, "coupled", "bfloat16")
    for p, q in zip(plain.parameters(), anchored.parameters()):
        assert (
            p.dtype == torch.float32 and torch.equal(p, q) and torch.equal(p, p.bfloat16().float())
        )
