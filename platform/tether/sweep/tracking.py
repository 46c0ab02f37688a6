"""A sweep in MLflow: one parent run, one child run per trial, the best model registered.

    outcome = run_tracked_sweep(sweep)   # wraps tether.sweep.run_sweep

- parent run: the base job's params, the search space, the sweep summary (best, λ = 0 best,
  margin), trials.csv and the plots;
- child runs (``mlflow.parentRunId``): opened in each trial's actor by ``MlflowTrialHooks``;
  rank 0 logs the trial's curves into it; tagged with the arm (anchored/baseline) and trial id;
- trials the scheduler stops are closed as KILLED by a driver-side Tune callback (the trial's
  process is ended before its own hook can run);
- the best trial's model is logged to its child run, registered as `challenger`, and becomes
  `champion` only if it beats the current one on the same validation data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tether.config import resolve_tracking_uri
from tether.sweep.runner import SweepOutcome, run_sweep
from tether.sweep.trial import TrialExtras, TrialInfo
from tether.tracking import RunRecorder, close_run, open_run, worker_tracking

TRIAL_TAG = "tether.trial_id"


class MlflowTrialHooks:
    """TrialHooks: a child run per trial, under the sweep's parent run. Pickles cheaply."""

    def __init__(self, parent_run_id: str | None):
        self.parent_run_id = parent_run_id
        self._recorders: dict[str, RunRecorder | None] = {}

    def start(self, info: TrialInfo, spec, data) -> TrialExtras:
        tags = {TRIAL_TAG: info.trial_id, "tether.arm": info.arm, "tether.sweep": info.sweep_name}
        recorder = open_run(
            spec,
            f"{info.sweep_name}/{info.trial_id}",
            data,
            parent_run_id=self.parent_run_id,
            extra_tags=tags,
        )
        self._recorders[info.trial_id] = recorder
        return TrialExtras(tracking=worker_tracking(recorder))

    def finish(self, info: TrialInfo, summary: dict[str, Any] | None, status: str) -> None:
        recorder = self._recorders.pop(info.trial_id, None)
        record = summary if summary is not None else {"metrics": {}}
        # trial models are logged only for the winner (after the sweep): each costs seconds
        close_run(recorder, record, status=status)


class CloseStoppedChildRuns(Callback):
    """Driver side: mark child runs of trials that ended without their hook as KILLED/FAILED."""

    def __init__(self, tracking_uri: str, parent_run_id: str):
        self.uri = tracking_uri
        self.parent_run_id = parent_run_id

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial.trial_id, "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial.trial_id, "FAILED")

    def _close(self, trial_id: str, status: str) -> None:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            for run in child_runs(client, self.parent_run_id, trial_id):
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, status)
        except Exception:  # tracking must never break the sweep
            pass


def child_runs(client, parent_run_id: str, trial_id: str | None = None) -> list:
    """The sweep's child runs (or one trial's), newest first. With a trial id the search
    spans the experiment: a trial finished before a resume keeps its run, wherever it is."""
    parent = client.get_run(parent_run_id)
    if trial_id:
        query = f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`tether.sweep` = '{parent.data.tags.get('tether.sweep', '')}'"
    else:
        query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    return client.search_runs(
        [parent.info.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]
    )


def open_parent(sweep, uri: str) -> RunRecorder | None:
    """The sweep's MLflow parent run: reopened when the sweep is resumed (its id is kept in
    sweep.json), else a new one, whose id is then recorded there."""
    from tether.sweep.trial import write_json

    saved_path = Path(sweep.dir) / "sweep.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    if sweep.resumed and saved.get("parent_run_id"):
        recorder = RunRecorder(uri, sweep.spec.tracking.experiment)
        recorder.run_id = saved["parent_run_id"]
        recorder._call("reopen run", recorder.client.update_run, recorder.run_id, status="RUNNING")
        return recorder
    parent = open_run(
        sweep.spec,
        sweep.name,
        sweep.data,
        extra_tags={"tether.sweep": sweep.name, "tether.role": "sweep"},
        task=sweep.task,
    )
    if parent is not None and parent.run_id and saved:
        write_json(saved_path, saved | {"parent_run_id": parent.run_id})
    return parent


def run_tracked_sweep(sweep, *, verbose: bool = False) -> SweepOutcome:
    """Run the sweep with MLflow parent/child runs and register the best trial's model."""
    spec = sweep.spec
    if not spec.tracking.enabled:
        outcome = run_sweep(sweep, verbose=verbose)
        outcome.summary.update(tracking="off", parent_run_id=None)
        return outcome
    uri = resolve_tracking_uri(spec.tracking.uri)
    parent = open_parent(sweep, uri)
    parent_id = parent.run_id if parent else None
    if parent_id and sweep.spec.tune is not None and not sweep.resumed:
        parent.log_text(
            json.dumps(sweep.spec.tune.model_dump(mode="json"), indent=2), "search_space.json"
        )
    callbacks = [CloseStoppedChildRuns(uri, parent_id)] if parent_id else []
    try:
        outcome = run_sweep(
            sweep,
            tune_callbacks=callbacks,
            trial_hooks=MlflowTrialHooks(parent_id),
            verbose=verbose,
        )
    except BaseException:
        if parent:
            parent.finish("FAILED")
        raise
    summary = outcome.summary
    record_sweep(parent, summary)
    summary.update(
        parent_run_id=parent_id, tracking="ok" if parent and not parent.errors else "degraded"
    )
    if parent_id and summary.get("best"):
        try:
            summary["registry"] = register_best(sweep, summary, uri, parent_id)
        except Exception as e:  # the sweep is done and on disk: say what registering could not do
            summary["registry"] = {"error": f"{type(e).__name__}: {e}"}
        if summary["registry"] and "model_uri" in summary["registry"]:
            summary["model_uri"] = summary["registry"]["model_uri"]
            summary["champion_uri"] = summary["registry"].get("champion_uri")
    if parent:
        parent.finish("FINISHED")
    _rewrite_summary(sweep.dir, summary)
    return outcome


def record_sweep(parent: RunRecorder | None, summary: dict[str, Any]) -> None:
    """The sweep's outcome on the parent run: best metrics, margin over λ = 0, files."""
    if parent is None or parent.run_id is None:
        return
    best, base = summary.get("best") or {}, summary.get("baseline_best") or {}
    metrics = {f"best/{k}": v for k, v in (best.get("metrics") or {}).items()}
    metrics |= {f"baseline_best/{k}": v for k, v in (base.get("metrics") or {}).items()}
    if summary.get("anchored_minus_baseline") is not None:
        metrics["anchored_minus_baseline"] = summary["anchored_minus_baseline"]
    metrics["trials"] = summary.get("trials", 0)
    metrics["trial_epochs"] = summary.get("trial_epochs", 0)
    parent.log_metrics(metrics)
    parent.set_tags({f"best.{k}": v for k, v in (best.get("config") or {}).items()})
    for path in [summary.get("csv"), *summary.get("plots", [])]:
        if path and Path(path).is_file():
            parent.log_artifact(Path(path), "sweep")


def register_best(sweep, summary: dict[str, Any], uri: str, parent_id: str) -> dict | None:
    """Log the best trial's model (its best checkpoint) to its child run, register it, and
    apply the champion gate on the sweep's metric and direction."""
    from mlflow.tracking import MlflowClient

    from tether.registry import log_model
    from tether.run import register_model

    best = summary["best"]
    if not best.get("model_dir"):
        return {"error": "not registered: the best trial has no model (its checkpoints are gone)"}
    client = MlflowClient(tracking_uri=uri)
    runs = child_runs(client, parent_id, best.get("trial_id"))
    finished = [r for r in runs if r.info.status == "FINISHED"] or runs
    run_id = finished[0].info.run_id if finished else parent_id
    model_uri = log_model(uri, run_id, Path(best["model_dir"]))
    record = {
        "metrics": best.get("best_metrics") or best["metrics"],
        "model_uri": model_uri,
        "mlflow_run_id": run_id,
        "run_dir": str(Path(best["model_dir"]).parent),
        "task": sweep.task.name,
        "label_names": sweep.data.label_names,
    }
    spec = sweep.trial_spec(best["searched"])
    return register_model(spec, sweep.task, record, sweep.data, sweep.metric, sweep.mode)


def _rewrite_summary(sweep_dir: Path, summary: dict[str, Any]) -> None:
    path = Path(sweep_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
