"""FSDP2 (scaling.strategy: fsdp) on 2 CPU workers over gloo, tiny Llama: the same training
as DDP, θ* sharded like θ, sharded checkpoints that resume after a crash and on fewer workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tether.config import validate_job
from tether.errors import SpecError
from tether.run import run_training
from tether.train.checkpoint import (
    HF_MODEL_DIR,
    SHARDED_DIR,
    checkpoint_name,
    checkpoints,
    read_state,
)

from .test_causal_lm import lm_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OBJECTIVES = {
    "coupled": {"lambda": 0.5, "mode": "coupled"},
    "decoupled": {"lambda": 20.0, "mode": "decoupled"},
    "plain": {"lambda": 0.0},
}


def fsdp_job(model_dir: Path, root: Path, strategy: str, objective: dict, **sections) -> dict:
    """A short chat SFT: 2 workers, 2 micro-batches per step, evaluations with greedy answers,
    generated samples and (for the anchored runs) the forgetting probe; the decoupled runs
    recompute activations (gradient checkpointing)."""
    job = lm_job(
        model_dir,
        "synthetic:chat",
        root,
        data={"max_train_samples": 64, "max_validation_samples": 16, "max_length": 96},
        objective=objective,
        optim={"lr": 3e-3, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        train={
            "max_steps": 6,
            "eval_interval": 2,
            "batch_size": 4,
            "grad_accum_steps": 2,
            "keep_checkpoints": 10,
            "seed": 3,
            "gradient_checkpointing": objective.get("mode") == "decoupled",
        },
        eval={
            "generate_examples": 4,
            "samples": 2,
            "forgetting_probe": "builtin" if objective.get("lambda") else "none",
        },
        scaling={"num_workers": 2, "strategy": strategy, "max_failures": 1},
        storage={"run_name": f"{strategy}-{objective.get('mode', 'plain')}"},
    )
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    return job


def curve(outcome) -> list[dict]:
    return [read_state(c)["metrics"] for c in checkpoints(outcome.summary["run_dir"])]


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_llama_dir, tmp_path_factory):
    """DDP and FSDP from the same seed, for each objective."""
    root = tmp_path_factory.mktemp("fsdp")
    return {
        (strategy, name): run_training(
            validate_job(fsdp_job(tiny_llama_dir, root / "runs", strategy, objective))
        )
        for name, objective in OBJECTIVES.items()
        for strategy in ("ddp", "fsdp")
    }


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_fsdp_trains_like_ddp(runs, objective):
    """Same seed, same data: every evaluation's loss, drift and penalty agree with DDP's to
    within 1e-3 (the reductions run in another order, and Adam amplifies it), with and without the anchor."""
    ddp, fsdp = curve(runs["ddp", objective]), curve(runs["fsdp", objective])
    assert [m["step"] for m in fsdp] == [m["step"] for m in ddp] == [2, 4, 6]
    assert ddp[-1]["train/fine_loss"] < ddp[0]["train/fine_loss"]  # it does learn
    keys = ["train/fine_loss", "eval/loss", "train/grad_norm"]
    if objective != "plain":
        keys += ["train/drift_l2", "train/anchor_loss", "eval/forgetting"]
    for d, f in zip(ddp, fsdp, strict=True):
        for key in keys:
            assert f[key] == pytest.approx(d[key], rel=1e-3, abs=1e-6), (d["step"], key)
        assert f["eval/exact_match"] == d["eval/exact_match"]
    if objective != "plain":
        assert ddp[-1]["train/drift_l2"] > 0


def test_theta_star_is_sharded_like_theta(runs):
    """Each FSDP rank keeps θ* (and the decoupled residuals) for its own shards only: about
    half the bytes a DDP replica holds, with the same per-layer drift."""
    for objective in ("coupled", "decoupled"):
        ddp, fsdp = curve(runs["ddp", objective])[-1], curve(runs["fsdp", objective])[-1]
        ratio = fsdp["train/anchor_bytes"] / ddp["train/anchor_bytes"]
        assert 0.45 < ratio < 0.55, (objective, ratio)
        layers = [k for k in ddp if k.startswith("drift/")]
        assert len(layers) >= 3
        for key in layers:
            assert fsdp[key] == pytest.approx(ddp[key], rel=1e-3, abs=1e-7), key
    assert curve(runs["fsdp", "plain"])[-1]["train/anchor_bytes"] == 0


def test_sharded_checkpoint_reshards_and_equals_the_export(runs, tiny_llama_dir):
    """The final FSDP checkpoint's shards, read by one process (as a sweep reads a stopped
    trial's), are exactly the exported model's weights (the gathered full state dict)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tether.train.checkpoint import load_trained_weights

    summary = runs["fsdp", "coupled"].summary
    final = Path(summary["run_dir"]) / checkpoint_name(6)  # the 2-worker run's last
    assert (final / SHARDED_DIR / ".metadata").is_file()
    assert sorted(p.name for p in (final / SHARDED_DIR).glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not (final / "model.safetensors").exists()  # the whole weights live in model/ only
    state = read_state(final)
    assert state["strategy"] == "fsdp" and state["weights_sha256"] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    # as a sweep exports a stopped trial's best checkpoint: one process, no process group
    assert load_trained_weights(model, final) == []
    exported = load_file(str(final / HF_MODEL_DIR / "model.safetensors"))
    assert exported, "the export must hold the weights"
    weights = model.state_dict()
    for name, tensor in exported.items():
        assert torch.equal(weights[name], tensor), name
    card = json.loads((final / HF_MODEL_DIR / "tether.json").read_text())
    assert card["metrics"]["eval/loss"] == pytest.approx(state["metrics"]["eval/loss"])


def test_a_crashed_fsdp_worker_resumes_from_the_sharded_checkpoint(runs, tiny_llama_dir, tmp_path):
    """Rank 1 killed after step 3: the group restarts from the step-2 sharded checkpoint and
    ends where the uninterrupted run ends (decoupled anchor: θ* and the pull are rebuilt)."""
    import ray.cloudpickle

    from . import helpers

    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/
    marker = tmp_path / "crashed"
    job = fsdp_job(tiny_llama_dir, tmp_path / "runs", "fsdp", OBJECTIVES["decoupled"])
    outcome = run_training(validate_job(job), hooks=helpers.CrashOnce(3, str(marker)))
    assert marker.is_file(), "the test crash must actually have happened"
    got, want = outcome.result.metrics, runs["fsdp", "decoupled"].result.metrics
    assert got["resumed_from_step"] == 2 and got["step"] == want["step"] == 6
    for key in ("eval/loss", "train/fine_loss", "train/drift_l2", "eval/forgetting"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_a_two_worker_fsdp_run_resumes_on_one_worker(runs, tiny_llama_dir):
    """The finished 2-worker run, continued for 2 more steps on 1 worker: DCP reshards its
    step-6 checkpoint onto the single rank, and training goes on from there."""
    first = runs["fsdp", "coupled"].summary
    root = Path(first["run_dir"]).parent
    job = fsdp_job(
        tiny_llama_dir,
        root,
        "fsdp",
        OBJECTIVES["coupled"],
        train={"max_steps": 8},
        scaling={"num_workers": 1},
    )
    outcome = run_training(
        validate_job(job), allow_changes=("train.max_steps", "scaling.num_workers")
    )
    metrics = outcome.result.metrics
    assert metrics["resumed_from_step"] == 6 and metrics["step"] == 8
    state = read_state(checkpoints(first["run_dir"])[-1])
    assert state["world_size"] == 1
    # one more step pair from the trained weights: the drift grows from where it was, not from 0
    assert metrics["train/drift_l2"] >= 0.9 * first["metrics"]["train/drift_l2"]
    assert metrics["train/anchor_bytes"] > 1.8 * first["metrics"]["train/anchor_bytes"]


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers >= 1"),
        ({"model": {"adapter": {"r": 4}}}, "not supported with model.adapter"),
        ({"train": {"precision": "fp16-mixed"}}, "use bf16-mixed"),
    ],
)
def test_fsdp_refuses_what_it_cannot_run(tiny_llama_dir, tmp_path, updates, message):
    job = fsdp_job(tiny_llama_dir, tmp_path, "fsdp", OBJECTIVES["coupled"], **updates)
    with pytest.raises((SpecError, ValueError), match=message):
        validate_job(job)


def test_the_worker_count_changes_on_resume_only_for_a_run_measured_in_steps(tmp_path):
    """With train.epochs the steps (schedule, a κ's λ) follow the workers: refused."""
    from tether.errors import RunIdentityError
    from tether.run import claim_run_dir

    run_dir = tmp_path / "run"
    before = {"scaling.num_workers": 2, "train.max_steps": None, "train.epochs": 3}
    assert claim_run_dir(run_dir, before) == "new"
    after = before | {"scaling.num_workers": 1}
    with pytest.raises(RunIdentityError, match="only when the run's length is set in steps"):
        claim_run_dir(run_dir, after, ("scaling.num_workers",))
    stepped = tmp_path / "stepped"
    claim_run_dir(stepped, before | {"train.max_steps": 10})
    allowed = before | {"train.max_steps": 10, "scaling.num_workers": 1}
    assert claim_run_dir(stepped, allowed, ("scaling.num_workers",)) == "new"
