"""Launch a training run on Ray Train: prepare data on the driver, fit, export the model.

    spec = load_job("jobs/demo.yaml", ["objective.lambda=0.1"])
    outcome = run_training(spec)        # → TrainOutcome(summary={...metrics, model_dir...})

``build_trainer`` is the seam the sweep (Ray Tune) uses to run each trial as a Train run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.config import JobSpec
from tether.data import PreparedData, prepare_data
from tether.models import load_tokenizer, resolve_model_source
from tether.tasks import get_task

RESERVED_LOOP_KEYS = ("job", "data", "local_mode", "verbose", "run_name")


@dataclass
class TrainOutcome:
    summary: dict[str, Any]
    result: Any  # ray.train.Result


def prepare_run_data(spec: JobSpec, use_cache: bool = True) -> PreparedData:
    """Tokenize the job's data on the driver (cached), failing before any Ray work."""
    source = resolve_model_source(spec.model.name)
    tokenizer = load_tokenizer(source, spec.model.revision, spec.model.trust_remote_code)
    data = prepare_data(spec.data, tokenizer, spec.model.name, spec.model.label_names, use_cache)
    if spec.model.num_labels is not None and spec.model.num_labels != len(data.label_names):
        from tether.data import DataError

        raise DataError(
            f"model.num_labels: {spec.model.num_labels} but the data has "
            f"{len(data.label_names)} labels {data.label_names}"
        )
    return data


def default_run_name(spec: JobSpec) -> str:
    return spec.storage.run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def ensure_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """Connect to a cluster (spec, RAY_ADDRESS) or start a local one; no-op if connected.

    A local cluster's dashboard binds to 127.0.0.1 (Ray's default): Ray Train's placement-group
    cleaner needs its state API, and the jobs API must never face a network unauthenticated.
    ``log_to_driver=False`` keeps workers' output in Ray's log files (a sweep prints one line
    per trial instead of every trial's progress).
    """
    import ray

    # our progress lines are plain prints: Train's print patch would log each one twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(dashboard_host="127.0.0.1", log_to_driver=log_to_driver)


def build_trainer(
    spec: JobSpec,
    data: PreparedData | Any,
    run_name: str,
    storage_path: str,
    *,
    extra_loop_config: dict[str, Any] | None = None,
    callbacks: list | None = None,
    verbose: bool = False,
):
    """A TorchTrainer running ``train_loop_per_worker`` under the spec's scaling/storage."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tether.loop import train_loop_per_worker

    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker or 1
    local = s.num_workers == 0
    loop_config = {
        "job": spec.to_dict(),
        "data": data,
        "local_mode": local,
        "verbose": verbose,
        "run_name": run_name,
    }
    for key in extra_loop_config or {}:
        if key in RESERVED_LOOP_KEYS:
            raise ValueError(f"extra_loop_config may not set {key!r}")
    loop_config.update(extra_loop_config or {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=None if local else resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.train.keep_checkpoints,
                checkpoint_score_attribute=get_task(spec.model.task).primary_metric,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks or [],
            # Train logs every report at INFO; our one progress line per evaluation says it
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )


def run_training(
    spec: JobSpec,
    *,
    data: PreparedData | None = None,
    extra_loop_config: dict[str, Any] | None = None,
    callbacks: list | None = None,
    verbose: bool = False,
    parent_run_id: str | None = None,
    register: bool = False,
) -> TrainOutcome:
    """Prepare data, fit on Ray Train, copy the final model out, record it in MLflow.

    Returns the run summary (also written to <run_dir>/summary.json). With ``register``, the
    model becomes a new registry version (alias `challenger`) and takes `champion` only if it
    beats the current champion on the same validation data.
    """
    from tether.tracking import close_run, open_run, worker_tracking

    data = data if data is not None else prepare_run_data(spec)
    run_name = default_run_name(spec)
    run_dir = Path(spec.storage.path) / run_name
    local = spec.scaling.num_workers == 0
    if not local:
        ensure_ray(spec.scaling.address)
    import ray

    recorder = open_run(spec, run_name, data, parent_run_id)
    loop_extra = {"tracking": worker_tracking(recorder)} | (extra_loop_config or {})
    payload = data if local else ray.put(data)  # shipped once to the object store
    trainer = build_trainer(
        spec,
        payload,
        run_name,
        spec.storage.path,
        extra_loop_config=loop_extra,
        callbacks=callbacks,
        verbose=verbose,
    )
    try:
        with caller_signal_handlers():
            result = trainer.fit()
    except BaseException:
        close_run(recorder, {"metrics": {}}, status="FAILED")
        raise
    summary = summarize(spec, result, run_name, run_dir, data)
    close_run(recorder, summary)
    if register and summary.get("model_uri"):
        from tether.registry import register_and_gate

        summary["registry"] = register_and_gate(spec, summary, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainOutcome(summary=summary, result=result)


def summarize(
    spec: JobSpec, result, run_name: str, run_dir: Path, data: PreparedData
) -> dict[str, Any]:
    """Final metrics, where the model and checkpoints are, and the data lineage."""
    from tether.checkpoints import HF_MODEL_DIR

    model_dir = run_dir / "model"
    checkpoint = result.checkpoint
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            exported = Path(ckpt) / HF_MODEL_DIR
            if exported.is_dir():
                shutil.copytree(exported, model_dir, dirs_exist_ok=True)
    metrics = dict(result.metrics or {})
    best = [
        {"path": c.path, "metrics": {k: m[k] for k in m if k.startswith("eval/")}}
        for c, m in (result.best_checkpoints or [])
    ]
    return {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("eval/", "train/"))},
        "step": metrics.get("step"),
        "model_dir": str(model_dir) if model_dir.is_dir() else None,
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "best_checkpoints": best,
        "objective": {"lambda": spec.objective.lam, "mode": spec.objective.mode},
        "data": data.lineage,
        "label_names": data.label_names,
        "tracking_errors": int(metrics.get("tracking_errors", 0) or 0),
    }


@contextlib.contextmanager
def caller_signal_handlers():
    """Give the caller back its signal handlers after a Ray Train fit or a Tune run.

    Both install their own SIGINT handler in the driver for the run (Tune also SIGUSR1) and
    leave it there after a normal finish. A later Ctrl-C, e.g. in `tether demo` serving the
    winner, then only printed Tune's "Stop signal received" warning.
    """
    if threading.current_thread() is not threading.main_thread():  # Ray installs none there
        yield
        return
    signals = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    saved = {s: signal.getsignal(s) for s in signals}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
