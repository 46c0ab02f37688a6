"""Running a sweep: the folder, Ray Tune, progress lines, and the results.

Trials are ranked by their *best* evaluation of the sweep metric (each trial's best
checkpoint), the number a trial stopped early by ASHA and one that ran to the end both have;
the best trial's model is exported from that same checkpoint, so what is registered is what
won.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tether.config import JobSpec, SpecError, TuneSection
from tether.data import PreparedData
from tether.sweep import report as sweep_report
from tether.sweep.search import (
    LAMBDA,
    LR,
    SearchPlan,
    plan_search,
    pull_problems,
    sweep_metric,
    sweep_space,
    validate_sweep,
)
from tether.sweep.trial import (
    ARM,
    ATTEMPTS_LOG,
    TRIAL_SUMMARY,
    TrialContext,
    TrialHooks,
    run_trial,
    trial_spec,
    write_json,
)
from tether.tasks import Task
from tether.train.checkpoint import STATE_FILE, checkpoint_name, read_state
from tether.train.setup import resolve_strength


@dataclass
class Sweep:
    """A validated sweep with its folder and tokenized data, before any Ray work."""

    spec: JobSpec
    name: str
    dir: Path
    task: Task
    data: PreparedData
    resumed: bool

    @property
    def metric(self) -> str:
        return sweep_metric(self.spec)[0]

    @property
    def mode(self) -> str:
        return sweep_metric(self.spec)[1]

    def trial_spec(self, searched: dict[str, Any]) -> JobSpec:
        """The spec a trial ran with: the job with its sampled values applied, and λ derived
        from κ (``objective.strength``) as its workers derived it."""
        return resolve_strength(trial_spec(self.spec.to_dict(), searched), len(self.data.train))


@dataclass
class SweepOutcome:
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per trial (sweep.report)
    curves: dict[str, list] = field(default_factory=dict)  # trial id → [(epoch, metric), ...]


def open_sweep(
    spec: JobSpec, resume: bool | str = False, prepared: tuple[Task, PreparedData] | None = None
) -> Sweep:
    """Validate, find or create the sweep folder, tokenize the data once; no Ray work yet.

    ``resume``: True continues ``tune.name`` or this job's latest sweep; a string names one.
    A resumed sweep runs with the spec saved when it started (Tune cannot change a space).
    """
    from tether.run import prepare_run_data

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
    task, data = prepared if prepared is not None else prepare_run_data(spec)
    problems = pull_problems(spec, len(data.train))
    if problems:
        raise SpecError(problems, "sweep spec")
    sweep_dir = storage / str(name)
    if not resume:
        write_json(
            sweep_dir / "sweep.json",
            {"name": name, "job": spec.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        )
    return Sweep(spec, str(name), sweep_dir, task, data, bool(resume))


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

    from tether.cluster import caller_signal_handlers, ensure_ray

    spec, t = sweep.spec, sweep.spec.tune
    ensure_ray(spec.scaling.address, log_to_driver=verbose)
    plan = plan_search(spec, sweep.data)
    concurrency = t.max_concurrent_trials or default_concurrency(spec, ray.cluster_resources())
    concurrency = min(concurrency, plan.num_trials)
    ctx = TrialContext(
        spec.to_dict(),
        ray.put(sweep.data),
        sweep.name,
        str(sweep.dir),
        sweep.metric,
        sweep.mode,
        trial_hooks,
        verbose,
    )
    # the driver only launches the Train run; Tune needs a non-empty bundle: 1 byte of memory
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx), dict(t.driver_resources) or {"memory": 1}
    )
    callbacks = [TrialLines(sweep.metric, plan.num_trials), *(tune_callbacks or [])]
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
                metric=sweep.metric,
                mode=sweep.mode,
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
        f"{concurrency} at a time, {t.search} search, scheduler {t.scheduler}, ranked on "
        f"{sweep.metric} ({sweep.mode}); {sweep.dir}"
    )
    with caller_signal_handlers():
        tuner.fit()
    return report_sweep(sweep, plan)


def default_concurrency(spec: JobSpec, cluster: dict[str, float]) -> int:
    """Trials the cluster can run at once: each holds all its Train workers' resources."""
    scaling, t = spec.scaling, spec.tune or TuneSection()
    need = {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        need["GPU"] = scaling.num_workers * (scaling.gpus_per_worker or 1)
    for key, amount in scaling.resources_per_worker.items():
        need[key] = need.get(key, 0) + scaling.num_workers * amount
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
    """One line per evaluation of every trial (step/total, the metric, the trial's ETA), and
    one per finished, stopped or failed trial, instead of Tune's status table."""

    def __init__(self, metric: str, total: int):
        self.metric = metric
        self.total = total

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step, total = result.get("step"), result.get("total_steps")
        if not step or not total:
            return
        elapsed = float(result.get("time_total_s", 0.0))
        eta = elapsed / step * (total - step)
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, float) else ""
        announce(
            f"  trial #{creation_order(trial)} {trial.config.get(ARM, '')} {params_text(trial.config)}: "
            f"step {step}/{total} epoch {result.get('epoch', 0):.2f} {shown} "
            f"({elapsed:.0f}s, ~{eta:.0f}s left)"
        )

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
        announce(
            f"trial {done}/{self.total} #{creation_order(trial)} {trial.config.get(ARM, '')} "
            f"{params_text(trial.config)}: {status} at epoch {r.get('epoch', 0):.2f}, {shown}"
        )


def creation_order(trial) -> int:
    """1, 2, ...: the order the searcher suggested trials (Tune's tag starts with it)."""
    head = trial.experiment_tag.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def ordered_params(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """Searched values with λ and lr first, the arm label dropped."""
    first = [k for k in (LAMBDA, LR) if k in config]
    return [(k, config[k]) for k in first + [k for k in config if k not in first and k != ARM]]


def params_text(config: dict[str, Any]) -> str:
    return " ".join(
        f"{sweep_report.short(k)}={sweep_report.fmt(v)}" for k, v in ordered_params(config)
    )


def trial_status(tune_status: str, last: dict[str, Any]) -> str:
    """completed / stopped (by the scheduler) / failed / unfinished."""
    if tune_status == "ERROR":
        return "failed"
    if tune_status != "TERMINATED":
        return "unfinished"
    return "completed" if last.get("step", 0) >= last.get("total_steps", math.inf) else "stopped"


# --------------------------------------------------------------------------- results


def report_sweep(sweep: Sweep, plan: SearchPlan | None = None) -> SweepOutcome:
    """Collect every trial from Tune's experiment state; write CSV, plots, summary; print."""
    t, mode, metric = sweep.spec.tune, sweep.mode, sweep.metric
    rows, curves = collect_trials(sweep)
    keys = [LAMBDA, LR] + [k for k in sweep_space(sweep.spec) if k not in (LAMBDA, LR)]
    best = sweep_report.pick_best(rows, mode)
    best_anchored = sweep_report.pick_best([r for r in rows if r["arm"] == "anchored"], mode)
    baseline_best = sweep_report.pick_best([r for r in rows if r["arm"] == "baseline"], mode)
    if best is not None:
        export_best_model(sweep, best)
    pruned = 0
    if t.keep_checkpoints == "best":
        keep = {r["trial_id"] for r in (best, best_anchored, baseline_best) if r}
        pruned = prune_checkpoints(sweep.dir, rows, keep)
    csv_path = sweep.dir / "trials.csv"
    sweep_report.write_csv(rows, keys, csv_path)
    plots = sweep_report.write_plots(rows, curves, metric, sweep.dir / "plots")
    summary = {
        "sweep_name": sweep.name,
        "sweep_dir": str(sweep.dir),
        "task": sweep.task.name,
        "metric": metric,
        "mode": mode,
        "ranking": "each trial by its best evaluation (its best checkpoint)",
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
        "control": "the λ = 0 arm differs from anchored trials only in λ (and the searched lr)",
        "csv": str(csv_path),
        "plots": [str(p) for p in plots],
        "checkpoint_bytes_freed": pruned,
    }
    write_json(sweep.dir / "summary.json", summary)
    print(sweep_report.format_table(rows, keys, metric, best), flush=True)
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


def export_best_model(sweep: Sweep, row: dict[str, Any]) -> None:
    """Give the best trial a model folder holding its best checkpoint's weights.

    A trial that ran to the end exported its final weights; when its best evaluation came
    earlier, or ASHA stopped it (no export at all), the model is exported from the best
    checkpoint, so the registered model is the one whose score won.
    """
    from tether.run import export_checkpoint

    checkpoint = row.get("best_checkpoint")
    if row.get("model_dir") and row.get("best_step") == row.get("step"):
        row["model_from"] = "final"
        return
    if not checkpoint:
        row["model_from"] = None
        return
    out = sweep.dir / "trials" / row["trial_id"] / "best_model"
    if not (out / "tether.json").is_file():
        export_checkpoint(sweep.trial_spec(row["searched"]), sweep.task, Path(checkpoint), out)
    row["model_dir"], row["model_from"] = str(out), Path(checkpoint).name


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
        r["checkpoint"] = r["best_checkpoint"] = None
    return freed


def best_evaluation(history: list[tuple[float, int, float]], mode: str) -> tuple[float, int] | None:
    """(value, step) of the best (epoch, step, value) entry; ties go to the later one."""
    scored = [(v, s) for _, s, v in history if isinstance(v, (int, float)) and math.isfinite(v)]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(reversed(scored), key=lambda vs: sign * vs[0])


def collect_trials(sweep: Sweep) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """One row per trial (config, best and last metrics, status, artefacts), and its curve."""
    from ray.tune import ExperimentAnalysis

    metric = sweep.metric
    analysis = ExperimentAnalysis(str(sweep.dir / "tune"))
    frames = analysis.trial_dataframes
    rows, curves = [], {}
    for trial in sorted(analysis.trials, key=creation_order):
        last = dict(trial.last_result or {})
        run_dir = sweep.dir / "trials" / trial.trial_id
        done = run_dir / TRIAL_SUMMARY
        finished = json.loads(done.read_text()) if done.is_file() else {}
        searched = {k: v for k, v in trial.config.items() if k != ARM}
        effective = {**searched, **ran_with(sweep, searched)}
        frame = frames.get(trial.trial_id)  # keyed by id in Ray 2.60
        history = []
        if frame is not None and metric in frame and "epoch" in frame and "step" in frame:
            history = list(
                zip(
                    frame["epoch"].tolist(),
                    frame["step"].tolist(),
                    frame[metric].tolist(),
                    strict=True,
                )
            )
            curves[trial.trial_id] = [(e, v) for e, _, v in history]
        best = best_evaluation(history, sweep.mode)
        best_checkpoint = run_dir / checkpoint_name(best[1]) if best else None
        best_metrics = None
        if best_checkpoint is not None and (best_checkpoint / STATE_FILE).is_file():
            recorded = read_state(best_checkpoint)["metrics"]
            best_metrics = {k: v for k, v in recorded.items() if k.startswith(("eval/", "train/"))}
        attempts = run_dir / ATTEMPTS_LOG
        rows.append(
            {
                "trial": creation_order(trial),
                "trial_id": trial.trial_id,
                "arm": trial.config.get(ARM, "anchored"),
                "config": effective,  # what it ran with (λ, lr and the searched keys)
                "searched": searched,  # its own sampled values: the spec is rebuilt from these
                "metric": best[0] if best else None,
                "last_metric": last.get(metric),
                "best_step": int(best[1]) if best else None,
                "best_metrics": best_metrics,
                "metrics": {k: v for k, v in last.items() if k.startswith(("eval/", "train/"))},
                "epochs": float(last.get("epoch", 0.0)),
                "step": last.get("step"),
                "status": trial_status(trial.status, last),
                "model_dir": finished.get("model_dir"),
                "checkpoint": path_if_exists(
                    finished.get("checkpoint") or last.get("checkpoint_path")
                ),
                "best_checkpoint": path_if_exists(
                    str(best_checkpoint) if best_checkpoint else None
                ),
                "train_attempts": attempts.read_text().count(" train ")
                if attempts.is_file()
                else 0,
            }
        )
    return rows, curves


def ran_with(sweep: Sweep, searched: dict[str, Any]) -> dict[str, Any]:
    """The λ (derived from κ when it was searched or set) and lr a trial ran with. A trial of
    a sweep started under older limits may no longer pass today's check: it is reported with
    the λ it was given rather than stopping the report."""
    try:
        ran = sweep.trial_spec(searched)
    except SpecError:
        ran = trial_spec(sweep.spec.to_dict(), searched)
    return {LAMBDA: ran.objective.lam, LR: ran.optim.lr}


def path_if_exists(path: str | None) -> str | None:
    """``path`` if it is still on disk (a pruned checkpoint is not)."""
    return path if path and Path(path).exists() else None
