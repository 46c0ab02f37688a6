"""LoRA adapters: the anchor in closed form on the factors, and LoRA runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tether.adapters.anchor import LowRankAnchor, LowRankPair
from tether.anchor import add_anchor_grad_, drift_report, pull_toward_anchor_


def random_pairs(seed: int = 0, shapes=((12, 4, 9), (7, 2, 5))) -> list[LowRankPair]:
    """Factor pairs B (d×r), A (r×k) with B ≠ 0 (as after some training)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i, (d, r, k) in enumerate(shapes):
        a = torch.nn.Parameter(torch.randn(r, k, generator=g))
        b = torch.nn.Parameter(torch.randn(d, r, generator=g))
        pairs.append(LowRankPair(f"layers.{i}.proj.weight", a, b, scaling=16 / r))
    return pairs


def test_coupled_lora_anchor_gradient_equals_autograd_of_the_merged_penalty():
    """grad += 2λs²(BᵀB)A and 2λs²B(AAᵀ) is exactly the gradient of λ‖s·B·A‖²_F."""
    lam = 0.3
    pairs = random_pairs()
    penalty = sum(lam * (p.scaling * p.b @ p.a).pow(2).sum() for p in pairs)
    want = torch.autograd.grad(penalty, [t for p in pairs for t in (p.a, p.b)])
    anchor = LowRankAnchor(pairs, lam, "coupled")
    add_anchor_grad_(anchor)
    got = [t.grad for p in pairs for t in (p.a, p.b)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    report = drift_report(anchor)
    merged_sq = sum(float((p.scaling * p.b @ p.a).pow(2).sum()) for p in pairs)
    assert report["drift_l2"] == pytest.approx(merged_sq**0.5, rel=1e-6)
    assert report["anchor_loss"] == pytest.approx(float(penalty), rel=1e-5)


def test_decoupled_lora_pull_is_one_gradient_step_on_half_the_penalty():
    """A ← A − lr·λs²(BᵀB)A, B ← B − lr·λs²B(AAᵀ), both from the old factors; and the merged
    drift shrinks."""
    lam, lr = 2.0, 1e-3
    pairs = random_pairs(1)
    old = [(p.a.detach().clone(), p.b.detach().clone(), p.scaling) for p in pairs]
    anchor = LowRankAnchor(pairs, lam, "decoupled")
    before = drift_report(anchor)["drift_l2"]
    pull_toward_anchor_(anchor, lr)
    for p, (a, b, s) in zip(pairs, old):
        step = lr * lam * s * s
        torch.testing.assert_close(p.a.detach(), a - step * (b.T @ b) @ a)
        torch.testing.assert_close(p.b.detach(), b - step * b @ (a @ a.T))
    assert drift_report(anchor)["drift_l2"] < before


def test_the_lora_anchor_is_zero_at_initialisation_where_weight_decay_is_not():
    """B = 0 at the start: the merged drift and the anchor's gradients are exactly 0 (weight
    decay on A would already shrink it)."""
    pairs = random_pairs(2)
    for p in pairs:
        p.b.data.zero_()
    anchor = LowRankAnchor(pairs, 10.0, "coupled")
    add_anchor_grad_(anchor)
    assert drift_report(anchor)["drift_l2"] == 0.0
    assert all(float(t.grad.abs().max()) == 0.0 for p in pairs for t in (p.a, p.b))


# --------------------------------------------------------------------------- LoRA runs


# the tiny model's features are random: the toy task is learned through its word embeddings,
# which therefore train in full (modules_to_save) and feel the ordinary anchor
ADAPTER = {"r": 4, "alpha": 8.0, "modules_to_save": ["word_embeddings"]}


def lora_job(model_dir, easy_csv, root: Path, lam: float, **sections) -> dict:
    from .test_runs import local_job

    job = local_job(
        model_dir,
        easy_csv,
        root,
        model={"adapter": ADAPTER},
        objective={"lambda": lam},
        optim={"lr": 1e-2, "new_param_lr_scale": 1.0},
        train={"epochs": 2, "eval_interval": 5, "keep_checkpoints": 10},
    )
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    return job


def merged_drift(model_dir: Path, base_dir: Path) -> float:
    """‖W − W₀‖ over the weights both folders hold, read from the files (no closed form)."""
    from safetensors.torch import load_file

    merged = load_file(model_dir / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    total = 0.0
    for name, w0 in base.items():
        w = merged.get("bert." + name)
        if w is not None and w.shape == w0.shape:
            total += float((w.double() - w0.double()).pow(2).sum())
    return total**0.5


@pytest.fixture(scope="module")
def lora_runs(tiny_model_dir, easy_csv, tmp_path_factory):
    """The same LoRA run (same seed) at λ = 0 and at λ = 0.05, coupled."""
    from tether.config import validate_job
    from tether.run import run_training

    root = tmp_path_factory.mktemp("lora")
    plain = run_training(validate_job(lora_job(tiny_model_dir, easy_csv, root / "plain", 0.0)))
    anchored = run_training(validate_job(lora_job(tiny_model_dir, easy_csv, root / "l2sp", 0.05)))
    return plain, anchored


@pytest.mark.slow
def test_a_lora_run_learns_and_the_anchor_keeps_the_merged_weights_closer(
    lora_runs, tiny_model_dir
):
    """Both runs learn the toy task; the anchored one ends with a smaller ‖θ − θ*‖ of the merged
    weights, and its logged drift_l2 (closed form) equals the drift read from the files."""
    plain, anchored = lora_runs
    for outcome in lora_runs:
        assert outcome.summary["metrics"]["eval/accuracy"] > 0.8
    plain_drift = merged_drift(Path(plain.summary["model_dir"]), tiny_model_dir)
    anchored_drift = merged_drift(Path(anchored.summary["model_dir"]), tiny_model_dir)
    assert 0 < anchored_drift < 0.7 * plain_drift
    assert anchored.summary["metrics"]["train/drift_l2"] == pytest.approx(anchored_drift, rel=1e-4)


@pytest.mark.slow
def test_lora_checkpoints_hold_the_adapter_and_the_export_merges_exactly(lora_runs, easy_csv):
    """A checkpoint stores only factors and head; the exported merged model gives the same
    logits as base + adapter loaded through peft."""
    import pandas as pd
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, anchored = lora_runs
    with safe_open(Path(anchored.summary["checkpoint"]) / "model.safetensors", "pt") as f:
        stored = list(f.keys())
    assert any(".lora_A." in k for k in stored)
    assert all(".lora_" in k or ".modules_to_save." in k for k in stored)
    folder = Path(anchored.summary["model_dir"])
    card = json.loads((folder / "adapter" / "tether.json").read_text())
    assert card["objective"]["adapter"]["r"] == 4
    assert card["objective"]["theta_star_sha256"] == anchored.summary["theta_star_sha256"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = list(pd.read_csv(easy_csv["validation"]).text[:16])
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    base = AutoModelForSequenceClassification.from_pretrained(
        card["objective"]["base_model"], num_labels=2
    )
    adapted = PeftModel.from_pretrained(base, folder / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**batch).logits, adapted(**batch).logits, rtol=1e-4, atol=1e-5
        )


@pytest.mark.slow
def test_an_interrupted_lora_run_resumes_to_the_same_result(
    lora_runs, tiny_model_dir, easy_csv, tmp_path
):
    """Killed at step 12, resumed from checkpoint 10 (adapter + optimizer): it ends where the
    uninterrupted anchored run ended."""
    from tether.config import validate_job
    from tether.run import run_training

    from .test_runs import FailAt

    _, reference = lora_runs
    job = lora_job(tiny_model_dir, easy_csv, tmp_path, 0.05)
    with pytest.raises(RuntimeError, match="test failure at step 12"):
        run_training(validate_job(job), hooks=FailAt(12))
    resumed = run_training(validate_job(job))
    assert resumed.result.metrics["resumed_from_step"] == 10
    for key in ("eval/accuracy", "eval/loss", "train/drift_l2"):
        assert resumed.summary["metrics"][key] == pytest.approx(
            reference.summary["metrics"][key], rel=1e-5
        )


@pytest.mark.ray
@pytest.mark.slow
def test_lora_under_ddp_trains_and_scores_like_one_worker(
    ray_cluster, tiny_model_dir, easy_csv, tmp_path
):
    """Two DDP workers train a LoRA adapter (no unused-parameter error: every factor gets a
    gradient), and one process scoring the exported model reproduces their metrics."""
    from tether.config import validate_job
    from tether.models import load_tokenizer
    from tether.run import run_training
    from tether.train.loop import evaluate
    from tether.train.strategy import DataParallel

    from .helpers import prepare

    job = lora_job(
        tiny_model_dir, easy_csv, tmp_path, 0.05, train={"max_steps": 6, "eval_interval": 3}
    )
    job["scaling"] = {"num_workers": 2, "max_failures": 0}
    spec = validate_job(job)
    outcome = run_training(spec)
    assert outcome.summary["finished"] and outcome.summary["step"] == 6
    folder = Path(outcome.summary["model_dir"])
    task, data = prepare(spec, load_tokenizer(str(folder)), ["negative", "positive"])
    model = task.load_model(str(folder), None, False).model
    alone = evaluate(
        model, data.validation, task, data.pad_id, spec, DataParallel(0, 1, torch.device("cpu"))
    )
    assert alone["eval/accuracy"] == outcome.summary["metrics"]["eval/accuracy"]
    assert alone["eval/loss"] == pytest.approx(outcome.summary["metrics"]["eval/loss"], rel=1e-5)


@pytest.mark.slow
def test_a_lora_adapter_on_a_causal_lm_learns_anchored_and_merges_exactly(tiny_llama_dir, tmp_path):
    """LoRA on every linear of a tiny Llama (tied embeddings, no new head): the anchored
    adapter learns (eval loss far below θ*'s), the probe's forgetting is measured, and the
    merged export gives the logits and greedy answers of base + adapter."""
    from peft import PeftModel

    from tether.config import validate_job
    from tether.run import prepare_run_data, run_training
    from tether.tasks.causal_lm import CausalLM, greedy_answers
    from tether.train.loop import evaluate
    from tether.train.strategy import DataParallel

    from .test_causal_lm import lm_job, taught_chats, write_jsonl

    path = write_jsonl(tmp_path / "taught.jsonl", taught_chats(48))
    job = lm_job(
        tiny_llama_dir,
        str(path),
        tmp_path / "runs",
        model={"adapter": {"r": 8, "alpha": 16.0}},
        objective={"lambda": 0.01},
        optim={"lr": 1e-2},
        train={"epochs": 6, "eval_interval": 18},
        data={"validation_fraction": 0.125},
        eval={"forgetting_probe": "builtin", "probe_max_new_tokens": 8},
    )
    spec = validate_job(job)
    outcome = run_training(spec)
    metrics = outcome.summary["metrics"]
    task, data = prepare_run_data(spec)
    base = task.load_model(str(tiny_llama_dir), None, False).model.eval()
    cpu = DataParallel(0, 1, torch.device("cpu"))
    before = evaluate(base, data.validation, task, data.pad_id, spec, cpu)["eval/loss"]
    assert metrics["eval/loss"] < 0.5 * before
    assert metrics["eval/forgetting"] > 0 and metrics["train/drift_l2"] > 0

    folder = Path(outcome.summary["model_dir"])
    tokenizer = CausalLM().load_tokenizer(str(folder), None, False)
    batch = data.validation.collate(np.arange(len(data.validation)), tokenizer.pad_token_id)
    merged = task.load_model(str(folder), None, False).model.eval()
    adapted = PeftModel.from_pretrained(base, folder / "adapter").eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**inputs).logits, adapted(**inputs).logits, rtol=1e-4, atol=1e-4
        )
    assert greedy_answers(merged, tokenizer, batch, 8) == greedy_answers(
        adapted, tokenizer, batch, 8
    )


def test_a_decoupled_lora_pull_below_fp32_rounding_is_carried_not_lost():
    """At lr·λs² = 1e-9 each step's pull is far below the factors' rounding: the compensated
    pull still moves them by the sum of the steps (an uncompensated one would not move)."""
    lam, lr, steps = 1e-6, 1e-3, 400
    pairs = random_pairs(3)
    start = [
        (p.a.detach().clone().double(), p.b.detach().clone().double(), p.scaling) for p in pairs
    ]
    anchor = LowRankAnchor(pairs, lam, "decoupled")
    for _ in range(steps):
        pull_toward_anchor_(anchor, lr)
    for p, (a, b, s) in zip(pairs, start):
        step = lr * lam * s * s
        want_a = a - steps * step * (b.T @ b) @ a  # the pull is tiny: the factors barely change
        moved = (a - p.a.detach().double()).abs().max()
        assert moved > 0
        torch.testing.assert_close(p.a.detach().double(), want_a, rtol=0, atol=float(moved) * 0.05)


def test_an_adapter_on_either_side_of_a_tied_embedding_is_refused(tiny_llama_dir):
    """Merging it would also change the other side of the shared matrix (the LM head, or the
    input lookup): refused, naming the module."""
    from tether.adapters import apply_lora
    from tether.tasks.causal_lm import CausalLM

    def fresh():
        return CausalLM().load_model(str(tiny_llama_dir), None, False).model

    with pytest.raises(ValueError, match="'model.embed_tokens' is tied to the output head"):
        apply_lora(fresh(), set(), r=4, alpha=8, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="'lm_head' is tied to the input embedding"):
        apply_lora(fresh(), set(), r=4, alpha=8, target_modules=["q_proj", "lm_head"])
    apply_lora(fresh(), set(), r=4, alpha=8, target_modules=["q_proj"])  # the rest is fine
