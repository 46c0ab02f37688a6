"""Is ASHA worth it? One λ × lr grid searched exhaustively, then under ASHA, same trials.

    .venv/bin/python benchmarks/hpo_efficiency.py --quick   # SST-2 subset, 12 configs (~25 min, 2 cores)
    .venv/bin/python benchmarks/hpo_efficiency.py           # 3840 examples, 15 configs (hours on CPU)
    .venv/bin/python benchmarks/hpo_efficiency.py --help    # --cpus --grace --reduction-factor --keep ...

Both sweeps run the same configs through ``tether.sweep`` (``search: grid``, the λ = 0 arm
included) with identical seeds, once with ``scheduler: none`` and once with ASHA. A trial that
ASHA lets finish is the very run the grid made, so the question is only whether ASHA stopped
the eventual winner, and how much compute it saved.

Data: SST-2 from ../shared/data/sst2 when present (train.tsv ``label<TAB>sentence``, dev.tsv
``label<TAB>content``, renamed as in jobs/sst2.yaml), else tether's synthetic demo data.
Model: the packaged all-MiniLM-L6-v2, one Train worker per trial.

Reports, per strategy: best validation accuracy (over all trials, and over anchored / λ = 0
separately), total trial-epochs (the compute: the sum of epochs each trial ran) and wall time.
Target: ASHA's best within 0.5 accuracy points of the grid's best using ≤ 40 % of the grid's
trial-epochs. Writes benchmarks/results/hpo_efficiency.json (--quick: _quick.json).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, machine_info, write_json
from tether.config import validate_job

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
TARGET_POINTS, TARGET_COMPUTE = 0.5, 0.40
# sample counts make whole steps per epoch divisible by 3 at batch 16, so evaluations (three
# an epoch) fall exactly on ASHA's rungs at 1/3 and 1 epoch
FULL = {
    "train": 3840,
    "validation": None,
    "epochs": 3,
    "lambdas": [1e-4, 1e-3, 1e-2, 1e-1],
    "lrs": [3e-5, 1e-4, 3e-4],
}
QUICK = {
    "train": 480,
    "validation": 300,
    "epochs": 3,
    "lambdas": [1e-3, 1e-2, 1e-1],
    "lrs": [3e-5, 1e-4, 3e-4],
}


# --------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small SST-2 subset and grid (~25 min)")
    p.add_argument(
        "--cpus",
        type=int,
        default=os.cpu_count() or 2,
        help="CPUs of the local Ray cluster; one trial per CPU runs at a time",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=None,
        help="ASHA grace period in epochs (default epochs / reduction_factor^2, snapped to an evaluation)",
    )
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument(
        "--rank-metric",
        choices=["eval/accuracy", "eval/loss"],
        default="eval/accuracy",
        help="what ASHA ranks on (accuracy ties at chance early on; loss never ties)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the sweeps run (default: a temp dir, removed unless --keep)",
    )
    p.add_argument("--keep", action="store_true", help="keep the sweeps' runs and checkpoints")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def base_job(size: dict[str, Any], workdir: Path, batch_size: int) -> dict[str, Any]:
    """The job both sweeps share: data, model, length, reporting; only the scheduler differs."""
    if (SST2 / "train.tsv").is_file():
        data = {
            "train": str(SST2 / "train.tsv"),
            "validation": str(SST2 / "dev.tsv"),
            "text_column": "sentence",
            "label_column": "label",
            "rename_columns": {"content": "sentence"},
            "max_length": 64,
            "max_train_samples": size["train"],
            "max_validation_samples": size["validation"],
            "sample_seed": 1,
        }
    else:
        data = {
            "train": "synthetic:sentiment",
            "max_train_samples": size["train"],
            "max_length": 64,
        }
    return {
        "name": "hpo",
        "model": {"name": "packaged:all-MiniLM-L6-v2", "label_names": ["negative", "positive"]},
        "data": data,
        "optim": {"new_param_lr_scale": 10.0, "warmup_ratio": 0.06},
        # evaluate three times an epoch: ASHA's rungs can sit at a third of an epoch
        "train": {
            "epochs": size["epochs"],
            "batch_size": batch_size,
            "seed": 42,
            "eval_interval": eval_interval(size, batch_size),
            "keep_checkpoints": 1,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 1},
        "storage": {"path": str(workdir)},
    }


def eval_interval(size: dict[str, Any], batch_size: int) -> int:
    """Steps between evaluations: three an epoch."""
    return max(1, math.ceil(size["train"] / batch_size) // 3)


def sweep_section(size: dict[str, Any], scheduler: str, args) -> dict[str, Any]:
    """The grid (λ = 0 arm included) under `scheduler`; ASHA's grace snapped to an evaluation."""
    nominal = args.grace or size["epochs"] / args.reduction_factor**2
    report_every = eval_interval(size, args.batch_size) / math.ceil(size["train"] / args.batch_size)
    grace = report_every * max(1, round(nominal / report_every))
    return {
        "name": f"grid-{scheduler}",
        "search": "grid",
        "space": {
            "objective.lambda": {"values": size["lambdas"]},
            "optim.lr": {"values": size["lrs"]},
        },
        "scheduler": scheduler,
        "metric": args.rank_metric,
        "mode": "min" if args.rank_metric == "eval/loss" else "max",
        "asha": {"grace_period": grace, "reduction_factor": args.reduction_factor},
        "max_concurrent_trials": args.cpus,
        "max_failures": 1,
    }


# --------------------------------------------------------------------------- run


def run_strategy(job: dict[str, Any], tune: dict[str, Any], data) -> dict[str, Any]:
    """One sweep; its compute, best accuracies (whatever metric ranked) and per-trial rows."""
    from tether.sweep import open_sweep, run_sweep

    spec = validate_job(job | {"tune": tune})
    started = time.perf_counter()
    outcome = run_sweep(open_sweep(spec, data=data))
    wall_s = time.perf_counter() - started
    s, rows = outcome.summary, outcome.rows

    def best(arm: str | None) -> dict[str, Any] | None:
        scored = [r for r in rows if arm in (None, r["arm"]) and "eval/accuracy" in r["metrics"]]
        return max(scored, key=lambda r: r["metrics"]["eval/accuracy"], default=None)

    top = best(None)
    return {
        "wall_s": round(wall_s, 1),
        "trials": s["trials"],
        "status_counts": s["status_counts"],
        "trial_epochs": s["trial_epochs"],
        "best_accuracy": top["metrics"]["eval/accuracy"] if top else None,
        "best_config": top["config"] if top else None,
        "best_anchored_accuracy": (best("anchored") or {}).get("metrics", {}).get("eval/accuracy"),
        "best_baseline_accuracy": (best("baseline") or {}).get("metrics", {}).get("eval/accuracy"),
        "sweep_dir": s["sweep_dir"],
        # every trial's curve of the ranked metric: ASHA variants can be replayed on the grid's
        "curves": {r["trial_id"]: outcome.curves.get(r["trial_id"], []) for r in rows},
        "rows": [
            {k: r[k] for k in ("trial", "trial_id", "arm", "config", "epochs", "status")}
            | {"accuracy": r["metrics"].get("eval/accuracy"), "loss": r["metrics"].get("eval/loss")}
            for r in rows
        ],
    }


def verdict(grid: dict[str, Any], asha: dict[str, Any]) -> dict[str, Any]:
    gap_points = 100.0 * (grid["best_accuracy"] - asha["best_accuracy"])
    compute = asha["trial_epochs"] / grid["trial_epochs"]
    return {
        "accuracy_gap_points": round(gap_points, 3),
        "compute_fraction": round(compute, 4),
        "accuracy_ok": gap_points <= TARGET_POINTS,
        "compute_ok": compute <= TARGET_COMPUTE,
        "pass": gap_points <= TARGET_POINTS and compute <= TARGET_COMPUTE,
    }


def print_table(result: dict[str, Any]) -> None:
    head = (
        f"{'strategy':<10} {'trials':>6} {'stopped':>7} {'trial-epochs':>12} {'best acc':>9} "
        f"{'anchored':>9} {'λ=0':>7} {'wall s':>7}"
    )
    print(head + "\n" + "-" * len(head))
    for name in ("grid", "asha"):
        r = result[name]
        acc = [
            _acc(r[k])
            for k in ("best_accuracy", "best_anchored_accuracy", "best_baseline_accuracy")
        ]
        print(
            f"{name:<10} {r['trials']:>6} {r['status_counts']['stopped']:>7} "
            f"{r['trial_epochs']:>12.2f} {acc[0]:>9} {acc[1]:>9} {acc[2]:>7} {r['wall_s']:>7.0f}"
        )
    v = result["verdict"]
    print(f"ASHA ranked on {result['settings']['rank_metric']}")
    print(
        f"ASHA: {v['accuracy_gap_points']:+.2f} points below the grid's best "
        f"(target ≤ {TARGET_POINTS}) with {100 * v['compute_fraction']:.1f} % of its "
        f"trial-epochs (target ≤ {100 * TARGET_COMPUTE:.0f} %): "
        f"{'PASS' if v['pass'] else 'FAIL'}"
    )


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size = QUICK if args.quick else FULL
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tether-hpo-"))
    import ray

    from tether.run import prepare_run_data

    # a cluster of our own ("local"): never attach to one someone else started on this machine
    ray.init(address="local", num_cpus=args.cpus, dashboard_host="127.0.0.1", log_to_driver=False)
    job = base_job(size, workdir, args.batch_size)
    prepared = prepare_run_data(validate_job(job))  # tokenized once for both sweeps
    data = prepared[1]
    result: dict[str, Any] = {
        "machine": machine_info(ray_cpus=args.cpus),
        "settings": {
            "quick": args.quick,
            **size,
            "job": job,
            "rank_metric": args.rank_metric,
            "asha": sweep_section(size, "asha", args)["asha"],
            "data_lineage": data.lineage,
        },
    }
    try:
        result["grid"] = run_strategy(job, sweep_section(size, "none", args), data)
        result["asha"] = run_strategy(job, sweep_section(size, "asha", args), data)
    finally:
        ray.shutdown()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["verdict"] = verdict(result["grid"], result["asha"])
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    out = args.out or RESULTS / f"hpo_efficiency{'_quick' if args.quick else ''}.json"
    write_json(out, result)
    print()
    print_table(result)
    print(f"results: {out}" + (f"; runs kept in {workdir}" if args.keep or args.workdir else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
