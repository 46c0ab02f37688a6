"""MLflow tracking: one run per training job, curves from rank 0, lineage, the model artifact.

Who writes what:
- the driver opens the run (params, tags, the resolved spec, dataset inputs), and after the fit
  closes it (final metrics, the model-card tags; the model itself is logged by
  ``tether.registry.log_model``, which this module does not import);
- rank 0 of the Train workers logs the metric curves at each evaluation, one batched call
  per evaluation (``MlflowTracker``); other ranks get a ``NullTracker``.

If the tracking store goes away mid-run, training carries on: the tracker warns once, counts
the failures, and the summary says ``tracking: "degraded"``.

Default store: SQLite (``sqlite:///<cwd>/mlflow.db``, registry included) with artifacts in
``<cwd>/mlartifacts``. ``tracking.uri`` in the spec wins, then ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from tether.card import card_or_empty
from tether.config import resolve_tracking_uri

__all__ = ["resolve_tracking_uri", "open_run", "close_run", "make_tracker", "RunRecorder"]

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE = 6000


@contextmanager
def active_tracking_uri(uri: str):
    """MLflow's fluent API against ``uri``, then everything as it was.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into the process environment,
    which would silently redirect every later default; restore both.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_uri, old_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = old_uri
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local SQLite store keep artifacts beside it, absolute (workers run elsewhere)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def get_or_create_experiment(client, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))


# --------------------------------------------------------------------------- worker side


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_table(self, rows: list[dict], artifact_file: str) -> None: ...

    @property
    def errors(self) -> int: ...


class NullTracker:
    """Same methods, does nothing: ranks other than 0, and tracking switched off."""

    errors = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        pass


class MlflowTracker:
    """Logs one evaluation's metrics in a single batched call; never raises."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.errors = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key=k, value=float(v), timestamp=now, step=step)
            for k, v in metrics.items()
            if isinstance(v, (int, float))
        ]
        try:
            for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])
        except Exception as e:  # the store is down: keep training, say so once
            if self.errors == 0:
                print(
                    f"[tether] WARNING: MLflow logging failed, continuing without it: {e}",
                    file=sys.stderr,
                    flush=True,
                )
            self.errors += 1

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        """A small table (e.g. generated samples) as a JSON artifact MLflow's UI shows."""
        try:
            import pandas as pd

            self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)
        except Exception as e:
            if self.errors == 0:
                print(f"[tether] WARNING: MLflow table failed: {e}", file=sys.stderr, flush=True)
            self.errors += 1


def make_tracker(tracking: dict[str, Any] | None, rank: int) -> Tracker:
    """The tracker for this worker: MLflow on rank 0 when the driver opened a run."""
    if rank != 0 or not tracking or not tracking.get("run_id"):
        return NullTracker()
    try:
        return MlflowTracker(tracking["uri"], tracking["run_id"])
    except Exception as e:
        print(f"[tether] WARNING: MLflow unavailable on the worker: {e}", file=sys.stderr)
        tracker = NullTracker()
        tracker.errors = 1
        return tracker


# --------------------------------------------------------------------------- driver side


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}; lists and None become strings (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


class RunRecorder:
    """The driver's view of one MLflow run. Every call degrades to a warning on failure."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.uri = tracking_uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.errors = 0
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _guard(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.errors += 1
            warnings.warn(
                f"MLflow {what} failed ({type(e).__name__}: {e}); continuing", stacklevel=3
            )
            return None

    def start(
        self, run_name: str, tags: dict[str, str], parent_run_id: str | None = None
    ) -> str | None:
        def _start():
            exp_id = get_or_create_experiment(self.client, self.experiment, self.uri)
            all_tags = dict(tags)
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
            return run.info.run_id

        self.run_id = self._guard("start run", _start)
        return self.run_id

    def reopen(self, run_id: str) -> str | None:
        """Continue an earlier attempt's run (a resumed job): RUNNING again, its params and
        curves kept; None if the store no longer has it."""

        def _reopen():
            self.client.get_run(run_id)  # raises if it is gone
            self.client.update_run(run_id, status="RUNNING")
            return run_id

        self.run_id = self._guard("reopen run", _reopen)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in flatten(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            batch = items[i : i + MAX_PARAMS_PER_BATCH]
            self._call("log params", self.client.log_batch, self.run_id, params=batch)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float))
        ]
        self._call("log metrics", self.client.log_batch, self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        self._call("set tags", self.client.log_batch, self.run_id, tags=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log artifact", self.client.log_text, self.run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("log artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dataset(self, name: str, source: str, digest: str, context: str, num_rows: int) -> None:
        self._call(
            "log dataset",
            _log_dataset,
            self.client,
            self.run_id,
            name,
            source,
            digest,
            context,
            num_rows,
        )

    def finish(self, status: str = "FINISHED") -> None:
        self._call("end run", self.client.set_terminated, self.run_id, status)

    def _call(self, what: str, fn, *args, **kwargs):
        if self.run_id is None:
            return None
        return self._guard(what, fn, *args, **kwargs)


def _log_dataset(
    client, run_id: str, name: str, source: str, digest: str, context: str, num_rows: int
) -> None:
    """Dataset lineage: where the data came from and a digest of exactly what was used."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(
        source=_dataset_source(source), name=f"{name} ({num_rows} rows)", digest=digest
    )
    entity = dataset._to_mlflow_entity()
    client.log_inputs(
        run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
    )


def _dataset_source(ref: str):
    from tether.sources import SYNTHETIC_PREFIX, is_local_path

    if ref.startswith(SYNTHETIC_PREFIX):
        from mlflow.data.code_dataset_source import CodeDatasetSource

        return CodeDatasetSource(tags={"generator": "tether.synthetic", "name": ref})
    if is_local_path(ref.split(" ")[0]):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        return resolve_dataset_source(Path(ref.split(" ")[0]).resolve().as_uri())
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    return HuggingFaceDatasetSource(path=ref.split(" ")[0])


# --------------------------------------------------------------------------- one training run


def open_run(
    spec,
    run_name: str,
    data,
    parent_run_id: str | None = None,
    extra_tags: dict | None = None,
    task=None,
    continue_run_id: str | None = None,
) -> RunRecorder | None:
    """Start the MLflow run for a training job: params, tags, spec artifact, dataset inputs.

    ``continue_run_id``: the run an interrupted attempt of this same job opened; a resumed
    job goes on logging there (one run, its whole curve), or starts a new one if it is gone.
    """
    if not spec.tracking.enabled:
        return None
    import yaml

    job = spec.to_dict()
    recorder = RunRecorder(resolve_tracking_uri(spec.tracking.uri), spec.tracking.experiment)
    if continue_run_id is not None and recorder.reopen(continue_run_id) is not None:
        recorder.set_tags({"tether.resumed": "true"})
        return recorder
    tags = {
        "tether.job": spec.name,
        "tether.config_hash": config_hash(job),
        "tether.base_model": spec.model.name,
        "tether.lambda": str(spec.objective.lam),
        "tether.mode": spec.objective.mode,
        "tether.strength": str(spec.objective.strength),
        "tether.baseline": str(spec.objective.lam == 0).lower(),
        "tether.data_fingerprint": data.fingerprint,
        "tether.task": spec.model.task,
    }
    if task is not None:
        tags["tether.primary_metric"] = f"{task.primary_metric} ({task.mode})"
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    job_id = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("TETHER_RAY_JOB_ID")
    if job_id:
        tags["tether.ray_job_id"] = job_id
    tags.update(extra_tags or {})
    if recorder.start(run_name, tags, parent_run_id) is None:
        return recorder  # degraded from the start; training goes on
    # the λ the run uses (derived when the job gives its strength κ instead)
    recorder.log_params(job | {"objective": {**job["objective"], "lambda": spec.objective.lam}})
    recorder.log_text(yaml.safe_dump(job, sort_keys=False), "job.yaml")
    lineage = data.lineage
    recorder.log_dataset(
        f"{spec.name}-train",
        lineage["train_source"],
        f"{data.fingerprint}-train",
        "training",
        lineage["num_train"],
    )
    recorder.log_dataset(
        f"{spec.name}-validation",
        lineage["validation_source"],
        f"{data.fingerprint}-validation",
        "validation",
        lineage["num_validation"],
    )
    return recorder


def worker_tracking(recorder: RunRecorder | None) -> dict[str, Any] | None:
    """What rank 0 needs to log curves into the driver's run."""
    if recorder is None or recorder.run_id is None:
        return None
    return {"uri": recorder.uri, "run_id": recorder.run_id}


def close_run(
    recorder: RunRecorder | None,
    summary: dict[str, Any],
    status: str = "FINISHED",
    model_uri: str | None = None,
) -> None:
    """Final metrics and model-card tags; end the run. ``model_uri``: the model the caller
    logged to this run (``tether.registry.log_model``), if any.

    Adds to ``summary``: mlflow_run_id, model_uri, tracking ("ok" | "degraded" | "off").
    """
    if recorder is None:
        summary.update(mlflow_run_id=None, model_uri=None, tracking="off")
        return
    if recorder.run_id is not None:
        recorder.log_metrics(
            {f"final/{k}": v for k, v in summary.get("metrics", {}).items()},
            step=summary.get("step"),
        )
        card = card_or_empty(summary.get("model_dir"))
        recorder.set_tags(
            {
                "tether.theta_star_sha256": card.get("objective", {}).get("theta_star_sha256"),
                "tether.run_dir": summary.get("run_dir"),
                # a LoRA model's lineage: the base (and θ* hash above) its adapter needs
                "tether.adapter": json.dumps(card.get("objective", {}).get("adapter")),
            }
        )
        summary["model_uri"] = model_uri
        recorder.finish(status)
    worker_errors = int(summary.pop("tracking_errors", 0) or 0)
    degraded = recorder.run_id is None or recorder.errors > 0 or worker_errors > 0
    summary.update(mlflow_run_id=recorder.run_id, tracking="degraded" if degraded else "ok")
    summary.setdefault("model_uri", None)
    if degraded:
        print(
            "tether: WARNING: MLflow tracking was degraded during this run "
            f"({recorder.errors} driver / {worker_errors} worker failures); "
            "the model and checkpoints are complete on disk",
            file=sys.stderr,
        )
