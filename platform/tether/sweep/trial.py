"""One sweep trial: a Tune function trainable that drives one Ray Train run.

Intermediate evaluations reach Tune through ``TuneReportCallback`` (each is one Tune result:
what ASHA compares); the final one is reported after the model is exported and the trial's
summary.json written, so a scheduler stop on the final result cannot cut that short.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ray.tune.integration.ray_train import TuneReportCallback

from tether.config import JobSpec, apply_updates
from tether.data import PreparedData

ARM = "arm"  # trial config key: "anchored" (searched λ) or "baseline" (λ = 0)
TRIAL_SUMMARY = "summary.json"
ATTEMPTS_LOG = "attempts.log"


@dataclass(frozen=True)
class TrialInfo:
    """What a trial hook knows (e.g. to open an MLflow child run under the sweep's run)."""

    sweep_name: str
    sweep_dir: str
    trial_id: str
    arm: str  # "anchored" or "baseline" (λ = 0)
    config: dict[str, Any]  # searched values by dotted key
    run_dir: str  # the trial's Train run: checkpoints, model/, summary.json


@dataclass
class TrialExtras:
    """What a hook adds to one trial's Train run."""

    callbacks: list = field(default_factory=list)  # Ray Train UserCallbacks
    tracking: dict[str, Any] | None = None  # {"uri", "run_id"}: rank 0 logs curves there


class TrialHooks(Protocol):
    """Per-trial extension points, called in the trial's actor (so a hooks object must pickle).

    ``finish`` gets status FINISHED with the trial summary (before summary.json is written;
    it may add to it), FAILED with None, or KILLED with None when the scheduler stopped the
    trial. A stopped trial's process is ended, so its KILLED call can be cut short: a Tune
    callback in the driver (on_trial_complete) is the reliable place to close it.
    """

    def start(self, info: TrialInfo, spec: JobSpec, data: PreparedData) -> TrialExtras: ...

    def finish(self, info: TrialInfo, summary: dict[str, Any] | None, status: str) -> None: ...


@dataclass
class TrialContext:
    """Everything a trial needs besides its config; shipped once through the object store."""

    job: dict[str, Any]
    data: Any  # ObjectRef to the PreparedData (tokenized once by the driver)
    sweep_name: str
    sweep_dir: str
    metric: str  # ranks the trial's checkpoints, as it ranks trials
    mode: str
    hooks: TrialHooks | None = None
    verbose: bool = False


def trial_spec(job: dict[str, Any], config: dict[str, Any]) -> JobSpec:
    """The job with a trial's sampled values applied (dotted keys; the arm label dropped)."""
    updates: dict[str, Any] = {}
    for key, value in config.items():
        if key != ARM:
            section, _, name = key.partition(".")
            updates.setdefault(section, {})[name] = value
    return JobSpec.model_validate(apply_updates(job, updates))


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: one Ray Train run of the job with ``config`` applied.

    summary.json marks the trial finished: a trial restarted after a driver crash reports it
    again instead of training again.
    """
    import ray
    import ray.tune

    from tether.run import build_trainer, summarize, worker_inputs
    from tether.tasks import build_task
    from tether.train.setup import resolve_strength

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(ctx.sweep_dir) / "trials" / trial_id
    done = run_dir / TRIAL_SUMMARY
    if done.is_file():
        note_attempt(run_dir, "reuse")
        ray.tune.report(json.loads(done.read_text())["final_report"])
        return
    note_attempt(run_dir, "train")
    data = ray.get(ctx.data)
    spec = resolve_strength(trial_spec(ctx.job, config), len(data.train))
    task = build_task(spec, data.label_names)
    searched = {k: v for k, v in config.items() if k != ARM}
    info = TrialInfo(
        ctx.sweep_name, ctx.sweep_dir, trial_id, config.get(ARM, "anchored"), searched, str(run_dir)
    )
    extras = ctx.hooks.start(info, spec, data) if ctx.hooks else TrialExtras()
    inputs = worker_inputs(
        spec,
        ctx.data,
        trial_id,
        run_dir,
        tracking=extras.tracking,
        verbose=ctx.verbose,
        score=(ctx.metric, ctx.mode),
    )
    trainer = build_trainer(
        spec,
        inputs,
        str(run_dir.parent),
        score_metric=ctx.metric,
        score_mode=ctx.mode,
        callbacks=[HoldFinalReport(), *extras.callbacks],
    )
    try:
        result = trainer.fit()
    except BaseException:
        if ctx.hooks:
            ctx.hooks.finish(info, None, "KILLED" if stop_requested() else "FAILED")
        raise
    summary = summarize(spec, task, result, trial_id, run_dir, data)
    final = dict(result.metrics or {}) | {"checkpoint_path": summary["checkpoint"]}
    summary |= {"trial_id": trial_id, "arm": info.arm, "config": searched, "final_report": final}
    if ctx.hooks:
        ctx.hooks.finish(info, summary, "FINISHED")
    write_json(done, summary)
    ray.tune.report(final)


def stop_requested() -> bool:
    """Tune asked this trial to stop (a scheduler decision): a fit failing now is a kill."""
    from ray.train._internal.session import get_session  # Tune's function-trainable session

    session = get_session()
    return bool(session is not None and session.stop_event.is_set())


class HoldFinalReport(TuneReportCallback):
    """TuneReportCallback that forwards every report except the run's last (see run_trial)."""

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]  # rank 0's
        if m.get("step", 0) < m.get("total_steps", math.inf):
            super().after_report(run_context, metrics, checkpoint)


def note_attempt(run_dir: Path, action: str) -> None:
    """Append 'train' or 'reuse' to the trial's attempts log (restarts are auditable)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ATTEMPTS_LOG).open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {action} pid={os.getpid()}\n")


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a reader (or a resumed sweep) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
