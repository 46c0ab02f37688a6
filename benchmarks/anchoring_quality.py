"""Does anchoring help? Plain fine-tuning vs L2-SP (coupled, decoupled) on low-data SST-2.

    .venv/bin/python benchmarks/anchoring_quality.py             # n ∈ {100, 500, 2000} × 3 seeds, 2 λ × 2 lr
    .venv/bin/python benchmarks/anchoring_quality.py --quick     # smoke run: n=100, 1 seed, 2 λ × 2 lr, 1 epoch
    .venv/bin/python benchmarks/anchoring_quality.py --full-data # the above, then the best arm on all 67k
    .venv/bin/python benchmarks/anchoring_quality.py --help      # --ns --seeds --lr-range --lr-points --lambdas-* --epochs ...

For each training-set size n and data seed, tether samples n SST-2 training sentences
(``data.max_train_samples``, ``data.sample_seed``) and carves a validation split from them
(``data.validation_fraction``; no ``data.validation`` is set). Three arms, each tuned with the
same number of training runs (the budget) on that validation split only:

    plain       λ = 0; budget-many learning rates, log-spaced over --lr-range
    coupled     grad += 2λ(θ − θ*); --lambdas-coupled × --lr-points lrs over the same range
    decoupled   θ ← θ − lr·λ(θ − θ*) after each step; --lambdas-decoupled × the same lrs

Each arm's winner (highest validation accuracy, then lowest validation loss) — and only the
winner — is then scored on the full SST-2 dev set (872) by ``score_on_dev``, which loads the
exported model directory with tether.serving.model. The dev set never picks anything. Every
run is tether's own loop in this process (``run_training``, ``scaling.num_workers=0``), one
evaluation at the end; the training seed follows the data seed, so seeds vary the sample, the
head init and the batch order. Short runs get at least --min-steps optimizer steps.

Reports mean ± std dev accuracy per n per arm, the paired difference to plain over seeds with
a verdict (helps / no clear difference / hurts), the selected λ and lr, a plot of accuracy vs n
and a JSON (benchmarks/results/anchoring_quality.{json,png}; --quick: *_quick.*). The JSON is
rewritten after every (n, seed), so a stopped run keeps what it finished. --full-data also
trains on all training sentences with the setting chosen most often at the largest n: the best
arm by mean validation accuracy there (the dev set picks nothing), or the arms named in
--full-data-arms.

Data: ../shared/data/sst2/{train,dev}.tsv; without them, tether's synthetic:sentiment data
written to the same TSV layout (4000 train, 872 held-out-phrasing "dev"), said in the output.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fix torch's threads ourselves
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import (  # noqa: E402
    apply_quick,
    exit_on_sigterm,
    machine_info,
    print_plain_verdicts,
    quiet_libraries,
    summarize_study,
    write_json,
)
from tether.config import validate_job  # noqa: E402
from tether.data import load_rows  # noqa: E402
from tether.run import prepare_run_data, run_training  # noqa: E402
from tether.serving.model import load_served_model  # noqa: E402
from tether.synthetic import sentiment_examples  # noqa: E402

MODEL = "packaged:all-MiniLM-L6-v2"
LABEL_NAMES = ["negative", "positive"]
ARMS = ("plain", "coupled", "decoupled")
REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
QUICK = {
    "ns": [100],
    "seeds": [0],
    "lambdas_coupled": [0.01, 0.1],
    "lambdas_decoupled": [100.0, 1000.0],
    "lr_points": 2,
    "epochs": 1,
    "min_steps": 0,
    "full_data": False,
}


# --------------------------------------------------------------------------- settings


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=ints, default=[100, 500, 2000], help="training-set sizes")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="data (and training) seeds")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--lr-range", type=float, nargs=2, default=[3e-5, 2e-4], metavar=("LO", "HI"))
    p.add_argument("--lr-points", type=int, default=2, help="lrs per λ in the anchored grids")
    # weak → pinned. coupled: Adam rescales the anchor gradient 2λ(θ−θ*) together with the
    # task gradient, so λ≈0.01 is close to plain and λ≈1 pins the backbone (the head, at 10×
    # lr, still learns: a linear-probe end point); decoupled: the pull is lr·λ per step, so λ
    # must be ~1/(lr·steps) ≈ 100 to matter in a short run, and lr·λ ≥ 1 is a hard pin
    p.add_argument("--lambdas-coupled", type=floats, default=[0.1, 1.0])
    p.add_argument("--lambdas-decoupled", type=floats, default=[100.0, 1000.0])
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (at least)")
    p.add_argument("--min-steps", type=int, default=60, help="more epochs until this many steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--new-param-lr-scale", type=float, default=10.0, help="head lr multiplier")
    p.add_argument("--validation-fraction", type=float, default=0.2, help="carved from the n")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--full-data", action="store_true", help="also train on every sentence")
    p.add_argument("--full-data-epochs", type=int, default=1)
    p.add_argument(
        "--full-data-arms",
        default="best",
        help="arms for --full-data; best: the arm whose winners had the highest mean"
        " validation accuracy at the largest n (validation, never dev, picks it)",
    )
    p.add_argument("--data-dir", type=Path, default=SST2, help="folder with train.tsv, dev.tsv")
    p.add_argument("--workdir", type=Path, help="runs and temp checkpoints (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="library INFO logs")
    p.add_argument("--out", type=Path, help="JSON path (default results/anchoring_quality.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    apply_quick(args, QUICK, "anchoring_quality")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.full_data_arms = [a.strip() for a in args.full_data_arms.split(",") if a.strip()]
    problems = [a for a in args.arms + args.full_data_arms if a not in (*ARMS, "best")]
    if problems or "plain" not in args.arms:
        p.error(f"--arms must include plain (the control); unknown: {problems}")
    if not args.ns or not args.seeds or args.lr_points < 1 or args.epochs < 1:
        p.error("need --ns, --seeds, --lr-points >= 1, --epochs >= 1")
    return args


# --------------------------------------------------------------------------- the grids


def log_spaced(lo: float, hi: float, k: int) -> list[float]:
    if k == 1:
        return [math.sqrt(lo * hi)]
    return [float(x) for x in np.geomspace(lo, hi, k)]


def arm_grids(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """(λ, lr) configurations per arm, every arm the same number of runs (the budget).

    The anchored arms spend their budget on λ × lr; plain spends the same count on a finer
    lr grid over the same range, so the control is never starved of tuning.
    """
    lrs = log_spaced(*args.lr_range, args.lr_points)
    budget = args.lr_points * max(len(args.lambdas_coupled), len(args.lambdas_decoupled))
    grids = {
        "plain": [(0.0, lr) for lr in log_spaced(*args.lr_range, budget)],
        "coupled": [(lam, lr) for lam in args.lambdas_coupled for lr in lrs],
        "decoupled": [(lam, lr) for lam in args.lambdas_decoupled for lr in lrs],
    }
    return {arm: grids[arm] for arm in args.arms}


# --------------------------------------------------------------------------- data


@dataclass
class DevSet:
    texts: list[str]
    labels: list[int]


def data_files(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, str, bool]:
    """(train.tsv, dev.tsv, a line saying which, synthetic?): SST-2, else synthetic TSVs."""
    train, dev = args.data_dir / "train.tsv", args.data_dir / "dev.tsv"
    if train.is_file() and dev.is_file():
        return train, dev, f"SST-2 from {args.data_dir}", False
    # the same TSV layout as SST-2, so the carve and every code path below are the same
    train, dev = workdir / "synthetic-train.tsv", workdir / "synthetic-dev.tsv"
    write_tsv(train, "sentence", sentiment_examples("train", 4000))
    write_tsv(dev, "content", sentiment_examples("validation", 872))
    note = (
        f"SST-2 not found in {args.data_dir}: using tether's SYNTHETIC data (synthetic:sentiment"
        " templates: 4000 train, 872 held-out-phrasing 'dev'); a smoke test, not a measurement"
    )
    return train, dev, note, True


def write_tsv(path: Path, text_column: str, examples: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["label", text_column])
        writer.writerows([e["label"], e["text"]] for e in examples)


def load_dev(dev: Path) -> DevSet:
    """The dev set's texts and labels, read with tether's own loader (column `content`)."""
    rows = load_rows(str(dev), "validation", None)
    return DevSet([str(r["content"]) for r in rows], [int(r["label"]) for r in rows])


# --------------------------------------------------------------------------- one run


def job(args: argparse.Namespace, train: Path, workdir: Path, n: int | None, seed: int) -> dict:
    """The tether job for one (n, seed); λ, mode, lr and epochs are set per trial."""
    return {
        "name": "anchoring",
        "model": {"name": MODEL, "label_names": LABEL_NAMES},
        "data": {
            "train": str(train),
            "text_column": "sentence",
            "max_train_samples": n,
            "sample_seed": seed,
            "validation_fraction": args.validation_fraction,
            "max_length": args.max_length,
            "group_by_length": True,
        },
        "optim": {"new_param_lr_scale": args.new_param_lr_scale},
        "train": {
            "batch_size": args.batch_size,
            "seed": seed,
            "num_threads": args.threads,
            "eval_interval": 10**9,  # one evaluation (and checkpoint), after the last step
        },
        "scaling": {"num_workers": 0},  # local mode: the loop runs in this process
        "tracking": {"enabled": False},
        "storage": {"path": str(workdir / "runs")},
    }


def epochs_for(n_train: int, args: argparse.Namespace) -> int:
    """--epochs, or more so that tiny sets still get --min-steps optimizer steps."""
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    return max(args.epochs, math.ceil(args.min_steps / steps_per_epoch))


@dataclass
class Trial:
    arm: str
    n: int | None
    seed: int
    lam: float
    lr: float
    epochs: int
    steps: int
    val_accuracy: float
    val_loss: float
    drift_l2: float | None  # ‖θ − θ*‖ at the end (only tracked when λ > 0)
    wall_s: float
    model_dir: str | None
    run_dir: str
    checkpoint: str | None


def run_trial(base: dict, prepared: tuple, arm: str, lam: float, lr: float, epochs: int) -> Trial:
    """Train once with tether's loop; validation metrics come from the carved split."""
    mode = "decoupled" if arm == "decoupled" else "coupled"
    size = base["data"]["max_train_samples"] or "all"
    run_name = f"n{size}-s{base['train']['seed']}-{arm}-{lam:g}-{lr:g}"
    raw = base | {
        "objective": {"lambda": lam, "mode": mode},
        "optim": base["optim"] | {"lr": lr},
        "train": base["train"] | {"epochs": epochs},
        "storage": base["storage"] | {"run_name": run_name},  # a reused name would resume
    }
    t0 = time.perf_counter()
    summary = run_training(validate_job(raw), prepared=prepared).summary
    m = summary["metrics"]
    return Trial(
        arm=arm,
        n=base["data"]["max_train_samples"],
        seed=base["train"]["seed"],
        lam=lam,
        lr=lr,
        epochs=epochs,
        steps=int(summary["step"]),
        val_accuracy=m["eval/accuracy"],
        val_loss=m["eval/loss"],
        drift_l2=m.get("train/drift_l2") if lam > 0 else None,
        wall_s=time.perf_counter() - t0,
        model_dir=summary["model_dir"],
        run_dir=summary["run_dir"],
        checkpoint=summary["checkpoint"],
    )


def select(trials: list[Trial]) -> Trial:
    """Highest validation accuracy; ties (common on a small split) go to the lower loss."""
    return max(trials, key=lambda t: (t.val_accuracy, -t.val_loss))


def score_on_dev(model_dir: str, dev: DevSet) -> float:
    """Accuracy of an exported tether model directory on the dev set (served-model code)."""
    served = load_served_model(Path(model_dir))
    predictions = served.classify(dev.texts)  # the task's own predictor, as served
    hits = sum(p.label_id == y for p, y in zip(predictions, dev.labels, strict=True))
    return hits / len(dev.labels)


def discard(trials: list[Trial]) -> None:
    """Delete the runs' folders and local-mode checkpoints (~350 MB a run) once scored."""
    for t in trials:
        for path in (t.run_dir, t.checkpoint):
            if path:
                shutil.rmtree(path, ignore_errors=True)
        t.model_dir = t.checkpoint = None


# --------------------------------------------------------------------------- one (n, seed)


def run_cell(
    args: argparse.Namespace, base: dict, grids: dict, dev: DevSet, arms: list[str]
) -> dict[str, Any]:
    """Tune every arm on the carved validation split, then score each winner on dev."""
    spec = validate_job(base | {"train": base["train"] | {"epochs": 1}})
    prepared = prepare_run_data(spec)  # tokenized once for all trials of this (n, seed)
    data = prepared[1]
    epochs = epochs_for(len(data.train), args)
    print(f"  {len(data.train)} train / {len(data.validation)} validation, {epochs} epoch(s)")
    out = {}
    for arm in arms:
        trials = []
        for lam, lr in grids[arm]:
            t = run_trial(base, prepared, arm, lam, lr, epochs)
            print(
                f"    {arm:<9} λ={lam:<7g} lr={lr:.2g}: val acc {t.val_accuracy:.3f}, "
                f"loss {t.val_loss:.3f} ({t.wall_s:.0f} s)",
                flush=True,
            )
            trials.append(t)
        best = select(trials)
        dev_accuracy = score_on_dev(best.model_dir, dev)
        print(f"    {arm:<9} selected λ={best.lam:g} lr={best.lr:.2g} → dev acc {dev_accuracy:.4f}")
        discard(trials)
        out[arm] = {
            "dev_accuracy": dev_accuracy,
            "selected": {"lambda": best.lam, "lr": best.lr, "val_accuracy": best.val_accuracy},
            "num_train": len(data.train),
            "num_validation": len(data.validation),
            "trials": [asdict(t) for t in trials],
        }
    return out


# --------------------------------------------------------------------------- summary


def summarize(cells: dict[int, dict[int, dict]], arms: list[str]) -> list[dict[str, Any]]:
    """Per n and arm: mean ± std dev accuracy over seeds, paired Δ to plain, selected λ."""
    return summarize_study(cells, arms, lambda c: c["dev_accuracy"], "dev_accuracy")


def print_summary(rows: list[dict[str, Any]]) -> None:
    print("\ndev accuracy (full dev set), mean ± std over seeds; Δ = paired difference to plain")
    head = f"{'n':>6} {'arm':<10} {'dev acc':>15} {'Δ pts':>7} {'better':>7}  {'selected λ':<22} verdict"
    print(head)
    print("-" * len(head))
    for r in rows:
        k = len(r["seeds"])
        lams = ",".join(f"{x:g}" for x in r["selected_lambdas"])
        delta = "" if r["arm"] == "plain" else f"{100 * r['delta_vs_plain_mean']:+.1f}"
        better = "" if r["arm"] == "plain" else f"{r['seeds_better_than_plain']}/{k}"
        print(
            f"{r['n']:>6} {r['arm']:<10} {100 * r['mean']:>7.2f} ± {100 * r['std']:<5.2f}"
            f" {delta:>7} {better:>7}  {lams:<22} {r['verdict']}"
        )
    print_plain_verdicts(rows)


def plot(rows: list[dict[str, Any]], full: dict[str, Any] | None, path: Path, note: str) -> None:
    """Dev accuracy vs n (log axis), mean ± std over seeds per arm; full data as dashes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for i, arm in enumerate(arms):
        mine = [r for r in rows if r["arm"] == arm]
        xs = [r["n"] * (1 + 0.04 * (i - 1)) for r in mine]  # nudge arms apart to show the bars
        ys = [100 * r["mean"] for r in mine]
        errs = [100 * r["std"] for r in mine]
        line = ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=arm)
        if full and arm in full:
            ax.axhline(100 * full[arm]["dev_accuracy"], ls="--", lw=1, color=line[0].get_color())
    ax.set_xscale("log")
    ns = sorted({r["n"] for r in rows})
    ax.set_xticks(ns, [str(n) for n in ns])  # the sizes themselves, not 10^k labels
    ax.minorticks_off()
    ax.set_xlim(ns[0] / 1.6, ns[-1] * 1.6)
    ax.set_xlabel("training examples n (before the validation carve)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("Anchored vs plain fine-tuning, MiniLM" + (" (dashed: all data)" if full else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, note[:110], fontsize=6, alpha=0.7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- full data


def best_setting(cells: dict[int, dict[int, dict]], arm: str) -> tuple[float, float]:
    """The (λ, lr) chosen most often across seeds at the largest n (ties: higher val acc)."""
    by_seed = cells[max(cells)]
    picks = [by_seed[s][arm]["selected"] for s in sorted(by_seed)]
    counts = Counter((p["lambda"], p["lr"]) for p in picks)
    return max(
        counts,
        key=lambda c: (
            counts[c],
            max(p["val_accuracy"] for p in picks if (p["lambda"], p["lr"]) == c),
        ),
    )


def best_arm(cells: dict[int, dict[int, dict]], arms: list[str]) -> str:
    """The arm whose selected runs had the highest mean validation accuracy at the largest n.

    Validation accuracy, not dev: the dev set stays a pure test set even for this choice.
    Ties go to the earlier arm in ``arms`` (plain first: the anchor has to earn its place).
    """
    by_seed = cells[max(cells)]

    def mean_val(arm: str) -> float:
        return statistics.mean(by_seed[s][arm]["selected"]["val_accuracy"] for s in by_seed)

    return max(arms, key=mean_val)  # max keeps the first of equals


def run_full_data(
    args: argparse.Namespace, train: Path, workdir: Path, cells: dict, dev: DevSet
) -> dict[str, Any]:
    """The chosen arm(s) once on all training sentences with the best low-data setting."""
    base = job(args, train, workdir, None, args.seeds[0])
    base["data"]["validation_fraction"] = 0.01  # nothing is selected here: a small carve
    prepared = prepare_run_data(validate_job(base | {"train": base["train"] | {"epochs": 1}}))
    data = prepared[1]
    arms = [best_arm(cells, args.arms) if a == "best" else a for a in args.full_data_arms]
    out = {}
    for arm in dict.fromkeys(arms):
        lam, lr = best_setting(cells, arm)
        print(
            f"full data: {arm} λ={lam:g} lr={lr:.2g}, {len(data.train)} sentences ...", flush=True
        )
        t = run_trial(base, prepared, arm, lam, lr, args.full_data_epochs)
        accuracy = score_on_dev(t.model_dir, dev)
        discard([t])
        print(f"  dev acc {accuracy:.4f} ({t.wall_s / 60:.0f} min)")
        out[arm] = {"dev_accuracy": accuracy, "trial": asdict(t)}
    return out


# --------------------------------------------------------------------------- output


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    quiet_libraries(args.verbose)
    torch.set_num_threads(args.threads)  # the loop sets it per run too; dev scoring runs here
    started = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tether-anchoring-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(workdir)  # local mode leaves checkpoints in temp dirs: keep them here
    os.environ.setdefault("TETHER_CACHE", str(workdir / "cache"))
    grids = arm_grids(args)
    train, dev_path, note, synthetic = data_files(args, workdir)
    dev = load_dev(dev_path)
    runs = len(args.ns) * len(args.seeds) * sum(len(g) for g in grids.values())
    print(note)
    for arm, grid in grids.items():
        print(
            f"{arm:<9} grid ({len(grid)} runs): "
            + ", ".join(f"λ={a:g}/lr={b:.2g}" for a, b in grid)
        )
    print(f"{runs} training runs; dev set: {len(dev.labels)} sentences")
    result: dict[str, Any] = {
        "benchmark": "anchoring_quality",
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": machine_info(torch_threads=args.threads),
        "data": {
            "note": note,
            "synthetic": synthetic,
            "train": str(train),
            "dev": str(dev_path),
            "num_dev": len(dev.labels),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"model": MODEL, "grids": grids, "selection": "validation accuracy, then loss"},
        "complete": False,
    }
    cells: dict[int, dict[int, dict]] = {}
    try:
        for n in args.ns:
            for seed in args.seeds:
                print(f"n={n} seed={seed}", flush=True)
                base = job(args, train, workdir, n, seed)
                cells.setdefault(n, {})[seed] = run_cell(args, base, grids, dev, args.arms)
                result |= {"cells": cells, "summary": summarize(cells, args.arms)}
                write_json(args.out, result)  # a stopped run keeps what it finished
        rows = summarize(cells, args.arms)
        full = run_full_data(args, train, workdir, cells, dev) if args.full_data else None
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(rows)
    if full:
        for arm, f in full.items():
            print(
                f"all data ({f['trial']['steps']} steps): {arm:<9} dev acc {100 * f['dev_accuracy']:.2f}"
            )
    png = args.out.with_suffix(".png")
    plot(rows, full, png, note)
    result |= {"summary": rows, "full_data": full, "plot": png.name, "complete": True}
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    result["wall_s"] = time.time() - started
    write_json(args.out, result)
    print(f"\nwall {result['wall_s'] / 60:.1f} min; wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
