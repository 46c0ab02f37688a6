"""The anchor's knobs beyond λ: a portable strength κ, the clipping order, and LP-FT's
head warm-up."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.anchor import build_anchor
from tether.config import JobSpec, apply_updates, validate_job
from tether.train.loop import anchored_clipped_gradient_
from tether.train.setup import make_plan, resolve_strength, scheduled_lr_sum
from tether.train.strategy import DataParallel

from .test_runs import local_job

CPU = DataParallel(0, 1, torch.device("cpu"))


def strength_job(tiny_model_dir, easy_csv, tmp_path, kappa=3.0, **sections) -> dict:
    job = local_job(tiny_model_dir, easy_csv, tmp_path, **sections)
    job["objective"] = {"mode": "decoupled", "strength": kappa}
    job["optim"] |= {"warmup_ratio": 0.2, "scheduler": "cosine"}
    return job


def test_strength_sets_lambda_from_the_runs_own_schedule(tiny_model_dir, easy_csv, tmp_path):
    """λ = κ / Σ_t lr_t, where lr_t is what the scheduler really hands each step (warm-up and
    cosine included); 4× the steps gives a quarter of the λ for the same κ."""
    spec = validate_job(strength_job(tiny_model_dir, easy_csv, tmp_path, kappa=2.0))
    resolved = resolve_strength(spec, 64)  # 4 steps: κ = 2 is a pull of lr·λ = 0.8 at peak
    plan = make_plan(spec, 64, 1)
    # the lrs an AdamW + LambdaLR pair like set_up's hands out, step by step
    from tether.train.setup import lr_schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=spec.optim.lr)
    warmup = round(spec.optim.warmup_ratio * plan.total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule("cosine", warmup, plan.total_steps))
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert resolved.objective.lam * math.fsum(lrs) == pytest.approx(2.0, rel=1e-12)
    assert scheduled_lr_sum(spec, plan) == pytest.approx(math.fsum(lrs), rel=1e-12)

    longer = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 4})})
    # 4 → 16 steps: Σ lr grows 3.4× (2.5 → 8.5 peak-lr steps: the short warm-up and cosine
    # tail weigh more in a short run), and λ shrinks by as much
    ratio = resolved.objective.lam / resolve_strength(longer, 64).objective.lam
    assert ratio == pytest.approx(8.5 / 2.5, rel=1e-9)
    # over a run of many small steps, a displacement the data stops pushing shrinks ≈ e^(−κ)
    big = make_plan(spec, 6400, 1)
    factor = lr_schedule("cosine", round(0.2 * big.total_steps), big.total_steps)
    lam = resolve_strength(spec, 6400).objective.lam
    left = math.prod(1 - spec.optim.lr * factor(t) * lam for t in range(big.total_steps))
    assert left == pytest.approx(math.exp(-2.0), rel=0.05)


def test_strength_is_spread_over_the_steps_that_pull(tiny_model_dir, easy_csv, tmp_path):
    """LP-FT's probe keeps the backbone at θ* and pulls nothing: κ is λ·Σ lr_t over the steps
    after it. A probe as long as the run leaves nothing to anchor, and says so."""
    from tether.errors import SpecError
    from tether.train.setup import scheduled_lrs

    job = strength_job(tiny_model_dir, easy_csv, tmp_path, kappa=1.0)
    spec = validate_job(apply_updates(job, {"train": {"head_warmup_steps": 10}}))
    plan = make_plan(spec, 640, 1)  # 40 steps, the first 10 a probe
    lrs = scheduled_lrs(spec, plan)
    lam = resolve_strength(spec, 640).objective.lam
    assert lam * math.fsum(lrs[10:]) == pytest.approx(1.0, rel=1e-12)
    assert lam * math.fsum(lrs) > 1.2  # counting the probe would have made it weaker
    with pytest.raises(SpecError, match="head_warmup_steps: 10 covers all 4 steps"):
        resolve_strength(spec, 64)


def test_strength_is_decoupled_only_exclusive_with_lambda_and_round_trips(
    tiny_model_dir, easy_csv, tmp_path
):
    job = strength_job(tiny_model_dir, easy_csv, tmp_path)
    with pytest.raises(Exception, match="needs mode: decoupled"):
        validate_job(job | {"objective": {"strength": 3.0}})
    with pytest.raises(Exception, match="exclusive"):
        validate_job(job | {"objective": {"mode": "decoupled", "strength": 3.0, "lambda": 0.1}})
    spec = validate_job(job)
    dumped = spec.to_dict()
    assert "lambda" not in dumped["objective"] and dumped["objective"]["strength"] == 3.0
    assert JobSpec.model_validate(dumped) == spec  # the job as written
    # an override of one replaces the other (a dumped spec carries λ's default)
    assert (
        validate_job(apply_updates(dumped, {"objective": {"lambda": 0.0}})).objective.strength
        is None
    )
    plain = validate_job(local_job(tiny_model_dir, easy_csv, tmp_path)).to_dict()
    plain["objective"]["mode"] = "decoupled"
    swapped = validate_job(apply_updates(plain, {"objective": {"strength": 1.0}}))
    assert swapped.objective.strength == 1.0


def test_a_run_with_a_strength_records_kappa_and_the_lambda_it_used(
    tiny_model_dir, easy_csv, tmp_path
):
    from tether.run import run_training

    db = tmp_path / "mlflow.db"
    spec = validate_job(strength_job(tiny_model_dir, easy_csv, tmp_path, db=db))
    summary = run_training(spec).summary
    lam = summary["objective"]["lambda"]
    assert summary["objective"]["strength"] == 3.0 and lam > 0
    card = json.loads((Path(summary["model_dir"]) / "tether.json").read_text())
    assert card["objective"]["strength"] == 3.0 and card["objective"]["lambda"] == lam
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(summary["mlflow_run_id"])
    assert float(run.data.params["objective.lambda"]) == pytest.approx(lam)
    assert run.data.params["objective.strength"] == "3.0"


def test_fine_only_clipping_keeps_the_data_gradient_and_adds_the_anchor_in_full():
    """With a large anchor term, total clipping shrinks the data's gradient with it;
    fine_only clips the data's gradient alone and adds 2λ(θ − θ*) unclipped."""

    def setup():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(10))
        anchor = build_anchor([("w", p)], 50.0, "coupled")
        with torch.no_grad():
            p.add_(1.0)  # θ − θ* = 1 everywhere: anchor term 2λ = 100 per coordinate
        p.grad = torch.full((10,), 0.3)  # the data's gradient, norm ≈ 0.95
        return p, anchor

    p, anchor = setup()
    anchored_clipped_gradient_([p], anchor, 1.0, "total", CPU)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)  # the sum was clipped

    p, anchor = setup()
    anchored_clipped_gradient_([p], anchor, 0.5, "fine_only", CPU)
    data = torch.full((10,), 0.3) * (0.5 / float(torch.full((10,), 0.3).norm()))
    torch.testing.assert_close(p.grad, data + 100.0)


def test_head_warmup_trains_the_head_alone_then_everything(tiny_model_dir, easy_csv, tmp_path):
    """LP-FT: while probing, every pretrained weight stays exactly θ*; after the warm-up
    the backbone moves; train/phase says which phase an evaluation was in."""
    from tether.run import run_training

    def run(warmup: int, name: str):
        job = local_job(
            tiny_model_dir,
            easy_csv,
            tmp_path,
            train={"head_warmup_steps": warmup, "eval_interval": 2},
            storage={"run_name": name},
        )
        return run_training(validate_job(job)).summary

    base = load_file(next(Path(tiny_model_dir).glob("*.safetensors")))
    probe = run(10_000, "probe")  # the whole run is the probe
    weights = load_file(Path(probe["model_dir"]) / "model.safetensors")
    backbone = [k for k in base if f"bert.{k}" in weights]  # the encoder, under the head model
    assert backbone and all(torch.equal(weights[f"bert.{k}"], base[k]) for k in backbone)
    assert probe["metrics"]["train/phase"] == 0.0
    assert probe["metrics"].get("train/drift_l2", 0.0) == 0.0

    lpft = run(2, "lpft")
    weights = load_file(Path(lpft["model_dir"]) / "model.safetensors")
    assert any(not torch.equal(weights[f"bert.{k}"], base[k]) for k in backbone)
    assert lpft["metrics"]["train/phase"] == 1.0

    with pytest.raises(Exception, match="no new head"):
        validate_job(
            {"model": {"task": "causal-lm", "name": "x"}, "train": {"head_warmup_steps": 3}}
        )


def test_a_sweep_can_search_the_strength_and_its_control_arm_is_lambda_zero(
    tiny_model_dir, easy_csv, tmp_path
):
    from tether.sweep.search import baseline_configs, sweep_problems
    from tether.sweep.trial import trial_spec

    job = local_job(tiny_model_dir, easy_csv, tmp_path, scaling={"num_workers": 1})
    job["objective"] = {"mode": "decoupled"}
    space = {
        "objective.strength": {"low": 0.3, "high": 30.0, "scale": "log"},
        "optim.lr": {"low": 1e-4, "high": 1e-3, "scale": "log"},
    }
    spec = validate_job(job | {"tune": {"space": space, "num_samples": 2}})
    assert sweep_problems(spec) == []
    trial = trial_spec(spec.to_dict(), {"objective.strength": 3.0, "optim.lr": 3e-4})
    assert trial.objective.strength == 3.0
    control = baseline_configs(spec, 2)
    assert control and all(c["objective.lambda"] == 0.0 for c in control)
    arm = trial_spec(spec.to_dict(), control[0])
    assert arm.objective.lam == 0.0 and arm.objective.strength is None

    coupled = validate_job(
        job | {"objective": {"mode": "coupled"}, "tune": {"space": space, "num_samples": 2}}
    )
    assert any("needs mode: decoupled" in p for p in sweep_problems(coupled))
    both = space | {"objective.lambda": {"low": 0.01, "high": 1.0}}
    spec = validate_job(job | {"tune": {"space": both, "num_samples": 2}})
    assert any("exclusive" in p for p in sweep_problems(spec))


def test_a_sweep_space_with_trials_that_would_overshoot_is_refused_before_any_trial(
    tiny_model_dir, easy_csv, tmp_path
):
    """The largest κ (or λ) with the largest lr, at each end of the other searched keys, is
    checked on the driver: a space holding trials that would pull past θ* in one step fails
    naming the point, before Ray and before the sweep folder exists."""
    from tether.errors import SpecError
    from tether.sweep import open_sweep
    from tether.sweep.search import pull_problems

    job = local_job(tiny_model_dir, easy_csv, tmp_path, scaling={"num_workers": 1})
    job["objective"] = {"mode": "decoupled"}
    space = {
        "objective.strength": {"low": 0.3, "high": 30.0, "scale": "log"},
        "optim.warmup_ratio": {"values": [0.0, 0.5]},
    }
    spec = validate_job(job | {"tune": {"space": space, "num_samples": 2, "name": "big"}})
    with pytest.raises(
        SpecError, match=r"tune.space: at optim.warmup_ratio=0, objective.strength=30"
    ):
        open_sweep(spec)
    assert not (Path(spec.storage.path) / "big").exists()
    mild = space | {"objective.strength": {"low": 0.1, "high": 1.0, "scale": "log"}}
    spec = validate_job(job | {"tune": {"space": mild, "num_samples": 2, "name": "mild"}})
    assert open_sweep(spec).name == "mild"
    default = validate_job(job | {"tune": {"num_samples": 2}})  # the decoupled default space
    assert pull_problems(default, 64) == []
    job["objective"] = {"mode": "decoupled", "lambda": 10.0}  # lr up to 3e-1: pulls of 3
    lrs = {"optim.lr": {"low": 1e-4, "high": 0.3, "scale": "log"}}
    spec = validate_job(job | {"tune": {"space": lrs, "num_samples": 2, "name": "lr"}})
    with pytest.raises(SpecError, match=r"at optim.lr=0.3, objective: λ = 10"):
        open_sweep(spec)


def test_a_decoupled_pull_that_would_diverge_is_refused_before_training(
    tiny_model_dir, easy_csv, tmp_path
):
    """κ far beyond the run's steps (or a huge decoupled λ) would make each step's pull
    lr·λ ≥ 2, pushing θ away from θ*: refused, saying why."""
    from tether.errors import SpecError

    spec = validate_job(strength_job(tiny_model_dir, easy_csv, tmp_path, kappa=50.0))
    with pytest.raises(SpecError, match="farther"):
        resolve_strength(spec, 64)  # 4 steps
    assert resolve_strength(spec, 64_000).objective.lam > 0  # 4,000 steps: fine
    job = local_job(tiny_model_dir, easy_csv, tmp_path)
    job["objective"] = {"mode": "decoupled", "lambda": 1e4}  # lr 3e-3: a pull of 30 per step
    with pytest.raises(SpecError, match="λ = 1e\\+04"):
        resolve_strength(validate_job(job), 64)
