"""CoNLL-2003 NER with the packaged MiniLM: full-data entity F1 on 2 Ray workers, and plain vs
anchored fine-tuning at 200 and 1000 training sentences.

    .venv/bin/python benchmarks/ner_conll.py --part full      # 14,041 sentences, 2 workers, 3 epochs (~18 min)
    .venv/bin/python benchmarks/ner_conll.py --part lowdata   # n ∈ {200, 1000} × 3 seeds × 3 arms × 2 runs (~25 min)
    .venv/bin/python benchmarks/ner_conll.py                  # both (--part all, ~45 min on 2 idle cores)
    .venv/bin/python benchmarks/ner_conll.py --quick          # smoke run of both parts (~3 min idle)
    .venv/bin/python benchmarks/ner_conll.py --part full --epochs 1   # a shorter full run (~7 min)
    .venv/bin/python benchmarks/ner_conll.py --help           # --ns --seeds --arms --lr-range --lambdas-* ...

Both parts start from jobs/conll2003.yaml (packaged all-MiniLM-L6-v2: uncased, 6 layers; the
tagger head at 10× lr, batch 16 per worker, max_length 128) and run through tether's own API
(``load_job`` with overrides, ``prepare_run_data``, ``run_training``). Changed from the job:
the local files (``../shared/data/conll2003/{train,dev,test}.txt``, read in place), where runs
and MLflow live, and ``data.group_by_length`` (on: random batches of CoNLL sentences pad to
2.4× their real tokens, length-grouped ones to 1.04×; the same sentences every epoch).

full      The job as shipped (coupled λ = 0.01, lr 1e-4, its 3 epochs) on the whole train
          split with ``scaling.num_workers=2`` (Ray Train DDP over gloo on a Ray instance of
          our own, 1 CPU and 1 torch thread per worker). Sizing, measured with --quick (2
          workers on a 960-sentence sample; it prints what the whole split would take at its
          rates): 47–62 train samples/s on this 2-core machine under light other load, so an
          epoch trains in ~4–5 min and the job's 3 epochs with 6 dev evaluations take ~18
          min; at the 35 samples/s measured beside a test run (load average 2.5–5) ~30 min.
          --epochs 1 for a shorter run. The dev set is the loop's validation split, scored
          every --eval-interval (220) steps: the learning curve, read back from the run's
          MLflow history. The exported model folder is then loaded as tether re-scores a
          model (task from its card, its own tokenizer) and scored on dev again (it must
          equal the loop's final number) and on test.txt. Reports dev and test entity F1
          (conlleval: exact span and type) with per-type F1, wall time and train samples/s;
          target ≥ 85 dev entity F1, printed as PASS/FAIL, with what the curve and the
          per-type scores say about a miss.
lowdata   For n ∈ {200, 1000} and seed ∈ {0, 1, 2}: n training sentences sampled with the
          seed (``data.max_train_samples``, ``data.sample_seed``). Validation is a 300-sentence
          dev subset sampled with the same seed (``data.max_validation_samples``): a 20 % carve
          of 200 sentences would be 40 sentences, too few to rank runs on entity F1. Arms, each
          the same number of runs over the same learning rates (--lr-range, --lr-points):
              plain       λ = 0
              coupled     grad += 2λ(θ − θ*), --lambdas-coupled (default 0.1)
              decoupled   θ ← θ − lr·λ(θ − θ*) after each step, --lambdas-decoupled (100)
          Each arm's winner on validation (entity F1, ties to the lower loss), and only the
          winner, is scored on the whole test set (3,453 sentences). The runs are tether's loop
          in this process (``scaling.num_workers=0``, 2 torch threads; one evaluation at the
          end), at least --lowdata-epochs (2) epochs and --min-steps (80) steps: 36 runs of
          ~1,500–2,000 samples at the 53–65 samples/s --quick measured in-process under light
          load, plus 18 test scorings: ~25 min (8–13 samples/s beside a test run, where two
          threads on oversubscribed cores stall: several times longer). Reports test entity
          F1 mean ± std over seeds, the paired difference to plain with a verdict (helps / no
          clear difference / hurts: two standard errors, as anchoring_quality.py) and the
          selected settings.

Writes benchmarks/results/ner_conll.json (--quick: ner_conll_quick.json), rewritten after the
full part and each (n, seed), so a stopped run keeps what it finished. Without the CoNLL files
it prints "skipped: ..." and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
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
from tether.card import read_card  # noqa: E402
from tether.config import JobSpec, deep_merge, load_job  # noqa: E402
from tether.data import Encoded, load_rows  # noqa: E402
from tether.data.prepare import pad_id  # noqa: E402
from tether.run import prepare_run_data, run_training  # noqa: E402
from tether.tasks import task_for_card  # noqa: E402
from tether.tasks.entities import ordered_tags  # noqa: E402
from tether.train.loop import evaluate  # noqa: E402
from tether.train.strategy import DataParallel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "conll2003.yaml"
CONLL = REPO.parent / "shared" / "data" / "conll2003"
TARGET_DEV_F1 = 0.85
EVAL_INTERVAL = 220  # full part: every half epoch, 6 points over the job's 3 epochs (1,317 steps)
ARMS = ("plain", "coupled", "decoupled")
PARTS = ("full", "lowdata")
QUICK = {
    "epochs": 1,
    "max_train_sentences": 960,  # full part: 30 steps on 2 workers, enough for a steady rate
    "max_dev_sentences": 300,
    "max_test_sentences": 300,
    "eval_interval": 10,
    "ns": [200],
    "seeds": [0],
    "lr_points": 1,
    "lowdata_epochs": 1,
    "min_steps": 20,
    "val_sentences": 200,
}


# --------------------------------------------------------------------------- settings


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("all", *PARTS), default="all")
    p.add_argument("--data-dir", type=Path, default=CONLL, help="train.txt, dev.txt, test.txt")
    # full part
    p.add_argument("--epochs", type=int, help="full part (default: the job's train.epochs, 3)")
    p.add_argument("--workers", type=int, default=2, help="full part: scaling.num_workers")
    p.add_argument("--eval-interval", type=int, default=EVAL_INTERVAL, help="full: steps/eval")
    p.add_argument("--max-train-sentences", type=int, help="full part: a sample of train")
    p.add_argument("--max-dev-sentences", type=int, help="full part: a sample of dev")
    p.add_argument("--max-test-sentences", type=int, help="the first N test sentences only")
    p.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="data.group_by_length in both parts (less padding, same epoch)",
    )
    # low-data part
    p.add_argument("--ns", type=ints, default=[200, 1000], help="training-set sizes")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="data (and training) seeds")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    # the job's lr 1e-4 and 4× above: runs of ~100 steps, and the SST-2 study's anchored
    # winners sat at the top of a grid that stopped at 2e-4
    p.add_argument("--lr-range", type=float, nargs=2, default=[1e-4, 4e-4], metavar=("LO", "HI"))
    p.add_argument("--lr-points", type=int, default=2, help="lrs per λ (plain: the budget)")
    # coupled 0.1: the SST-2 study's usual pick (0.01 is close to plain, 1 near a pin);
    # decoupled 100: a pull of lr·λ = 1–4 % of θ − θ* per step over the lr range
    p.add_argument("--lambdas-coupled", type=floats, default=[0.1])
    p.add_argument("--lambdas-decoupled", type=floats, default=[100.0])
    p.add_argument("--lowdata-epochs", type=int, default=2, help="epochs per run (at least)")
    p.add_argument("--min-steps", type=int, default=80, help="more epochs until this many steps")
    p.add_argument("--val-sentences", type=int, default=300, help="dev subset for selection")
    p.add_argument("--threads", type=int, default=2, help="torch threads (low-data, scoring)")
    p.add_argument("--workdir", type=Path, help="runs, MLflow, cache (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="library INFO logs")
    p.add_argument("--out", type=Path, help="JSON path (default results/ner_conll.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    apply_quick(args, QUICK, "ner_conll")
    args.parts = list(PARTS) if args.part == "all" else [args.part]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or "plain" not in args.arms:
        p.error(f"--arms must include plain (the control); unknown: {unknown}")
    if (args.epochs or 1) < 1 or args.lr_points < 1 or not args.ns or not args.seeds:
        p.error("need --epochs >= 1, --lr-points >= 1, --ns and --seeds")
    return args


# --------------------------------------------------------------------------- data


@dataclass
class Files:
    train: Path
    dev: Path
    test: Path


def conll_files(data_dir: Path) -> Files | None:
    """The three CoNLL-2003 files, read where they are; None if any is missing."""
    files = Files(data_dir / "train.txt", data_dir / "dev.txt", data_dir / "test.txt")
    return files if all(p.is_file() for p in asdict(files).values()) else None


def tag_names(train: Path) -> list[str]:
    """Every tag in the train file, in tether's stable order: declared for low-data runs, so
    a 200-sentence sample that lacks a rare tag still gets the full label set."""
    return ordered_tags({t for row in load_rows(str(train), "train") for t in row["ner_tags"]})


# --------------------------------------------------------------------------- scoring a model folder


@dataclass
class Exported:
    task: Any
    tokenizer: Any
    model: torch.nn.Module


def load_exported(model_dir: str) -> Exported:
    """An exported model folder as tether re-scores one (run.score_registered_model): the
    task rebuilt from its card (labels, max_length), its own tokenizer and weights."""
    task = task_for_card(read_card(model_dir))
    tokenizer = task.load_tokenizer(model_dir, None, False)
    return Exported(task, tokenizer, task.load_model(model_dir, None, False).model)


def encode_file(exported: Exported, path: Path, limit: int | None = None) -> Encoded:
    rows = load_rows(str(path), "test")[:limit]
    split, _ = exported.task.encode(rows, exported.tokenizer, "test")
    return split


def score(exported: Exported, split: Encoded, spec: JobSpec) -> dict[str, float]:
    """The task's metrics over the whole split: the loop's own ``evaluate``, one process."""
    strategy = DataParallel(0, 1, torch.device("cpu"))
    pad = pad_id(exported.tokenizer)
    return evaluate(exported.model, split, exported.task, pad, spec, strategy)


def entity_scores(m: dict[str, float]) -> dict[str, Any]:
    """The entity-level numbers of a metrics dict (eval/... keys), per-type F1 nested."""
    return {
        "entity_f1": m["eval/entity_f1"],
        "precision": m["eval/entity_precision"],
        "recall": m["eval/entity_recall"],
        "token_accuracy": m["eval/token_accuracy"],
        "loss": m["eval/loss"],
        "sentences": int(m["eval/num_examples"]),
        "per_type": {
            k.removeprefix("eval/f1/"): v for k, v in m.items() if k.startswith("eval/f1/")
        },
    }


# --------------------------------------------------------------------------- part 1: full data


def full_overrides(args: argparse.Namespace, files: Files, workdir: Path) -> dict[str, Any]:
    return {
        "data": {
            "train": str(files.train),
            "validation": str(files.dev),
            "max_train_samples": args.max_train_sentences,
            "max_validation_samples": args.max_dev_sentences,
            "group_by_length": args.group_by_length,
        },
        "train": {"eval_interval": args.eval_interval}
        | ({"epochs": args.epochs} if args.epochs else {}),  # else the job's
        "scaling": {"num_workers": args.workers},
        "storage": {"path": str(workdir / "runs"), "run_name": "ner-conll-full"},
        "tracking": {
            "uri": f"sqlite:///{workdir / 'mlflow.db'}",
            "experiment": "ner-conll-benchmark",
        },
    }


def learning_curve(uri: str, run_id: str | None, types: list[str]) -> list[dict[str, float]]:
    """One row per evaluation, read back from the run's MLflow history (rank 0 logged it)."""
    if run_id is None:
        return []  # tracking was degraded: the final numbers are still in the summary
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    keys = ["epoch", "train/fine_loss", "train/samples_per_s", "eval/loss", "eval/entity_f1"]
    keys += [f"eval/f1/{t}" for t in types]
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
    steps = sorted(history["eval/entity_f1"])
    return [{"step": s} | {k: history[k].get(s) for k in keys} for s in steps]


def train_rate(curve: list[dict[str, float]], examples_per_step: int) -> float | None:
    """Training samples/s over the whole run: each interval's samples over its time (the
    loop's per-interval rate excludes evaluation and checkpoints)."""
    samples = seconds = 0.0
    previous = 0
    for row in curve:
        n = (row["step"] - previous) * examples_per_step
        samples, seconds = samples + n, seconds + n / row["train/samples_per_s"]
        previous = row["step"]
    return samples / seconds if seconds else None


def run_full(args: argparse.Namespace, files: Files, workdir: Path) -> dict[str, Any]:
    """Train the job on the train split with 2 workers; score the exported model on test."""
    import ray

    spec = load_job(JOB, full_overrides(args, files, workdir))
    prepared = prepare_run_data(spec)  # on the driver, before any Ray work
    data = prepared[1]
    print(
        f"full: {len(data.train)} train / {len(data.validation)} dev sentences, "
        f"{spec.scaling.num_workers} workers × batch {spec.train.batch_size}, "
        f"{spec.train.epochs} epoch(s), λ={spec.objective.lam} {spec.objective.mode}, "
        f"lr {spec.optim.lr:g}",
        flush=True,
    )
    # a cluster of our own: a bare ray.init() joins any cluster already running on the machine
    cpus = max(os.cpu_count() or 1, math.ceil(args.workers * spec.scaling.cpus_per_worker))
    ray.init(address="local", num_cpus=cpus, dashboard_host="127.0.0.1")
    t0 = time.perf_counter()
    summary = run_training(spec, prepared=prepared).summary
    train_wall_s = time.perf_counter() - t0
    ray.shutdown()  # the low-data part runs in this process: give the workers' memory back
    curve = learning_curve(spec.tracking.uri, summary.get("mlflow_run_id"), prepared[0].types)
    exported = load_exported(summary["model_dir"])
    dev_rescored = score(exported, data.validation, spec)
    test_split = encode_file(exported, files.test, args.max_test_sentences)
    t1 = time.perf_counter()
    test = score(exported, test_split, spec)
    score_rate = len(test_split) / (time.perf_counter() - t1)
    dev = entity_scores(summary["metrics"])
    per_step = spec.train.batch_size * spec.scaling.num_workers * spec.train.grad_accum_steps
    return {
        "num_train": len(data.train),
        "num_dev": len(data.validation),
        "workers": spec.scaling.num_workers,
        "epochs": spec.train.epochs,
        "steps": summary["step"],
        "objective": summary["objective"],
        "lr": spec.optim.lr,
        "train_wall_s": train_wall_s,
        "train_samples_per_s": train_rate(curve, per_step),
        "examples_per_step": per_step,
        "eval_interval": spec.train.eval_interval,
        "score_sentences_per_s": score_rate,  # one process, --threads torch threads
        "dev": dev,
        "dev_rescored_entity_f1": dev_rescored["eval/entity_f1"],
        "test": entity_scores(test),
        "curve": curve,
        "target_dev_entity_f1": TARGET_DEV_F1,
        "pass": dev["entity_f1"] >= TARGET_DEV_F1,
        "tracking": summary.get("tracking"),
    }


def full_estimate(r: dict[str, Any], files: Files, epochs: int) -> dict[str, float]:
    """Minutes the run would take on the whole train and dev files at this run's rates: what
    a sampled (--quick) run is for, sizing the default --epochs. Training at the median rate
    of the intervals after the first (warm-up), evaluations at the scoring rate, plus this
    run's fixed costs (Ray start, model loads, checkpoints, export, MLflow)."""
    n_train = len(load_rows(str(files.train), "train"))
    n_dev = len(load_rows(str(files.dev), "validation"))
    rates = [c["train/samples_per_s"] for c in r["curve"][1:]] or [r["train_samples_per_s"]]
    rate = statistics.median(rates)
    evals_done = len(r["curve"])
    fixed_s = r["train_wall_s"] - r["num_train"] * r["epochs"] / r["train_samples_per_s"]
    fixed_s -= evals_done * r["num_dev"] / r["score_sentences_per_s"]
    steps = epochs * math.ceil(n_train / r["examples_per_step"])
    evals = math.ceil(steps / EVAL_INTERVAL)  # at the real run's interval, not this one's
    train_s = epochs * n_train / rate
    eval_s = (evals + 2) * n_dev / r["score_sentences_per_s"]  # + re-scoring dev, + test
    return {
        "epochs": epochs,
        "steady_samples_per_s": rate,
        "train_min": train_s / 60,
        "eval_min": eval_s / 60,
        "fixed_min": max(fixed_s, 0.0) / 60,
        "total_min": (train_s + eval_s + max(fixed_s, 0.0)) / 60,
    }


def print_full(r: dict[str, Any]) -> None:
    types = list(r["dev"]["per_type"])
    print(f"\nlearning curve (dev, {r['num_dev']} sentences)")
    head = f"{'step':>6} {'epoch':>6} {'train loss':>10} {'dev loss':>9} {'dev F1':>7}"
    head += "".join(f" {t:>6}" for t in types) + f" {'samples/s':>10}"
    print(head)
    for c in r["curve"]:
        line = f"{c['step']:>6} {c['epoch']:>6.2f} {c['train/fine_loss']:>10.4f}"
        line += f" {c['eval/loss']:>9.4f} {100 * c['eval/entity_f1']:>7.2f}"
        line += "".join(f" {100 * (c[f'eval/f1/{t}'] or 0):>6.1f}" for t in types)
        print(line + f" {c['train/samples_per_s']:>10.1f}")
    rate = r["train_samples_per_s"]
    print(
        f"\nfull: {r['num_train']} sentences, {r['workers']} workers, {r['epochs']} epoch(s), "
        f"{r['steps']} steps: training wall {r['train_wall_s'] / 60:.1f} min, "
        f"{'–' if rate is None else f'{rate:.1f}'} train samples/s"
    )
    print(f"{'':<14} {'entity F1':>9} {'P':>6} {'R':>6}" + "".join(f" {t:>6}" for t in types))
    for name, s in (("dev (loop)", r["dev"]), ("test (export)", r["test"])):
        print(
            f"{name:<14} {100 * s['entity_f1']:>9.2f} {100 * s['precision']:>6.1f} "
            f"{100 * s['recall']:>6.1f}"
            + "".join(f" {100 * s['per_type'][t]:>6.1f}" for t in types)
        )
    print(f"dev re-scored from the exported folder: {100 * r['dev_rescored_entity_f1']:.2f}")
    for e in r.get("estimates", []):
        print(
            f"sizing: {e['epochs']} epoch(s) of the whole train split would take about "
            f"{e['total_min']:.0f} min here (training {e['train_min']:.1f} at "
            f"{e['steady_samples_per_s']:.0f} samples/s, evaluations {e['eval_min']:.1f}, "
            f"fixed {e['fixed_min']:.1f})"
        )
    f1 = 100 * r["dev"]["entity_f1"]
    target = 100 * r["target_dev_entity_f1"]
    print(f"{'PASS' if r['pass'] else 'FAIL'}: dev entity F1 {f1:.2f} (target ≥ {target:.0f})")
    if not r["pass"]:
        print(why_short(r))


def why_short(r: dict[str, Any]) -> str:
    """What the curve and the per-type scores say about a miss (not a fix)."""
    curve, per_type = r["curve"], r["dev"]["per_type"]
    weakest = min(per_type, key=per_type.get)
    parts = [f"weakest type {weakest} at {100 * per_type[weakest]:.1f} F1"]
    if len(curve) >= 2:
        gain = 100 * (curve[-1]["eval/entity_f1"] - curve[-2]["eval/entity_f1"])
        steps = curve[-1]["step"] - curve[-2]["step"]
        state = "still rising" if gain > 0.2 else "flat"
        parts.insert(0, f"curve {state} at the end ({gain:+.2f} pts over its last {steps} steps)")
    return "  why: " + "; ".join(parts)


# --------------------------------------------------------------------------- part 2: low data


def arm_grids(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """(λ, lr) per arm, every arm the same number of runs: plain spends the anchored arms'
    λ × lr budget on lrs log-spaced over the same range."""

    def log_spaced(k: int) -> list[float]:
        lo, hi = args.lr_range
        return [math.sqrt(lo * hi)] if k == 1 else [float(x) for x in np.geomspace(lo, hi, k)]

    lrs = log_spaced(args.lr_points)
    budget = args.lr_points * max(len(args.lambdas_coupled), len(args.lambdas_decoupled))
    grids = {
        "plain": [(0.0, lr) for lr in log_spaced(budget)],
        "coupled": [(lam, lr) for lam in args.lambdas_coupled for lr in lrs],
        "decoupled": [(lam, lr) for lam in args.lambdas_decoupled for lr in lrs],
    }
    return {arm: grids[arm] for arm in args.arms}


def lowdata_overrides(
    args: argparse.Namespace, files: Files, tags: list[str], workdir: Path, n: int, seed: int
) -> dict[str, Any]:
    return {
        "model": {"label_names": tags},
        "data": {
            "train": str(files.train),
            "validation": str(files.dev),
            "max_train_samples": n,
            "max_validation_samples": args.val_sentences,
            "sample_seed": seed,
            "group_by_length": args.group_by_length,
        },
        "train": {
            "seed": seed,
            "num_threads": args.threads,
            "eval_interval": 10**9,  # one evaluation (and checkpoint), after the last step
        },
        "scaling": {"num_workers": 0},  # local mode: the loop runs in this process
        "tracking": {"enabled": False},
        "storage": {"path": str(workdir / "runs")},
    }


@dataclass
class Trial:
    arm: str
    n: int
    seed: int
    lam: float
    lr: float
    epochs: int
    steps: int
    val_entity_f1: float
    val_loss: float
    drift_l2: float | None  # ‖θ − θ*‖ at the end (tracked when λ > 0)
    samples_per_s: float
    wall_s: float
    model_dir: str | None
    run_dir: str
    checkpoint: str | None


def run_trial(base: dict, prepared: tuple, arm: str, lam: float, lr: float, epochs: int) -> Trial:
    """Train once with tether's loop; validation metrics come from the dev subset."""
    n, seed = base["data"]["max_train_samples"], base["train"]["seed"]
    trial = {
        "objective": {"lambda": lam, "mode": "decoupled" if arm == "decoupled" else "coupled"},
        "optim": {"lr": lr},
        "train": {"epochs": epochs},
        "storage": {"run_name": f"n{n}-s{seed}-{arm}-{lam:g}-{lr:g}"},  # a reused name resumes
    }
    t0 = time.perf_counter()
    summary = run_training(load_job(JOB, deep_merge(base, trial)), prepared=prepared).summary
    m = summary["metrics"]
    return Trial(
        arm=arm,
        n=n,
        seed=seed,
        lam=lam,
        lr=lr,
        epochs=epochs,
        steps=int(summary["step"]),
        val_entity_f1=m["eval/entity_f1"],
        val_loss=m["eval/loss"],
        drift_l2=m.get("train/drift_l2") if lam > 0 else None,
        samples_per_s=m["train/samples_per_s"],
        wall_s=time.perf_counter() - t0,
        model_dir=summary["model_dir"],
        run_dir=summary["run_dir"],
        checkpoint=summary["checkpoint"],
    )


def select(trials: list[Trial]) -> Trial:
    """Highest validation entity F1; ties go to the lower validation loss."""
    return max(trials, key=lambda t: (t.val_entity_f1, -t.val_loss))


def discard(trials: list[Trial]) -> None:
    """Delete the runs' folders and local-mode checkpoints (~350 MB a run) once scored."""
    for t in trials:
        for path in (t.run_dir, t.checkpoint):
            if path:
                shutil.rmtree(path, ignore_errors=True)
        t.model_dir = t.checkpoint = None


def run_cell(
    args: argparse.Namespace, base: dict, grids: dict, files: Files
) -> dict[str, dict[str, Any]]:
    """Tune every arm on the dev subset, then score each winner on the test set."""
    spec = load_job(JOB, base)
    prepared = prepare_run_data(spec)  # encoded once for every run of this (n, seed)
    data = prepared[1]
    per_epoch = math.ceil(len(data.train) / spec.train.batch_size)
    epochs = max(args.lowdata_epochs, math.ceil(args.min_steps / per_epoch))
    print(f"  {len(data.train)} train / {len(data.validation)} validation, {epochs} epoch(s)")
    out = {}
    for arm in args.arms:
        trials = []
        for lam, lr in grids[arm]:
            t = run_trial(base, prepared, arm, lam, lr, epochs)
            print(
                f"    {arm:<9} λ={lam:<5g} lr={lr:.2g}: val F1 {100 * t.val_entity_f1:.1f}, "
                f"loss {t.val_loss:.3f} ({t.wall_s:.0f} s, {t.samples_per_s:.0f} samples/s)",
                flush=True,
            )
            trials.append(t)
        best = select(trials)
        exported = load_exported(best.model_dir)
        t0 = time.perf_counter()
        test = entity_scores(
            score(exported, encode_file(exported, files.test, args.max_test_sentences), spec)
        )
        test_score_s = time.perf_counter() - t0
        print(
            f"    {arm:<9} selected λ={best.lam:g} lr={best.lr:.2g} → test F1 "
            f"{100 * test['entity_f1']:.2f} (scored in {test_score_s:.0f} s)"
        )
        discard(trials)
        out[arm] = {
            "test": test,
            "selected": {"lambda": best.lam, "lr": best.lr, "val_entity_f1": best.val_entity_f1},
            "num_train": len(data.train),
            "num_validation": len(data.validation),
            "test_score_s": test_score_s,
            "trials": [asdict(t) for t in trials],
        }
    return out


def summarize(cells: dict[int, dict[int, dict]], arms: list[str]) -> list[dict[str, Any]]:
    """Per n and arm: test entity F1 mean ± std over seeds, paired Δ to plain, verdict."""
    return summarize_study(cells, arms, lambda c: c["test"]["entity_f1"], "test_entity_f1")


def print_lowdata(rows: list[dict[str, Any]]) -> None:
    print("\ntest entity F1, mean ± std over seeds; Δ = paired difference to plain")
    head = f"{'n':>6} {'arm':<10} {'test F1':>15} {'Δ pts':>7} {'better':>7}  {'selected lr':<24} verdict"
    print(head)
    print("-" * len(head))
    for r in rows:
        k = len(r["seeds"])
        lrs = ",".join(f"{x:.2g}" for x in r["selected_lrs"])
        delta = "" if r["arm"] == "plain" else f"{100 * r['delta_vs_plain_mean']:+.1f}"
        better = "" if r["arm"] == "plain" else f"{r['seeds_better_than_plain']}/{k}"
        print(
            f"{r['n']:>6} {r['arm']:<10} {100 * r['mean']:>7.2f} ± {100 * r['std']:<5.2f}"
            f" {delta:>7} {better:>7}  {lrs:<24} {r['verdict']}"
        )
    print_plain_verdicts(rows)


def run_lowdata(
    args: argparse.Namespace, files: Files, grids: dict, workdir: Path, result: dict
) -> dict[str, Any]:
    """Every (n, seed) cell; the JSON is rewritten after each, so a stopped run keeps them."""
    tags = tag_names(files.train)
    for arm, grid in grids.items():
        print(f"{arm:<9} grid: " + ", ".join(f"λ={a:g}/lr={b:.2g}" for a, b in grid))
    out: dict[str, Any] = {"cells": {}, "summary": [], "complete": False}
    t0 = time.perf_counter()
    for n in args.ns:
        for seed in args.seeds:
            print(f"low data: n={n} seed={seed}", flush=True)
            base = lowdata_overrides(args, files, tags, workdir, n, seed)
            out["cells"].setdefault(n, {})[seed] = run_cell(args, base, grids, files)
            out["summary"] = summarize(out["cells"], args.arms)
            out["wall_s"] = time.perf_counter() - t0
            result["lowdata"] = out
            write_json(args.out, result)
    out["complete"] = True
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = conll_files(args.data_dir)
    if files is None:
        print(f"skipped: CoNLL-2003 train.txt/dev.txt/test.txt not found in {args.data_dir}")
        return 0
    exit_on_sigterm()
    quiet_libraries(args.verbose)
    torch.set_num_threads(args.threads)  # low-data runs set it too; scoring runs here
    started = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tether-ner-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(workdir)  # local mode leaves checkpoints in temp dirs: keep them here
    os.environ.setdefault("TETHER_CACHE", str(workdir / "cache"))
    grids = arm_grids(args)
    result: dict[str, Any] = {
        "benchmark": "ner_conll",
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": machine_info(torch_threads=args.threads),
        "data": {k: str(v) for k, v in asdict(files).items()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"job": str(JOB.relative_to(REPO)), "grids": grids},
        "full": None,
        "lowdata": None,
        "complete": False,
    }
    try:
        if "full" in args.parts:
            result["full"] = run_full(args, files, workdir)
            if args.max_train_sentences and result["full"]["curve"]:  # a sample: size the real run
                result["full"]["estimates"] = [
                    full_estimate(result["full"], files, e) for e in (1, 2, 3)
                ]
            write_json(args.out, result)
            print_full(result["full"])
        if "lowdata" in args.parts:
            result["lowdata"] = run_lowdata(args, files, grids, workdir, result)
            print_lowdata(result["lowdata"]["summary"])
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["complete"] = True
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    result["wall_s"] = time.time() - started
    write_json(args.out, result)
    print(f"\nwall {result['wall_s'] / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
