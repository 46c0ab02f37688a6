"""Hyperparameter sweeps: search λ, lr (any tunable key) with Ray Tune, beside a λ = 0 arm.

    tether tune jobs/sweep_demo.yaml [key=value ...] [--summary PATH] [--resume [SWEEP]]
    (the command lives in tether.sweep_cli)

    sweep = open_sweep(load_job("jobs/sweep_demo.yaml"))   # validates, tokenizes; no Ray yet
    outcome = run_sweep(sweep)    # → SweepOutcome(summary={"best", "baseline_best", ...})

Each trial is a Tune *function trainable* that drives one Ray Train run (``build_trainer`` +
``TuneReportCallback``), so a trial gets ``scaling.num_workers`` DDP workers and Train's own
fault tolerance; every evaluation the loop reports is one Tune result. ASHA ranks trials on
the validation metric at fractional epochs. The control arm (λ = 0, the lr range spread
evenly) is interleaved with the searcher's trials; the searcher never sees it.

A sweep lives in ``storage.path/<sweep name>/``: ``sweep.json`` (the resolved job), ``tune/``
(Tune's experiment state), ``trials/<trial id>/`` (each trial's Train run: checkpoints,
``model/``, ``summary.json``), ``trials.csv``, ``summary.json`` and ``plots/``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from tether.config import JobSpec, SpecError, TuneSection, deep_merge
from tether.data import PreparedData
from tether.sweep_search import ARM, LAMBDA, LR, SearchPlan, plan_search, validate_sweep

TRIAL_SUMMARY = "summary.json"
ATTEMPTS_LOG = "attempts.log"


# --------------------------------------------------------------------------- one trial


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
    loop_config: dict[str, Any] = field(default_factory=dict)  # e.g. {"tracking": {...}}


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
    hooks: TrialHooks | None = None
    verbose: bool = False


def trial_spec(job: dict[str, Any], config: dict[str, Any]) -> JobSpec:
    """The job with a trial's sampled values applied (dotted keys; the arm label dropped)."""
    updates: dict[str, Any] = {}
    for key, value in config.items():
        if key != ARM:
            section, _, name = key.partition(".")
            updates.setdefault(section, {})[name] = value
    return JobSpec.model_validate(deep_merge(job, updates))


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: one Ray Train run of the job with ``config`` applied.

    Intermediate evaluations reach Tune through TuneReportCallback; the final one is reported
    here after the model is exported and summary.json written, so a scheduler stop on the
    final result cannot cut that short. summary.json also marks the trial finished: a trial
    restarted after a driver crash reports it again instead of training again.
    """
    import ray
    import ray.tune

    from tether.launch import build_trainer, summarize

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(ctx.sweep_dir) / "trials" / trial_id
    done = run_dir / TRIAL_SUMMARY
    if done.is_file():
        note_attempt(run_dir, "reuse")
        ray.tune.report(json.loads(done.read_text())["final_report"])
        return
    note_attempt(run_dir, "train")
    spec = trial_spec(ctx.job, config)
    data = ray.get(ctx.data)
    searched = {k: v for k, v in config.items() if k != ARM}
    info = TrialInfo(
        ctx.sweep_name, ctx.sweep_dir, trial_id, config.get(ARM, "anchored"), searched, str(run_dir)
    )
    extras = ctx.hooks.start(info, spec, data) if ctx.hooks else TrialExtras()
    trainer = build_trainer(
        spec,
        ctx.data,
        trial_id,
        str(run_dir.parent),
        extra_loop_config=extras.loop_config,
        callbacks=[HoldFinalReport(), *extras.callbacks],
        verbose=ctx.verbose,
    )
    try:
        result = trainer.fit()
    except BaseException:
        if ctx.hooks:
            ctx.hooks.finish(info, None, "KILLED" if stop_requested() else "FAILED")
        raise
    summary = summarize(spec, result, trial_id, run_dir, data)
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


# --------------------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """A validated sweep with its folder and tokenized data, before any Ray work."""

    spec: JobSpec
    name: str
    dir: Path
    data: PreparedData
    resumed: bool


@dataclass
class SweepOutcome:
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per trial (sweep_report)
    curves: dict[str, list] = field(default_factory=dict)  # trial id → [(epoch, metric), ...]


def open_sweep(
    spec: JobSpec, resume: bool | str = False, data: PreparedData | None = None
) -> Sweep:
    """Validate, find or create the sweep folder, tokenize the data once; no Ray work yet.

    ``resume``: True continues ``tune.name`` or this job's latest sweep; a string names one.
    A resumed sweep runs with the spec saved when it started (Tune cannot change a space).
    """
    from tether.launch import prepare_run_data

    t = spec.tune or TuneSection()
    storage = Path(spec.storage.path)
    if resume:
        name = resume if isinstance(resume, str) else t.name or latest_sweep(storage, spec.name)
        saved = storage / str(name) / "sweep.json"
        if not saved.is_file():
            raise SpecError([f"--resume: no sweep {name!r} under {storage}"])
        job = json.loads(saved.read_text())["job"]
        ignored = [k for k in changed_keys(job, spec.to_dict()) if k != "tune.name"]
        if ignored:
            announce(
                f"resuming {name} with the spec it started with; ignoring changes to "
                + ", ".join(ignored)
            )
        spec = JobSpec.model_validate(job)
    else:
        name = t.name or f"{spec.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        if (storage / name / "sweep.json").exists():
            raise SpecError(
                [
                    f"tune.name: sweep {name!r} exists under {storage}; "
                    "pass --resume to continue it or choose another name"
                ]
            )
    if spec.tune is None:
        spec = spec.model_copy(update={"tune": TuneSection()})
    validate_sweep(spec)
    data = data if data is not None else prepare_run_data(spec)
    sweep_dir = storage / str(name)
    if not resume:
        write_json(
            sweep_dir / "sweep.json",
            {"name": name, "job": spec.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        )
    return Sweep(spec, str(name), sweep_dir, data, bool(resume))


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested spec dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix + k)
    return keys


def latest_sweep(storage: Path, job_name: str) -> str:
    """The most recently started sweep of a job under a storage folder."""
    found = []
    for path in storage.glob("*/sweep.json"):
        saved = json.loads(path.read_text())
        if saved["job"]["name"] == job_name:
            found.append((saved["created"], saved["name"]))
    if not found:
        raise SpecError([f"--resume: no sweep of job {job_name!r} under {storage}"])
    return max(found)[1]


def run_sweep(
    sweep: Sweep,
    *,
    tune_callbacks: list | None = None,
    trial_hooks: TrialHooks | None = None,
    verbose: bool = False,
) -> SweepOutcome:
    """Run (or resume) the sweep on Ray Tune; write trials.csv, summary.json and plots.

    ``tune_callbacks``: Ray Tune callbacks in the driver (e.g. one that closes MLflow child
    runs of stopped trials). ``trial_hooks``: per-trial start/finish in the trial's actor
    (e.g. an MLflow child run under a parent opened around run_sweep; see TrialHooks).
    """
    import ray
    from ray import tune

    from tether.launch import caller_signal_handlers, ensure_ray

    spec, t = sweep.spec, sweep.spec.tune
    ensure_ray(spec.scaling.address, log_to_driver=verbose)
    plan = plan_search(spec, sweep.data)
    concurrency = t.max_concurrent_trials or default_concurrency(spec, ray.cluster_resources())
    concurrency = min(concurrency, plan.num_trials)
    ctx = TrialContext(
        spec.to_dict(), ray.put(sweep.data), sweep.name, str(sweep.dir), trial_hooks, verbose
    )
    # the driver only launches the Train run; Tune needs a non-empty bundle: 1 byte of memory
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx), dict(t.driver_resources) or {"memory": 1}
    )
    callbacks = [TrialLines(t.metric, plan.num_trials), *(tune_callbacks or [])]
    experiment = sweep.dir / "tune"
    if sweep.resumed and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(
            str(experiment), trainable=trainable, resume_unfinished=True, restart_errored=True
        )
        # callbacks were pickled with the first run; the ones given now replace them
        # (Tuner.restore takes no run_config; its internal tuner holds the restored one)
        if getattr(tuner, "_local_tuner", None) is not None:
            tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=plan.searcher,
                scheduler=plan.scheduler,
                num_samples=plan.num_trials,
                max_concurrent_trials=concurrency,
                metric=t.metric,
                mode=t.mode,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=experiment.name,
                storage_path=str(sweep.dir),
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=t.max_failures),
                verbose=0,
            ),
        )
    announce(
        f"sweep {sweep.name}: {plan.num_trials} trials ({plan.num_baseline} at λ=0), "
        f"{concurrency} at a time, {t.search} search, scheduler {t.scheduler}; {sweep.dir}"
    )
    with caller_signal_handlers():
        tuner.fit()
    return report_sweep(sweep, plan)


def default_concurrency(spec: JobSpec, cluster: dict[str, float]) -> int:
    """Trials the cluster can run at once: each holds all its Train workers' resources."""
    s, t = spec.scaling, spec.tune or TuneSection()
    need = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu:
        need["GPU"] = s.num_workers * (s.gpus_per_worker or 1)
    for key, amount in s.resources_per_worker.items():
        need[key] = need.get(key, 0) + s.num_workers * amount
    for key, amount in t.driver_resources.items():
        need[key] = need.get(key, 0) + amount
    fits = min(int(cluster.get(k, 0) // v) for k, v in need.items() if v > 0 and k != "memory")
    if fits < 1:
        raise SpecError(
            [
                f"scaling: one trial needs {need} but the cluster has "
                f"{ {k: cluster.get(k, 0) for k in need} }; lower scaling.num_workers"
            ]
        )
    return fits


def trial_dirname(trial) -> str:
    """Tune's per-trial folder is named by trial id, like the trial's Train run."""
    return trial.trial_id


def announce(line: str) -> None:
    print(f"[tether] {line}", flush=True)


class TrialLines(Callback):
    """One line per finished, stopped or failed trial, instead of Tune's status table."""

    def __init__(self, metric: str, total: int):
        self.metric = metric
        self.total = total

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, "failed")

    def _line(self, trials, trial, status: str | None) -> None:
        done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        r = trial.last_result or {}
        status = status or trial_status("TERMINATED", r)
        value = r.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, float) else "no result"
        params = " ".join(f"{short(k)}={fmt(v)}" for k, v in ordered_params(trial.config))
        announce(
            f"trial {done}/{self.total} #{creation_order(trial)} {trial.config.get(ARM, '')} "
            f"{params}: {status} at epoch {r.get('epoch', 0):.2f}, {shown}"
        )


def creation_order(trial) -> int:
    """1, 2, ...: the order the searcher suggested trials (Tune's tag starts with it)."""
    head = trial.experiment_tag.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def ordered_params(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """Searched values with λ and lr first, the arm label dropped."""
    first = [k for k in (LAMBDA, LR) if k in config]
    return [(k, config[k]) for k in first + [k for k in config if k not in first and k != ARM]]


def trial_status(tune_status: str, last: dict[str, Any]) -> str:
    """completed / stopped (by the scheduler) / failed / unfinished."""
    if tune_status == "ERROR":
        return "failed"
    if tune_status != "TERMINATED":
        return "unfinished"
    return "completed" if last.get("step", 0) >= last.get("total_steps", math.inf) else "stopped"


def short(key: str) -> str:
    return {LAMBDA: "λ", LR: "lr"}.get(key, key)


def fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- results


def report_sweep(sweep: Sweep, plan: SearchPlan | None = None) -> SweepOutcome:
    """Collect every trial from Tune's experiment state; write CSV, plots, summary; print."""
    from tether import sweep_report

    t = sweep.spec.tune
    rows, curves = collect_trials(sweep)
    keys = [LAMBDA, LR] + [k for k in t.space if k not in (LAMBDA, LR)]
    best = sweep_report.pick_best(rows, t.mode)
    best_anchored = sweep_report.pick_best([r for r in rows if r["arm"] == "anchored"], t.mode)
    baseline_best = sweep_report.pick_best([r for r in rows if r["arm"] == "baseline"], t.mode)
    pruned = 0
    if t.keep_checkpoints == "best":
        keep = {r["trial_id"] for r in (best, best_anchored, baseline_best) if r}
        pruned = prune_checkpoints(sweep.dir, rows, keep)
    csv_path = sweep.dir / "trials.csv"
    sweep_report.write_csv(rows, keys, csv_path)
    plots = sweep_report.write_plots(rows, curves, t.metric, sweep.dir / "plots")
    summary = {
        "sweep_name": sweep.name,
        "sweep_dir": str(sweep.dir),
        "metric": t.metric,
        "mode": t.mode,
        "trials": len(rows),
        "status_counts": {
            s: sum(r["status"] == s for r in rows)
            for s in ("completed", "stopped", "failed", "unfinished")
        },
        "trial_epochs": round(sum(r["epochs"] for r in rows), 4),
        "max_t_epochs": plan.max_t_epochs if plan else None,
        "best": sweep_report.public(best),
        "best_anchored": sweep_report.public(best_anchored),
        "baseline_best": sweep_report.public(baseline_best),
        "anchored_minus_baseline": sweep_report.difference(best_anchored, baseline_best),
        "csv": str(csv_path),
        "plots": [str(p) for p in plots],
        "checkpoint_bytes_freed": pruned,
    }
    write_json(sweep.dir / "summary.json", summary)
    print(sweep_report.format_table(rows, keys, t.metric, best), flush=True)
    for line in sweep_report.verdict(summary):
        announce(line)
    if pruned:
        announce(
            f"removed the checkpoints of finished trials other than the bests ({pruned / 2**30:.2f}"
            " GiB; tune.keep_checkpoints=all keeps them)"
        )
    if summary["status_counts"]["unfinished"]:
        announce(f"unfinished trials: continue with `tether tune ... --resume {sweep.name}`")
    return SweepOutcome(summary, rows, curves)


def prune_checkpoints(sweep_dir: Path, rows: list[dict[str, Any]], keep: set[str]) -> int:
    """Delete the checkpoint folders of finished trials not in ``keep``; bytes freed.

    Unfinished and failed trials keep theirs: `--resume` continues them from it. Finished
    trials are never retrained, so their checkpoints only cost disk once the sweep has ranked
    them.
    """
    freed = 0
    for r in rows:
        if r["trial_id"] in keep or r["status"] not in ("completed", "stopped"):
            continue
        for folder in (sweep_dir / "trials" / r["trial_id"]).glob("checkpoint_*"):
            if folder.is_dir():
                freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        r["checkpoint"] = None
    return freed


def collect_trials(sweep: Sweep) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """One row per trial (config, last metrics, status, artefacts) and its metric curve."""
    from ray.tune import ExperimentAnalysis

    t = sweep.spec.tune
    analysis = ExperimentAnalysis(str(sweep.dir / "tune"))
    frames = analysis.trial_dataframes
    rows, curves = [], {}
    for trial in sorted(analysis.trials, key=creation_order):
        last = dict(trial.last_result or {})
        run_dir = sweep.dir / "trials" / trial.trial_id
        done = run_dir / TRIAL_SUMMARY
        finished = json.loads(done.read_text()) if done.is_file() else {}
        config = {k: v for k, v in trial.config.items() if k != ARM}
        effective = {LAMBDA: sweep.spec.objective.lam, LR: sweep.spec.optim.lr, **config}
        attempts = run_dir / ATTEMPTS_LOG
        rows.append(
            {
                "trial": creation_order(trial),
                "trial_id": trial.trial_id,
                "arm": trial.config.get(ARM, "anchored"),
                "config": effective,
                "metric": last.get(t.metric),
                "metrics": {k: v for k, v in last.items() if k.startswith(("eval/", "train/"))},
                "epochs": float(last.get("epoch", 0.0)),
                "step": last.get("step"),
                "status": trial_status(trial.status, last),
                "model_dir": finished.get("model_dir"),
                "checkpoint": existing(finished.get("checkpoint") or last.get("checkpoint_path")),
                "train_attempts": attempts.read_text().count(" train ")
                if attempts.is_file()
                else 0,
            }
        )
        frame = frames.get(trial.trial_id)  # keyed by id in Ray 2.60
        if frame is not None and t.metric in frame and "epoch" in frame:
            curves[trial.trial_id] = list(
                zip(frame["epoch"].tolist(), frame[t.metric].tolist(), strict=True)
            )
    return rows, curves


def existing(path: str | None) -> str | None:
    """``path`` if it is still on disk (a pruned checkpoint is not)."""
    return path if path and Path(path).exists() else None
