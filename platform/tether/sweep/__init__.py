"""Hyperparameter sweeps: search λ, lr (any tunable key) with Ray Tune, beside a λ = 0 arm.

    tether tune jobs/sweep_demo.yaml [key=value ...] [--summary PATH] [--resume [SWEEP]]

    sweep = open_sweep(load_job("jobs/sweep_demo.yaml"))   # validates, tokenizes; no Ray yet
    outcome = run_sweep(sweep)    # → SweepOutcome(summary={"best", "baseline_best", ...})
    outcome = run_tracked_sweep(sweep)   # the same, with MLflow parent/child runs + registry

Each trial is a Tune *function trainable* that drives one Ray Train run, so a trial gets
``scaling.num_workers`` DDP workers and Train's own fault tolerance; every evaluation the loop
reports is one Tune result. ASHA compares trials on the sweep metric (default: the task's
primary metric, in its direction) at fractional epochs; the final ranking takes each trial at
its best evaluation. The control arm (λ = 0, the lr range spread evenly) is interleaved with
the searcher's trials; the searcher never sees it.

    search    validation of tune.space, Tune domains, the control arm, the scheduler
    trial     one trial: the Tune trainable around a Train run
    runner    the sweep folder, Tune, progress lines, results and the best model
    report    tables, trials.csv, verdict lines and plots (pure functions)
    tracking  MLflow parent/child runs and registering the best trial
    cli       `tether tune`

A sweep lives in ``storage.path/<sweep name>/``: ``sweep.json`` (the resolved job), ``tune/``
(Tune's experiment state), ``trials/<trial id>/`` (each trial's Train run: checkpoints,
``model/``, ``summary.json``), ``trials.csv``, ``summary.json`` and ``plots/``.
"""

from tether.sweep.runner import (
    Sweep,
    SweepOutcome,
    default_concurrency,
    open_sweep,
    report_sweep,
    run_sweep,
)
from tether.sweep.tracking import run_tracked_sweep
from tether.sweep.trial import TrialExtras, TrialHooks, TrialInfo, write_json

__all__ = [
    "Sweep",
    "SweepOutcome",
    "TrialExtras",
    "TrialHooks",
    "TrialInfo",
    "default_concurrency",
    "open_sweep",
    "report_sweep",
    "run_sweep",
    "run_tracked_sweep",
    "write_json",
]
