"""`tether tune`: search-space validation, the λ = 0 control arm, ASHA sweeps and resume on Ray."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tether.config import SpecError, deep_merge, validate_job
from tether.sweep import TrialExtras, default_concurrency, open_sweep, run_sweep
from tether.sweep.search import (
    FixedConfigs,
    WithControlArm,
    baseline_configs,
    validate_sweep,
)
from tether.sweep.trial import ARM

from .helpers import make_tiny_job

REPO = Path(__file__).resolve().parents[1]


def sweep_job(model_dir, easy_csv, storage: Path, tune: dict, **sections) -> dict:
    """The tiny job as one-worker trials (two fit the 4-CPU test cluster at once)."""
    job = make_tiny_job(
        model_dir,
        easy_csv,
        storage,
        train={"epochs": 2, "eval_interval": 10},
        scaling={"num_workers": 1},
        tune={"max_concurrent_trials": 2, "max_failures": 0, **tune},
    )
    return deep_merge(job, sections)


def all_results(sweep_dir: Path) -> dict[str, list[dict]]:
    """Each trial's results as Tune recorded them (result.json), read independently."""
    out = {}
    for path in (sweep_dir / "tune").glob("*/result.json"):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().strip().splitlines()]
    return out


def last_results(sweep_dir: Path) -> dict[str, dict]:
    return {t: results[-1] for t, results in all_results(sweep_dir).items()}


# --------------------------------------------------------------------------- validation


def test_bad_search_spaces_are_all_reported_before_anything_runs(tiny_job):
    """Empty, inverted and non-positive log ranges, unknown or untunable keys, invalid values
    and a metric the task does not report fail together, each naming its key."""
    job = tiny_job | {
        "tune": {
            "metric": "eval/bleu",
            "space": {
                "objective.lambda": {"low": 0.1, "high": 0.1},
                "optim.lr": {"low": 1e-3, "high": 1e-5},
                "optim.warmup_ratio": {"low": 0.0, "high": 0.2},  # log scale is the default
                "optim.learning_rate": {"low": 1e-5, "high": 1e-3},
                "scaling.num_workers": {"values": [1, 2]},
                "train.batch_size": {"values": [16, -4]},
            },
        }
    }
    with pytest.raises(SpecError) as err:
        validate_sweep(validate_job(job))
    expected = [
        "tune.space.objective.lambda: empty range",
        "tune.space.optim.lr: inverted range",
        "tune.space.optim.warmup_ratio: a log scale needs low > 0",
        "tune.space.optim.learning_rate: unknown key",
        "tune.space.scaling.num_workers: not a hyperparameter",
        "tune.space.train.batch_size: -4 is not a valid train.batch_size",
        "tune.metric: 'eval/bleu' is not reported",
    ]
    problems = err.value.problems
    assert len(problems) == len(expected), problems
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)


def test_grid_search_needs_explicit_values(tiny_job):
    """A grid cannot be built from a range; the error names the key and says so."""
    job = tiny_job | {
        "tune": {"search": "grid", "space": {"optim.lr": {"low": 1e-5, "high": 1e-3}}}
    }
    with pytest.raises(SpecError, match=r"tune.space.optim.lr: search: grid needs explicit values"):
        validate_sweep(validate_job(job))


def test_cli_rejects_a_bad_sweep_with_exit_2_and_creates_nothing(tiny_job, tmp_path, capsys):
    """`tether tune` on an invalid space exits 2 before any sweep folder or trial exists."""
    from tether.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(tiny_job | {"tune": {"space": {"optim.lr": {"low": -1, "high": 1}}}})
    )
    assert main(["tune", str(path)]) == 2
    assert "tune.space.optim.lr: a log scale needs low > 0" in capsys.readouterr().err
    assert not Path(tiny_job["storage"]["path"]).exists()


def test_concurrency_counts_whole_trials_and_refuses_one_that_cannot_fit(tiny_job):
    """Each running trial holds all its workers' CPUs (or GPUs); a trial larger than the
    cluster is a spec error, not a sweep that waits forever."""
    two_workers = validate_job(tiny_job)  # 2 workers × 1 CPU
    assert default_concurrency(two_workers, {"CPU": 4.0}) == 2
    assert default_concurrency(two_workers, {"CPU": 5.0}) == 2
    gpu = validate_job(deep_merge(tiny_job, {"scaling": {"use_gpu": True, "num_workers": 1}}))
    assert default_concurrency(gpu, {"CPU": 16.0, "GPU": 2.0}) == 2
    with pytest.raises(SpecError, match="one trial needs"):
        default_concurrency(two_workers, {"CPU": 1.0})


# --------------------------------------------------------------------------- the control arm


def test_control_arm_covers_the_lr_range_and_is_hidden_from_the_searcher(tiny_job):
    """λ = 0 trials spread lr over its log range, interleave with the searched ones, and never
    reach the inner searcher (it only learns from the trials it suggested)."""
    spec = validate_job(
        tiny_job
        | {
            "tune": {
                "baseline_samples": 3,
                "space": {
                    "objective.lambda": {"low": 1e-4, "high": 1e-1},
                    "optim.lr": {"low": 1e-5, "high": 1e-3},
                },
            }
        }
    )
    control = baseline_configs(spec, num_anchored=6)
    lrs = [c["optim.lr"] for c in control]
    assert [c["objective.lambda"] for c in control] == [0.0, 0.0, 0.0]
    assert lrs == pytest.approx([10 ** (-5 + 2 * (i + 0.5) / 3) for i in range(3)])

    class Recorder(FixedConfigs):
        completed: list[str] = []

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.completed.append(trial_id)

    inner = Recorder(
        [{"objective.lambda": 0.01 * (i + 1), "optim.lr": 1e-4} for i in range(6)],
        "eval/accuracy",
        "max",
    )
    searcher = WithControlArm(inner, control, total=9)
    configs = [searcher.suggest(f"t{i}") for i in range(9)]
    assert searcher.suggest("t9") == searcher.FINISHED
    arms = [c[ARM] for c in configs]
    assert arms.count("baseline") == 3 and arms[0] == "anchored" and arms[-1] == "anchored"
    for i in range(9):
        searcher.on_trial_complete(f"t{i}", {"eval/accuracy": 0.5})
    assert inner.completed == [f"t{i}" for i in range(9) if arms[i] == "anchored"]


# --------------------------------------------------------------------------- an ASHA sweep


class RecordingHooks:
    """Trial hooks that leave one file per call (they run in the trials' actors)."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def start(self, info, spec, data):
        Path(self.folder, f"{info.trial_id}.start").write_text(json.dumps(info.config))
        return TrialExtras()

    def finish(self, info, summary, status):
        Path(self.folder, f"{info.trial_id}.finish").write_text(status)
        summary["hook"] = "finished"


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, tiny_model_dir, easy_csv, tmp_path_factory):
    """One 4-trial grid sweep under ASHA: good and hopeless lr, each anchored and at λ = 0.
    The anchored trials search the decoupled strength κ (λ is derived per trial).

    The hopeless-lr trials come after the good ones, so at the 1.2-epoch rung they meet
    recorded results far above theirs: stopping is certain, not luck.
    """
    from ray.tune import Callback

    class Completions(Callback):
        seen: list[str] = []

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.seen.append(trial.trial_id)

    root = tmp_path_factory.mktemp("asha")
    (root / "hooks").mkdir()
    tune = {
        "name": "asha",
        "search": "grid",
        "space": {"objective.strength": {"values": [1.0]}, "optim.lr": {"values": [3e-3, 1e-5]}},
        "asha": {"grace_period": 1.2, "reduction_factor": 2},
    }
    job = sweep_job(tiny_model_dir, easy_csv, root / "runs", tune)
    job["objective"] = {"mode": "decoupled"}
    spec = validate_job(job)
    completions = Completions()
    started = time.perf_counter()
    previous = signal.signal(signal.SIGINT, callers_ctrl_c)  # as `tether demo` has its own
    try:
        outcome = run_sweep(
            open_sweep(spec),
            tune_callbacks=[completions],
            trial_hooks=RecordingHooks(root / "hooks"),
        )
        yield outcome, completions, root, time.perf_counter() - started
    finally:
        signal.signal(signal.SIGINT, previous)


def callers_ctrl_c(signum, frame):
    """The SIGINT handler the sweep's caller had: it must be back once run_sweep returns."""
    raise KeyboardInterrupt


@pytest.mark.ray
@pytest.mark.slow
def test_asha_sweep_finishes_stops_a_trial_and_picks_the_best(asha_sweep):
    """All trials end, ASHA stops at least one early, and the best trial is the one with the
    highest accuracy at any of its evaluations, with a model holding that checkpoint."""
    outcome, _, _, _ = asha_sweep
    summary, rows = outcome.summary, outcome.rows
    assert summary["trials"] == len(rows) == 4
    assert {r["status"] for r in rows} <= {"completed", "stopped"}
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped and all(r["epochs"] < 2.0 for r in stopped)
    assert all(r["status"] == "stopped" for r in rows if r["config"]["optim.lr"] == 1e-5)

    results = all_results(Path(summary["sweep_dir"]))
    reported = {t: r[-1] for t, r in results.items()}
    assert len(reported) == 4
    best_of = {t: max(x["eval/accuracy"] for x in r) for t, r in results.items()}
    best = summary["best"]
    assert best["metric"] == max(best_of.values()) == best_of[best["trial_id"]]
    card = json.loads((Path(best["model_dir"]) / "tether.json").read_text())
    assert card["step"] == best["best_step"]  # the registered weights are the ones that won
    assert card["metrics"]["eval/accuracy"] == best["metric"]
    assert Path(best["best_checkpoint"]).is_dir()
    assert summary["trial_epochs"] == pytest.approx(sum(r["epoch"] for r in reported.values()))


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_belongs_to_the_caller_again_after_a_sweep(asha_sweep):
    """Tune swaps in its own SIGINT handler for a run; once run_sweep returns, the caller's
    handler is back (what `tether demo` relies on to stop serving on Ctrl-C)."""
    assert signal.getsignal(signal.SIGINT) is callers_ctrl_c


@pytest.mark.ray
@pytest.mark.slow
def test_finished_losing_trials_give_their_checkpoints_back(asha_sweep):
    """keep_checkpoints=best (the default): the arms' bests keep their checkpoint folders;
    every other finished trial's are deleted, its row says so, and the bytes are counted."""
    summary, rows = asha_sweep[0].summary, asha_sweep[0].rows
    sweep_dir = Path(summary["sweep_dir"])
    kept = {summary[k]["trial_id"] for k in ("best", "best_anchored", "baseline_best")}
    assert 0 < len(kept) < len(rows)
    for r in rows:
        trial_dir = sweep_dir / "trials" / r["trial_id"]
        folders = [f for f in trial_dir.glob("checkpoint_*") if f.is_dir()]
        if r["trial_id"] in kept:
            assert folders and Path(r["checkpoint"]).is_dir()
        else:
            assert folders == [] and r["checkpoint"] is None
    assert summary["checkpoint_bytes_freed"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_baseline_arm_is_run_and_reported_separately(asha_sweep):
    """The λ = 0 trials run over the same lr values and get their own best and difference."""
    summary, rows = asha_sweep[0].summary, asha_sweep[0].rows
    baseline = [r for r in rows if r["arm"] == "baseline"]
    anchored = [r for r in rows if r["arm"] == "anchored"]
    assert sorted(r["config"]["optim.lr"] for r in baseline) == [1e-5, 3e-3]
    assert all(r["config"]["objective.lambda"] == 0.0 for r in baseline)
    assert all(r["config"]["objective.strength"] == 1.0 for r in anchored)
    assert all(r["config"]["objective.lambda"] > 0 for r in anchored)
    b, a = summary["baseline_best"], summary["best_anchored"]
    assert b["arm"] == "baseline" and b["config"]["objective.lambda"] == 0.0
    assert b["metric"] == max(r["metric"] for r in baseline)
    assert summary["control"].startswith("the λ = 0 arm differs from anchored trials only in λ")
    assert summary["anchored_minus_baseline"] == pytest.approx(a["metric"] - b["metric"])


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_writes_table_csv_plots_and_summary(asha_sweep):
    """trials.csv has a row per trial with arm, λ and lr; both plots are PNGs; summary.json
    on disk is the returned summary."""
    summary = asha_sweep[0].summary
    sweep_dir = Path(summary["sweep_dir"])
    lines = Path(summary["csv"]).read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("trial,trial_id,arm,objective.lambda,optim.lr")
    assert [Path(p).name for p in summary["plots"]] == [
        "metric_vs_lambda_lr.png",
        "validation_curves.png",
    ]
    for plot in summary["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((sweep_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))


@pytest.mark.ray
@pytest.mark.slow
def test_trial_hooks_and_tune_callbacks_see_every_trial(asha_sweep):
    """Each trial's hooks start in its actor, completed ones finish (and may annotate the
    trial summary), stopped ones are never reported as finished, and driver-side Tune
    callbacks see every trial end."""
    outcome, completions, root, _ = asha_sweep
    ids = {r["trial_id"] for r in outcome.rows}
    assert {p.stem for p in (root / "hooks").glob("*.start")} == ids
    status = {p.stem: p.read_text() for p in (root / "hooks").glob("*.finish")}
    completed = {r["trial_id"] for r in outcome.rows if r["status"] == "completed"}
    assert {t for t, s in status.items() if s == "FINISHED"} == completed
    # a stopped trial's own hook may be cut short, or (under load) see its fit fail before
    # Tune's stop event is visible: the driver-side callback below is the authoritative record
    assert {s for t, s in status.items() if t not in completed} <= {"KILLED", "FAILED"}
    for trial_id in completed:
        trial_summary = json.loads(
            Path(outcome.summary["sweep_dir"], "trials", trial_id, "summary.json").read_text()
        )
        assert trial_summary["hook"] == "finished"
    assert set(completions.seen) == ids


@pytest.mark.ray
@pytest.mark.slow
def test_a_strength_sweep_reports_each_trials_lambda_and_exports_its_checkpoints(asha_sweep):
    """With κ searched, a trial's row shows the λ its workers derived (λ·Σ lr_t = κ), and its
    best checkpoint exports from the trial's own values (as for an ASHA-stopped best trial:
    the sweep's job carries λ's default, which must not be mixed back in)."""
    from tether.sweep.runner import export_best_model, open_sweep
    from tether.train.setup import make_plan, scheduled_lr_sum

    outcome = asha_sweep[0]
    sweep_dir = Path(outcome.summary["sweep_dir"])
    job = json.loads((sweep_dir / "sweep.json").read_text())["job"]
    sweep = open_sweep(validate_job(job), resume=sweep_dir.name)
    anchored = [r for r in outcome.rows if r["arm"] == "anchored"]
    kept = [r for r in anchored if r["best_checkpoint"]]  # losing trials gave theirs back
    assert outcome.summary["best_anchored"]["trial_id"] in {r["trial_id"] for r in kept}
    for row in kept:
        # what the trial's workers recorded, against the driver's row and the formula
        state = json.loads((Path(row["best_checkpoint"]) / "trainer_state.json").read_text())
        worker_lambda = state["anchor"]["lambda"]
        assert row["config"]["objective.lambda"] == worker_lambda > 0
        ran = sweep.trial_spec(row["searched"])
        plan = make_plan(ran, len(sweep.data.train), 1)
        assert worker_lambda * scheduled_lr_sum(ran, plan) == pytest.approx(1.0, rel=1e-9)
    best = next(
        r for r in anchored if r["trial_id"] == outcome.summary["best_anchored"]["trial_id"]
    )
    shutil.rmtree(sweep_dir / "trials" / best["trial_id"] / "best_model", ignore_errors=True)
    row = dict(best, model_dir=None)  # as if ASHA had stopped it: export its best checkpoint
    export_best_model(sweep, row)
    card = json.loads((Path(row["model_dir"]) / "tether.json").read_text())
    assert card["step"] == best["best_step"] and card["objective"]["strength"] == 1.0
    assert card["objective"]["lambda"] == best["config"]["objective.lambda"]


# --------------------------------------------------------------------------- resume


@pytest.mark.ray
@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(
    ray_cluster, tiny_model_dir, easy_csv, tmp_path
):
    """SIGKILL the `tether tune` driver (and its local cluster) after two trials finished;
    --resume runs only what was unfinished and the sweep completes."""
    tune = {
        "name": "resumable",
        "search": "optuna",
        "scheduler": "none",
        "num_samples": 2,
        "baseline_samples": 2,
        "seed": 3,
        "space": {
            "objective.lambda": {"low": 1e-4, "high": 1e-2},
            "optim.lr": {"low": 1e-3, "high": 5e-3},
        },
    }
    job = sweep_job(tiny_model_dir, easy_csv, tmp_path / "runs", tune, train={"epochs": 1})
    job_path = tmp_path / "sweep.yaml"
    job_path.write_text(yaml.safe_dump(job))
    trials = tmp_path / "runs" / "resumable" / "trials"
    # RAY_ADDRESS=local: a cluster of its own, never one someone else started on this machine
    env = os.environ | {"RAY_ADDRESS": "local"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "tune", str(job_path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(trials.glob("*/summary.json"))) < 2:
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline, "two trials did not finish in time"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its GCS and raylet: a crash
        output = driver.communicate(timeout=60)[0]
    finished = {p.parent.name for p in trials.glob("*/summary.json")}
    assert "[tether] sweep resumable: 4 trials" in output
    assert "Trial status" not in output  # our one line per trial, not Tune's status table

    from mlflow.tracking import MlflowClient

    from tether.sweep import run_tracked_sweep

    saved = json.loads((tmp_path / "runs" / "resumable" / "sweep.json").read_text())
    assert saved["parent_run_id"], "the killed sweep recorded its MLflow parent run"
    spec = validate_job(job)
    outcome = run_tracked_sweep(open_sweep(spec, resume=True))
    rows = outcome.rows
    # the resumed sweep reopened its parent run: every trial's child run is under it
    assert outcome.summary["parent_run_id"] == saved["parent_run_id"]
    client = MlflowClient(tracking_uri=saved["job"]["tracking"]["uri"])
    parent = client.get_run(saved["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {c.data.tags["tether.trial_id"] for c in children} == {r["trial_id"] for r in rows}
    assert outcome.summary["registry"]["version"]
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    for r in rows:
        attempts = (trials / r["trial_id"] / "attempts.log").read_text().split()
        if r["trial_id"] in finished:
            assert attempts.count("train") == 1, (r["trial_id"], attempts)
    assert sum(r["arm"] == "baseline" for r in rows) == 2
    assert all(math.isfinite(r["metric"]) for r in rows)


@pytest.mark.ray
@pytest.mark.slow
def test_a_ner_sweep_ranks_on_entity_f1_and_registers_the_best(
    ray_cluster, tiny_model_dir, tmp_path
):
    """Token classification through tune: trials ranked by eval/entity_f1 (max), the best
    registered and gated on that metric."""
    from mlflow.tracking import MlflowClient

    from tether.sweep import run_tracked_sweep

    db = tmp_path / "mlflow.db"
    job = {
        "name": "ner-sweep",
        "model": {"name": str(tiny_model_dir), "task": "token-classification"},
        "data": {
            "train": "synthetic:entities",
            "max_train_samples": 480,
            "max_validation_samples": 100,
            "max_length": 40,
        },
        "optim": {"warmup_ratio": 0.0},
        "train": {"epochs": 3, "batch_size": 16, "eval_interval": 30},
        "scaling": {"num_workers": 1, "max_failures": 0},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{db}", "experiment": "ner", "registered_model": "ner"},
        "tune": {
            "search": "grid",
            "scheduler": "none",
            "space": {"objective.lambda": {"values": [1e-3]}, "optim.lr": {"values": [5e-3, 1e-5]}},
            "max_concurrent_trials": 2,
            "max_failures": 0,
            "include_baseline": False,
        },
    }
    outcome = run_tracked_sweep(open_sweep(validate_job(job)))
    summary = outcome.summary
    assert (summary["metric"], summary["mode"]) == ("eval/entity_f1", "max")
    scores = {r["trial_id"]: r["metric"] for r in outcome.rows}
    assert summary["best"]["metric"] == max(scores.values()) > 0.1
    registry = summary["registry"]
    assert registry["metric"] == "eval/entity_f1" and registry["promoted"] is True
    version = MlflowClient(tracking_uri=f"sqlite:///{db}").get_model_version(
        "ner", registry["version"]
    )
    assert version.tags["tether.metric"] == "eval/entity_f1"
    assert version.tags["tether.task"] == "token-classification"
