"""Run and sweep correctness: a run folder holds one run, finished runs are not redone, local
mode resumes, the sweep ranks and registers comparable trials (in-process, no cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tether.config import validate_job
from tether.errors import RunIdentityError
from tether.run import default_run_name, run_training
from tether.sweep import report as sweep_report
from tether.sweep.search import sweep_metric, sweep_space
from tether.train.checkpoint import checkpoints, read_state

from .helpers import make_tiny_job


def local_job(model_dir, easy_csv, root: Path, db: Path | None = None, **sections) -> dict:
    tracking = {"uri": f"sqlite:///{db}", "experiment": "runs"} if db else {"enabled": False}
    job = make_tiny_job(
        model_dir,
        easy_csv,
        root / "runs",
        scaling={"num_workers": 0},
        train={"epochs": 1, "eval_interval": 5, "keep_checkpoints": 10},
        tracking=tracking,
        storage={"run_name": "x"},
    )
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    return job


def mlflow_runs(db: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("runs")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.fixture(scope="module")
def finished(tiny_model_dir, easy_csv, tmp_path_factory):
    """One finished, tracked local run named x at λ = 0.01."""
    root = tmp_path_factory.mktemp("finished")
    db = root / "mlflow.db"
    job = local_job(tiny_model_dir, easy_csv, root, db)
    return job, db, run_training(validate_job(job))


def test_reusing_a_finished_run_name_with_another_lambda_is_refused(finished):
    """λ = 0.5 on run x (finished at λ = 0.01) names the key and opens no MLflow run."""
    job, db, _ = finished
    before = len(mlflow_runs(db))
    changed = json.loads(json.dumps(job))
    changed["objective"]["lambda"] = 0.5
    with pytest.raises(RunIdentityError, match=r"objective.lambda: 0.01 → 0.5"):
        run_training(validate_job(changed))
    assert len(mlflow_runs(db)) == before


def test_a_finished_run_is_not_trained_again(finished):
    """The same spec again: the stored summary comes back, nothing trains, no new MLflow run."""
    job, db, first = finished
    before = len(mlflow_runs(db))
    again = run_training(validate_job(job))
    assert again.summary["already_finished"] is True
    assert again.result is None
    assert again.summary["mlflow_run_id"] == first.summary["mlflow_run_id"]
    assert len(mlflow_runs(db)) == before


def test_more_epochs_on_a_finished_run_need_an_explicit_allow(finished, tmp_path):
    """train.epochs is a safe change, but only with allow_changes; others never are."""
    job, _, _ = finished
    longer = json.loads(json.dumps(job))
    longer["train"]["epochs"] = 2
    with pytest.raises(RunIdentityError, match="--allow-change"):
        run_training(validate_job(longer))
    with pytest.raises(RunIdentityError, match="cannot change on resume"):
        run_training(validate_job(longer), allow_changes=("optim.lr",))


def test_default_run_names_are_unique_within_a_second(tiny_job):
    """Two jobs started in the same second get different run folders."""
    spec = validate_job(tiny_job)
    names = {default_run_name(spec) for _ in range(20)}
    assert len(names) == 20


class FailAt:
    """LoopHooks: raise once at ``step`` (an in-process run: the driver's fit fails)."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, step: int, rank: int, world: int) -> None:
        if step == self.step:
            raise RuntimeError(f"test failure at step {step}")


def test_local_mode_resumes_from_its_last_checkpoint_with_the_same_result(
    tiny_model_dir, easy_csv, tmp_path
):
    """A local run that dies at step 12 resumes from checkpoint 10 and ends where an
    uninterrupted run ends."""
    ref = run_training(validate_job(local_job(tiny_model_dir, easy_csv, tmp_path / "ref")))
    job = local_job(tiny_model_dir, easy_csv, tmp_path / "crash")
    with pytest.raises(RuntimeError, match="test failure at step 12"):
        run_training(validate_job(job), hooks=FailAt(12))
    run_dir = Path(job["storage"]["path"]) / "x"
    assert [c.name for c in checkpoints(run_dir)] == ["checkpoint_000005", "checkpoint_000010"]
    resumed = run_training(validate_job(job))
    assert resumed.result.metrics["resumed_from_step"] == 10
    for key in ("eval/accuracy", "eval/loss", "train/drift_l2"):
        assert resumed.summary["metrics"][key] == pytest.approx(
            ref.summary["metrics"][key], rel=1e-6
        )


def test_a_resumed_run_goes_on_in_the_same_mlflow_run(tiny_model_dir, easy_csv, tmp_path):
    """One job, one MLflow run: the attempt that died at step 12 and the one that resumed from
    checkpoint 10 log into the same run, which ends FINISHED with the whole curve."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    job = local_job(tiny_model_dir, easy_csv, tmp_path, db)
    with pytest.raises(RuntimeError, match="test failure at step 12"):
        run_training(validate_job(job), hooks=FailAt(12))
    resumed = run_training(validate_job(job))
    assert resumed.result.metrics["resumed_from_step"] == 10
    (run,) = mlflow_runs(db)
    assert run.info.status == "FINISHED" and run.data.tags["tether.resumed"] == "true"
    assert resumed.summary["mlflow_run_id"] == run.info.run_id
    history = MlflowClient(f"sqlite:///{db}").get_metric_history(run.info.run_id, "eval/loss")
    steps = sorted({m.step for m in history})
    assert steps[:2] == [5, 10] and steps[-1] == resumed.summary["step"] > 10


def test_a_run_continued_with_an_allowed_change_stays_one_mlflow_run(
    tiny_model_dir, easy_csv, tmp_path
):
    """More epochs on a finished run (--allow-change train.epochs) go on in the same MLflow
    run: rewriting the run's identity keeps the record of its MLflow run."""
    db = tmp_path / "mlflow.db"
    job = local_job(tiny_model_dir, easy_csv, tmp_path, db)
    first = run_training(validate_job(job))
    longer = json.loads(json.dumps(job))
    longer["train"]["epochs"] = 2
    more = run_training(validate_job(longer), allow_changes=("train.epochs",))
    assert more.summary["step"] > first.summary["step"]
    (run,) = mlflow_runs(db)
    assert more.summary["mlflow_run_id"] == first.summary["mlflow_run_id"] == run.info.run_id


def test_a_resumed_decoupled_run_keeps_the_pulls_rounding_carry(tiny_model_dir, easy_csv, tmp_path):
    """A decoupled pull below fp32's rounding step waits in the Kahan carry until it adds up
    to a rounding step: the checkpoint keeps the carry, so a run that dies at step 12 and
    resumes from checkpoint 10 ends with exactly the uninterrupted run's weights."""
    from safetensors.torch import load_file

    decoupled = {"mode": "decoupled", "lambda": 1e-4}  # lr·λ = 3e-7 per step

    def final_weights(outcome) -> dict[str, torch.Tensor]:
        return load_file(
            str(checkpoints(Path(outcome.summary["run_dir"]))[-1] / "model.safetensors")
        )

    ref = run_training(
        validate_job(local_job(tiny_model_dir, easy_csv, tmp_path / "ref", objective=decoupled))
    )
    job = local_job(tiny_model_dir, easy_csv, tmp_path / "crash", objective=decoupled)
    with pytest.raises(RuntimeError, match="test failure at step 12"):
        run_training(validate_job(job), hooks=FailAt(12))
    carry = torch.load(
        Path(job["storage"]["path"]) / "x" / "checkpoint_000010" / "loop_rank0.pt",
        weights_only=True,
    )["anchor_carry"]
    assert any(bool(c.abs().max() > 0) for c in carry)  # something was still to be applied
    resumed = run_training(validate_job(job))
    assert resumed.result.metrics["resumed_from_step"] == 10
    expected, got = final_weights(ref), final_weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_fp16_loss_scale_comes_back_on_resume():
    """A resumed fp16-mixed run goes on with the loss scale it had reached (a fresh scaler
    would start at 65536 again and skip other steps than the uninterrupted run)."""
    from tether.train.setup import restore_loop_state

    reached = torch.amp.GradScaler("cpu")
    reached.scale(torch.ones(1))  # the scale exists from the first scaled loss
    reached.update(new_scale=1024.0)
    fresh = torch.amp.GradScaler("cpu")
    restore_loop_state({"scaler": reached.state_dict(), "anchor_carry": []}, None, fresh, 0)
    assert fresh.get_scale() == 1024.0
    assert fresh.state_dict() == reached.state_dict()


def test_local_mode_keeps_the_best_checkpoints_plus_the_latest(
    finished, tiny_model_dir, easy_csv, tmp_path
):
    """keep_checkpoints=2 in local mode: the two best by accuracy, and the last one, remain."""
    _, _, every = finished  # the same training, with every checkpoint kept
    scores = {
        c.name: read_state(c)["metrics"]["eval/accuracy"]
        for c in checkpoints(Path(every.summary["run_dir"]))
    }
    latest = max(scores)
    top2 = sorted((n for n in scores if n != latest), key=lambda n: (scores[n], n))[-2:]
    job = local_job(tiny_model_dir, easy_csv, tmp_path, train={"keep_checkpoints": 2})
    outcome = run_training(validate_job(job))
    kept = {c.name for c in checkpoints(Path(outcome.summary["run_dir"]))}
    assert kept == {latest, *top2}


def test_lambda_zero_control_differs_only_in_lambda(tiny_job):
    """The λ = 0 run keeps pretrained weights free of weight decay, like the anchored run."""
    from tether.train.setup import param_groups

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    anchored = {"0.weight", "0.bias"}
    spec = validate_job(tiny_job)
    groups = param_groups(net, anchored, 1e-3, 0.1, 1.0, decay_anchored=spec.optim.decay_anchored)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(net[0].weight)]["weight_decay"] == 0.0
    assert by_param[id(net[1].weight)]["weight_decay"] == 0.1


# --------------------------------------------------------------------------- sweeps


def test_sweep_metric_and_direction_come_from_the_task(tiny_job):
    """Default metric: the task's primary, in its direction; a loss is minimised."""
    spec = validate_job(tiny_job | {"tune": {}})
    assert sweep_metric(spec) == ("eval/accuracy", "max")
    spec = validate_job(tiny_job | {"tune": {"metric": "eval/loss"}})
    assert sweep_metric(spec) == ("eval/loss", "min")
    ner = validate_job(
        tiny_job
        | {
            "model": {"name": tiny_job["model"]["name"], "task": "token-classification"},
            "data": {"train": "synthetic:entities"},
            "tune": {},
        }
    )
    assert sweep_metric(ner) == ("eval/entity_f1", "max")


def test_decoupled_mode_searches_lambdas_where_the_pull_acts(tiny_job):
    """The default λ range depends on the mode: decoupled λ multiplies lr in the pull."""
    coupled = sweep_space(validate_job(tiny_job | {"tune": {}}))
    job = tiny_job | {"objective": {"mode": "decoupled"}, "tune": {}}
    decoupled = sweep_space(validate_job(job))
    assert coupled["objective.lambda"].high == 0.1
    assert decoupled["objective.lambda"].low >= 1.0


def test_trials_are_ranked_by_their_best_evaluation_including_stopped_ones():
    """A trial ASHA stopped at its peak beats a completed one that overfit later."""
    rows = [
        {"trial_id": "a", "metric": 0.80, "status": "completed"},  # peaked 0.80, ended 0.70
        {"trial_id": "b", "metric": 0.86, "status": "stopped"},
        {"trial_id": "c", "metric": 0.86, "status": "completed"},
        {"trial_id": "d", "metric": None, "status": "failed"},
    ]
    assert sweep_report.pick_best(rows, "max")["trial_id"] == "c"  # ties: the completed one
    assert sweep_report.pick_best(rows[:2], "max")["trial_id"] == "b"
    losses = [
        {"trial_id": "x", "metric": 0.3, "status": "completed"},
        {"trial_id": "y", "metric": 0.2, "status": "stopped"},
    ]
    assert sweep_report.pick_best(losses, "min")["trial_id"] == "y"


def test_a_stopped_best_trial_gets_a_model_from_its_best_checkpoint(finished, tmp_path):
    """The best trial without an export gets one, holding its best checkpoint's weights."""
    from safetensors.torch import load_file

    from tether.run import prepare_run_data
    from tether.sweep.runner import Sweep, export_best_model

    job, _, outcome = finished
    spec = validate_job(job | {"tune": {}})
    run_dir = Path(outcome.summary["run_dir"])
    sweep_dir = tmp_path / "sweep"
    trial_dir = sweep_dir / "trials" / "t1"
    trial_dir.mkdir(parents=True)
    checkpoint = run_dir / "checkpoint_000010"
    task, data = prepare_run_data(spec)
    sweep = Sweep(spec, "s", sweep_dir, task, data, False)
    row = {
        "trial_id": "t1",
        "config": {},
        "searched": {},
        "model_dir": None,
        "best_step": 10,
        "step": 10,
        "best_checkpoint": str(checkpoint),
    }
    export_best_model(sweep, row)
    out = Path(row["model_dir"])
    card = json.loads((out / "tether.json").read_text())
    assert card["step"] == 10 and card["exported_from"] == "checkpoint_000010"
    exported = load_file(out / "model.safetensors")
    trained = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in exported)


def test_a_step_the_fp16_scaler_skips_is_reported_as_skipped():
    """An overflowing fp16 step leaves θ alone and says so: the loop then neither pulls toward
    θ* nor advances the schedule for it."""
    from tether.train.loop import scaled_optimizer_step

    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    (scaler.scale(p.sum()) * float("inf")).backward()
    scaler.unscale_(optimizer)
    assert scaled_optimizer_step(scaler, optimizer) is False
    assert torch.equal(p.detach(), torch.ones(3))
    optimizer.zero_grad()
    scaler.scale(p.sum()).backward()
    scaler.unscale_(optimizer)
    assert scaled_optimizer_step(scaler, optimizer) is True
    assert not torch.equal(p.detach(), torch.ones(3))


def test_a_base_another_driver_downloaded_meanwhile_is_kept(tmp_path, monkeypatch):
    """Two drivers pin the same registered base at once: the second finds the first's copy of
    the same version in place after its own download and keeps it (a run may be loading it);
    a stale version (another run id) is replaced."""
    import tether.registry
    from tether.run import download_base

    def copy_of(run_id: str, where: Path) -> Path:
        where.mkdir(parents=True)
        (where / "tether.json").write_text(json.dumps({"registry": {"run_id": run_id}}))
        return where

    target = tmp_path / "bases" / "m-v1"
    ours = copy_of("r1", tmp_path / "download")

    def fetch_while_another_finishes(model_uri, tracking_uri):
        copy_of("r1", target)
        (target / "loading").write_text("a run reads this copy")
        return ours

    monkeypatch.setattr(tether.registry, "fetch_model_dir", fetch_while_another_finishes)
    monkeypatch.setattr(tether.registry, "discard_download", lambda folder: None)
    download_base("models:/m/1", "sqlite://", target, "r1")
    assert (target / "loading").is_file()  # kept, not swapped under its reader

    (target / "tether.json").write_text(json.dumps({"registry": {"run_id": "stale"}}))
    monkeypatch.setattr(tether.registry, "fetch_model_dir", lambda model_uri, tracking_uri: ours)
    download_base("models:/m/1", "sqlite://", target, "r1")
    assert not (target / "loading").exists()
    assert json.loads((target / "tether.json").read_text())["registry"]["run_id"] == "r1"
