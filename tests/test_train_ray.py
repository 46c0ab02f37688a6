"""Ray Train, 2 CPU workers over gloo: learning, replica agreement, checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tether.config import validate_job
from tether.run import run_training

from .helpers import make_tiny_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tiny_model_dir, easy_csv, tmp_path_factory):
    """One uninterrupted 2-worker run shared by the tests below."""
    job = tiny_job_dict(tiny_model_dir, easy_csv, tmp_path_factory.mktemp("ref"))
    spec = validate_job(job)
    return spec, run_training(spec)


def tiny_job_dict(model_dir, easy_csv, storage) -> dict:
    return make_tiny_job(
        model_dir,
        easy_csv,
        storage,
        optim={"new_param_lr_scale": 3.0},
        train={"keep_checkpoints": 2},
        scaling={"max_failures": 1},
        storage={"run_name": "run"},
    )


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def test_two_workers_learn_the_toy_task(reference_run):
    """Loss goes down and validation accuracy rises well above chance on a learnable task."""
    spec, outcome = reference_run
    metrics = outcome.result.metrics
    history = [m for _, m in outcome.result.best_checkpoints]
    first = min(history, key=lambda m: m["step"])
    assert metrics["train/fine_loss"] < first["train/fine_loss"]
    assert metrics["eval/loss"] < 0.6
    assert metrics["eval/accuracy"] > 0.8
    assert metrics["train/anchor_loss"] > 0 and metrics["train/drift_l2"] > 0


def test_evaluation_covers_the_whole_validation_set(reference_run):
    """Metrics are aggregated over all 101 validation examples (odd: shards are unequal)."""
    _, outcome = reference_run
    assert outcome.result.metrics["eval/num_examples"] == 101


def test_replicas_hold_identical_weights(reference_run, tiny_model_dir):
    """Both DDP workers end with bit-identical weights: each rank's own hash, written by that
    rank, equals the hash of the saved weights recomputed here."""
    from safetensors.torch import load_model
    from transformers import AutoModelForSequenceClassification

    from tether.anchor import weights_hash

    _, outcome = reference_run
    final = Path(outcome.result.checkpoint.path)
    per_rank = [json.loads((final / f"worker_rank{r}.json").read_text()) for r in (0, 1)]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    load_model(model, str(final / "model.safetensors"), strict=False)
    saved = weights_hash((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert [w["weights_sha256"] for w in per_rank] == [saved, saved]


def test_checkpoints_keep_best_n_plus_latest_and_summary_points_at_them(reference_run):
    """Best-N retention (plus the latest) on disk; summary names the model and checkpoint."""
    spec, outcome = reference_run
    run_dir = Path(outcome.summary["run_dir"])
    kept = checkpoint_dirs(run_dir)
    assert 2 <= len(kept) <= spec.train.keep_checkpoints + 1
    final = Path(outcome.summary["checkpoint"])
    assert final in kept
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= {
        p.name for p in final.iterdir()
    }
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["anchor"]["theta_star_sha256"] and state["step"] == outcome.result.metrics["step"]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["metrics"]["eval/accuracy"] == outcome.result.metrics["eval/accuracy"]


def test_exported_model_loads_and_predicts_like_the_run_reported(reference_run, easy_csv):
    """The HF model folder loads with Auto* classes and scores the validation set as reported."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, outcome = reference_run
    model_dir = Path(outcome.summary["model_dir"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tether.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, use_safetensors=True
    ).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    rows = pd.read_csv(easy_csv["validation"])
    enc = tok(list(rows.text), padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        pred = model(**enc).logits.argmax(-1).numpy()
    accuracy = float((pred == rows.label.to_numpy()).mean())
    assert accuracy == pytest.approx(outcome.result.metrics["eval/accuracy"], abs=1e-9)


def test_worker_crash_resumes_from_last_checkpoint_and_matches(
    reference_run, tiny_model_dir, easy_csv, tmp_path
):
    """A worker killed at step 7 restarts from the step-5 checkpoint and ends where an
    uninterrupted run ends (same seed): metrics equal within 1e-5."""
    spec_ref, ref = reference_run
    import ray.cloudpickle

    from . import helpers

    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/
    job = tiny_job_dict(tiny_model_dir, easy_csv, tmp_path)
    marker = tmp_path / "crashed"
    outcome = run_training(validate_job(job), hooks=helpers.CrashOnce(7, str(marker)))
    assert marker.is_file(), "the test crash must actually have happened"
    got, want = outcome.result.metrics, ref.result.metrics
    assert got["resumed_from_step"] == 5
    assert got["step"] == want["step"]
    for key in ("eval/accuracy", "eval/loss", "train/drift_l2", "train/anchor_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_resume_refuses_a_different_theta_star(reference_run, tiny_model_dir, tmp_path):
    """Resuming against base weights whose hash differs from the checkpoint's θ* is refused."""
    from transformers import AutoModelForSequenceClassification

    from tether.anchor import anchored_parameters
    from tether.errors import AnchorMismatch
    from tether.models import label_kwargs, load_pretrained
    from tether.train.checkpoint import load_training_state
    from tether.train.setup import param_groups

    spec, outcome = reference_run
    loaded = load_pretrained(
        str(tiny_model_dir), AutoModelForSequenceClassification, **label_kwargs(["n", "p"])
    )
    anchored = {n for n, _ in anchored_parameters(loaded.model, loaded.new_param_names)}
    opt = torch.optim.AdamW(  # the loop's groups, so the saved optimizer state fits
        param_groups(
            loaded.model,
            anchored,
            spec.optim.lr,
            spec.optim.weight_decay,
            spec.optim.new_param_lr_scale,
            decay_anchored=False,
        )
    )
    with pytest.raises(AnchorMismatch, match="refusing to resume"):
        load_training_state(
            Path(outcome.result.checkpoint.path),
            0,
            loaded.model,
            opt,
            "0" * 64,
            torch.device("cpu"),
        )
    # and the true hash of the same base is accepted
    from tether.anchor import weights_hash

    true_hash = weights_hash(anchored_parameters(loaded.model, loaded.new_param_names))
    state = load_training_state(
        Path(outcome.result.checkpoint.path), 0, loaded.model, opt, true_hash, torch.device("cpu")
    )
    assert state["step"] == outcome.result.metrics["step"]
