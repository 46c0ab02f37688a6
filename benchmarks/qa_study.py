"""Extractive QA with the packaged MiniLM: EM/F1 and samples/s of plain vs anchored
fine-tuning at 2 data sizes and 3 seeds, on tether's synthetic QA set and, where its files are
on the machine, SQuAD v1.1.

    .venv/bin/python benchmarks/qa_study.py            # n ∈ {250, 1000} × 3 seeds × 3 arms (~45 min synthetic, idle)
    .venv/bin/python benchmarks/qa_study.py --quick    # smoke run: n=100, 1 seed, 3 arms (1–2 min)
    .venv/bin/python benchmarks/qa_study.py --datasets synthetic   # leave SQuAD out
    .venv/bin/python benchmarks/qa_study.py --help     # --ns --seeds --arms --val --lr --lambda-coupled --kappa ...

Every run starts from jobs/qa.yaml (packaged all-MiniLM-L6-v2 with a fresh span head at 10×
lr, batch 16, lr 1e-4, linear schedule) and goes through tether's own API (``load_job`` with
overrides, ``prepare_run_data``, ``run_training``), in this process (``scaling.num_workers=0``,
--threads torch threads, tracking off, runs under a temp workdir that is removed at the end).
For each dataset, training-set size n (``data.max_train_samples``) and seed (the sample's
``data.sample_seed`` and ``train.seed``: the sample, the head's init and the batch order):

    start       the untrained model (base + fresh span head, initialised exactly as the
                seed's runs start) scored once per seed with the loop's ``evaluate``
    plain       objective.lambda = 0 (the control)
    coupled     grad += 2λ(θ − θ*), λ = --lambda-coupled (0.1)
    decoupled   θ ← θ − lr·λ(θ − θ*) after each step, with λ derived from the strength
                κ = --kappa (1.0, ``objective.strength``): λ = κ / Σ_t lr_t over the run's
                own schedule, so the pull means the same at both n (recorded as resolved)

Every arm uses the same lr (--lr) and schedule: at least --epochs (2) epochs and at least
--min-steps (100) optimizer steps (n = 250 trains 7 epochs, n = 1000 2). One evaluation, after
the last step, on a --val (300) question subset of the validation split, drawn with the seed
(the same subset at every n and for every arm of a seed, so differences are paired).

Datasets:
    synthetic   ``synthetic:qa`` (3,000 train / 600 validation fact paragraphs; validation
                asks with held-out phrasings and names), the job's max_length 128 /
                doc_stride 32 / max_question_length 32 / max_answer_length 16. A toy: its
                numbers say the QA path learns, not how well MiniLM reads.
    squad       ``../shared/data/squad/{train,dev}-v1.1.json`` (beside the repository, read in
                place) when both exist, else recorded as skipped. max_length 384, doc_stride
                128, max_question_length 64, max_answer_length 30 (the usual SQuAD settings);
                the validation subset is --val dev questions (all gold answers count).

Reports per dataset, n and arm: F1 and exact match (official SQuAD normalisation) mean ± std
over seeds, the start F1, train samples/s (a sample is a window: a question with its context,
or a piece of a long one) and wall time; the paired difference to plain in F1 and EM with a
verdict on F1 (helps / no clear difference / hurts: two standard errors, as the other
studies); and per run the resolved λ and the drift ‖θ − θ*‖ where the anchor is on.

Runtime, measured with --quick on the 2-core machine (it prints this extrapolation): 1.0 min
at a load average of 0.6 → 1.4, training 13–14 windows/s; 1.8 min at 1.0 → 2.6 (other jobs),
6–9 windows/s. A synthetic window is ~88 tokens (a random batch of 16 pads to ~114): several
times a CoNLL sentence. Scoring runs at ~30 questions/s. The default synthetic study is 18
runs of ~1,800–2,000 windows (~35k in all) plus 21 scorings of 300 questions: about 45 min on
quiet cores, ~1.5 h beside other heavy jobs. SQuAD windows are ~2–3× longer (a batch pads to
~300 of 384 tokens), ~1.01 per question: roughly 2–2.5 h more on quiet cores (extrapolated,
not measured: no SQuAD files on this machine); run it alone with ``--datasets squad`` when it
matters. --quick runs the synthetic set only; ``--quick --datasets squad`` smoke-tests SQuAD
(~3 min, estimated).

Writes benchmarks/results/qa_study.json (--quick: qa_study_quick.json), rewritten after every
run, so a stopped run keeps what it finished.
"""

from __future__ import annotations

import argparse
import hashlib
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
from tether.config import JobSpec, deep_merge, load_job  # noqa: E402
from tether.data import PreparedData  # noqa: E402
from tether.models import resolve_model_source  # noqa: E402
from tether.run import prepare_run_data, run_training  # noqa: E402
from tether.tasks import Task  # noqa: E402
from tether.train.loop import evaluate  # noqa: E402
from tether.train.setup import build_model, make_plan  # noqa: E402
from tether.train.strategy import DataParallel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "qa.yaml"
SQUAD = REPO.parent / "shared" / "data" / "squad"
SQUAD_FILES = ("train-v1.1.json", "dev-v1.1.json")
# SQuAD's usual window and answer settings (the job's are sized for short synthetic contexts)
SQUAD_DATA = {"max_length": 384, "doc_stride": 128, "max_question_length": 64}
SQUAD_MAX_ANSWER_TOKENS = 30
ARMS = ("plain", "coupled", "decoupled")
DATASETS = ("synthetic", "squad")
QUICK = {"ns": [100], "seeds": [0], "val": 60, "min_steps": 10, "epochs": 1}


# --------------------------------------------------------------------------- settings


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=ints, default=[250, 1000], help="train sizes")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="sample and training seeds")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument(
        "--datasets",
        help="comma-separated subset of synthetic, squad (default both; --quick: synthetic)",
    )
    p.add_argument("--squad-dir", type=Path, default=SQUAD, help=f"holds {', '.join(SQUAD_FILES)}")
    p.add_argument("--val", type=int, default=300, help="validation questions per seed")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (at least)")
    p.add_argument("--min-steps", type=int, default=100, help="more epochs until this many steps")
    p.add_argument("--lr", type=float, default=1e-4, help="every arm's lr (the job's)")
    p.add_argument("--lambda-coupled", type=float, default=0.1, help="coupled arm's λ")
    p.add_argument("--kappa", type=float, default=1.0, help="decoupled arm's strength κ")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--workdir", type=Path, help="runs and cache (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="library INFO logs")
    p.add_argument("--out", type=Path, help="JSON path (default results/qa_study.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    apply_quick(args, QUICK, "qa_study")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    # --quick stays ~2 min: SQuAD's smoke run is asked for by name (--quick --datasets squad)
    chosen = args.datasets or ("synthetic" if args.quick else ",".join(DATASETS))
    args.datasets = [d.strip() for d in chosen.split(",") if d.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or "plain" not in args.arms:
        p.error(f"--arms must include plain (the control); unknown: {unknown}")
    if not set(args.datasets) <= set(DATASETS) or not args.datasets:
        p.error(f"--datasets: a subset of {DATASETS}")
    if not args.ns or not args.seeds or min(args.epochs, args.val, args.min_steps) < 1:
        p.error("need --ns, --seeds, and --epochs, --val, --min-steps >= 1")
    return args


# --------------------------------------------------------------------------- datasets


def dataset_overrides(name: str, squad_dir: Path) -> dict[str, Any] | str:
    """The job overrides that point a run at one dataset, or why it is skipped."""
    if name == "synthetic":
        return {}  # the job's own data section: synthetic:qa
    train, dev = (squad_dir / f for f in SQUAD_FILES)
    missing = next((f for f in (train, dev) if not f.is_file()), None)
    if missing is not None:
        return f"skipped: {missing} not found"
    return {
        "data": {"train": str(train), "validation": str(dev)} | SQUAD_DATA,
        "eval": {"max_answer_length": SQUAD_MAX_ANSWER_TOKENS},
    }


def cell_overrides(
    args: argparse.Namespace, data: dict[str, Any], workdir: Path, n: int, seed: int
) -> dict[str, Any]:
    """One (n, seed) of one dataset: the sample, the seed, and where and how runs happen."""
    return deep_merge(
        data,
        {
            "data": {
                "max_train_samples": n,
                "max_validation_samples": args.val,
                "sample_seed": seed,
            },
            "optim": {"lr": args.lr},
            "train": {
                "seed": seed,
                "num_threads": args.threads,
                "eval_interval": 10**9,  # one evaluation (and checkpoint), after the last step
            },
            "scaling": {"num_workers": 0},  # local mode: the loop runs in this process
            "tracking": {"enabled": False},
            "storage": {"path": str(workdir / "runs")},
        },
    )


def arm_objective(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    if arm == "plain":
        return {"lambda": 0.0, "mode": "coupled"}
    if arm == "coupled":
        return {"lambda": args.lambda_coupled, "mode": "coupled"}
    # strength replaces the job's λ (load_job drops it): λ = κ / Σ lr_t, resolved per run
    return {"strength": args.kappa, "mode": "decoupled"}


# --------------------------------------------------------------------------- one run


def score_start(spec: JobSpec, task: Task, data: PreparedData) -> dict[str, float]:
    """The untrained model's metrics: the base with the span head the seed's runs start from
    (the loop seeds torch with train.seed before building it, as here)."""
    torch.manual_seed(spec.train.seed)
    model, _ = build_model(spec, task, resolve_model_source(spec.model.name, spec.storage.path))
    t0 = time.perf_counter()
    m = evaluate(
        model, data.validation, task, data.pad_id, spec, DataParallel(0, 1, torch.device("cpu"))
    )
    score_s = time.perf_counter() - t0
    return {
        "f1": m["eval/f1"],
        "exact_match": m["eval/exact_match"],
        "loss": m["eval/loss"],
        "num_examples": int(m["eval/num_examples"]),
        "score_s": score_s,
        "score_examples_per_s": m["eval/num_examples"] / score_s,
    }


@dataclass
class Run:
    dataset: str
    n: int
    seed: int
    arm: str
    lam: float  # the resolved λ (decoupled: from κ and this run's schedule)
    strength: float | None
    lr: float
    epochs: int
    steps: int
    train_windows: int
    f1: float
    exact_match: float
    loss: float
    num_examples: int
    drift_l2: float | None  # ‖θ − θ*‖ at the end (tracked when λ > 0)
    samples_per_s: float  # windows per second of training (evaluation excluded)
    wall_s: float  # run_training end to end: model load, training, evaluation, export
    load_avg_1m: float  # at the run's end: other work on the machine skews samples/s


def run_arm(
    dataset: str, base: dict, prepared: tuple, arm: str, objective: dict, epochs: int
) -> Run:
    n, seed = base["data"]["max_train_samples"], base["train"]["seed"]
    overrides = {
        "objective": objective,
        "train": {"epochs": epochs},
        "storage": {"run_name": f"{dataset}-n{n}-s{seed}-{arm}"},  # a reused name resumes
    }
    t0 = time.perf_counter()
    summary = run_training(load_job(JOB, deep_merge(base, overrides)), prepared=prepared).summary
    wall_s = time.perf_counter() - t0
    m, lam = summary["metrics"], summary["objective"]["lambda"]
    for path in (summary["run_dir"], summary["checkpoint"]):  # ~350 MB a run: scored, so gone
        if path:
            shutil.rmtree(path, ignore_errors=True)
    return Run(
        dataset=dataset,
        n=n,
        seed=seed,
        arm=arm,
        lam=lam,
        strength=summary["objective"]["strength"],
        lr=base["optim"]["lr"],
        epochs=epochs,
        steps=int(summary["step"]),
        train_windows=len(prepared[1].train),
        f1=m["eval/f1"],
        exact_match=m["eval/exact_match"],
        loss=m["eval/loss"],
        num_examples=int(m["eval/num_examples"]),
        drift_l2=m.get("train/drift_l2") if lam > 0 else None,
        samples_per_s=m["train/samples_per_s"],
        wall_s=wall_s,
        load_avg_1m=os.getloadavg()[0],
    )


# --------------------------------------------------------------------------- one dataset


def validation_key(seed: int, data: PreparedData) -> str:
    """A seed's validation subset is drawn after a permutation of the whole train set, so it
    is the same at every n; the key checks that rather than assuming it."""
    return f"{seed}-{hashlib.sha1(data.validation.input_ids.values.tobytes()).hexdigest()[:12]}"


def run_dataset(
    args: argparse.Namespace, name: str, data: dict, workdir: Path, result: dict
) -> dict[str, Any]:
    """Every (n, seed) cell of one dataset; the JSON is rewritten after every run."""
    out: dict[str, Any] = {"cells": {}, "start": {}, "summary": [], "complete": False}
    result[name] = out
    t0 = time.perf_counter()
    for n in args.ns:
        for seed in args.seeds:
            base = cell_overrides(args, data, workdir, n, seed)
            spec = load_job(JOB, base)
            t1 = time.perf_counter()
            task, prepared = prepare_run_data(spec)
            prepare_s = time.perf_counter() - t1
            per_epoch = make_plan(spec, len(prepared.train), 1).steps_per_epoch
            epochs = max(args.epochs, math.ceil(args.min_steps / per_epoch))
            stats = prepared.stats
            print(
                f"{name}: n={n} seed={seed}: {stats.get('train_examples')} questions → "
                f"{len(prepared.train)} windows, {len(prepared.validation)} validation windows "
                f"({stats.get('validation_examples')} questions), {epochs} epoch(s) of "
                f"{per_epoch} steps (data {prepare_s:.0f} s)",
                flush=True,
            )
            key = validation_key(seed, prepared)
            if key not in out["start"]:
                out["start"][key] = {"seed": seed} | score_start(spec, task, prepared)
                s = out["start"][key]
                print(
                    f"    {'start':<9} F1 {100 * s['f1']:5.1f}  EM {100 * s['exact_match']:5.1f}"
                    f"  ({s['score_s']:.0f} s, {s['score_examples_per_s']:.0f} questions/s)"
                )
            cell = out["cells"].setdefault(n, {}).setdefault(seed, {})
            for arm in args.arms:
                r = run_arm(name, base, (task, prepared), arm, arm_objective(args, arm), epochs)
                cell[arm] = asdict(r) | {
                    "selected": {"lambda": r.lam, "lr": r.lr},  # summarize_study's fields
                    "start_key": key,
                    "prepare_s": prepare_s,
                }
                drift = "" if r.drift_l2 is None else f", drift {r.drift_l2:.3f}"
                print(
                    f"    {arm:<9} F1 {100 * r.f1:5.1f}  EM {100 * r.exact_match:5.1f}  "
                    f"loss {r.loss:.3f}  λ={r.lam:.4g}{drift}  ({r.steps} steps, "
                    f"{r.samples_per_s:.0f} samples/s, {r.wall_s:.0f} s)",
                    flush=True,
                )
                out["summary"] = summarize(out, args.arms)
                out["wall_s"] = time.perf_counter() - t0
                write_json(args.out, result)
    out["complete"] = True
    return out


def summarize(out: dict[str, Any], arms: list[str]) -> list[dict[str, Any]]:
    """Per n and arm over the seeds that finished every arm: F1 (the verdict's score) and EM
    mean ± std, paired Δ to plain, the start F1, samples/s and wall time."""
    done = {
        n: {s: c for s, c in by_seed.items() if all(a in c for a in arms)}
        for n, by_seed in out["cells"].items()
    }
    done = {n: by_seed for n, by_seed in done.items() if by_seed}
    rows = summarize_study(done, arms, lambda c: c["f1"], "f1")
    em = summarize_study(done, arms, lambda c: c["exact_match"], "exact_match")
    for r, e in zip(rows, em, strict=True):
        runs = [done[r["n"]][s][r["arm"]] for s in r["seeds"]]
        starts = [out["start"][c["start_key"]]["f1"] for c in runs]
        r |= {
            "exact_match": e["exact_match"],
            "em_mean": e["mean"],
            "em_std": e["std"],
            "em_delta_vs_plain_mean": e["delta_vs_plain_mean"],
            "start_f1_mean": statistics.mean(starts),
            "samples_per_s_mean": statistics.mean(c["samples_per_s"] for c in runs),
            "wall_s_mean": statistics.mean(c["wall_s"] for c in runs),
            "drift_l2_mean": None
            if runs[0]["drift_l2"] is None
            else statistics.mean(c["drift_l2"] for c in runs),
        }
    return rows


def print_dataset(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{name}: F1 and EM (%), mean ± std over seeds; Δ = paired difference to plain")
    head = (
        f"{'n':>5} {'arm':<10} {'F1':>13} {'EM':>13} {'start F1':>8} {'ΔF1':>6} {'ΔEM':>6} "
        f"{'better':>6} {'λ':>8} {'samples/s':>9} {'wall s':>6}  verdict (F1)"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        paired = ["", "", ""]  # plain is the control: nothing to pair
        if r["arm"] != "plain":
            paired = [
                f"{100 * r['delta_vs_plain_mean']:+.1f}",
                f"{100 * r['em_delta_vs_plain_mean']:+.1f}",
                f"{r['seeds_better_than_plain']}/{len(r['seeds'])}",
            ]
        print(
            f"{r['n']:>5} {r['arm']:<10} {100 * r['mean']:>6.2f} ± {100 * r['std']:<4.2f} "
            f"{100 * r['em_mean']:>6.2f} ± {100 * r['em_std']:<4.2f} "
            f"{100 * r['start_f1_mean']:>8.2f} {paired[0]:>6} {paired[1]:>6} {paired[2]:>6} "
            f"{statistics.mean(r['selected_lambdas']):>8.3g} {r['samples_per_s_mean']:>9.1f} "
            f"{r['wall_s_mean']:>6.0f}  {r['verdict']}"
        )
    print_plain_verdicts(rows)


# --------------------------------------------------------------------------- sizing


def estimate_default_run(out: dict[str, Any]) -> dict[str, float]:
    """Minutes the default study (parse_args([])) would take on this dataset at this run's
    rates: training at the median samples/s, evaluation at the start scoring's questions/s,
    plus each run's fixed cost (model load, checkpoint, export) and each cell's data prep."""
    d = parse_args([])
    runs = [
        c for by_seed in out["cells"].values() for cell in by_seed.values() for c in cell.values()
    ]
    starts = list(out["start"].values())
    rate = statistics.median(r["samples_per_s"] for r in runs)
    score_rate = statistics.median(s["score_examples_per_s"] for s in starts)
    fixed = statistics.median(
        max(
            0.0,
            r["wall_s"] - r["train_windows"] * r["epochs"] / rate - r["num_examples"] / score_rate,
        )
        for r in runs
    )
    prepare = statistics.median(r["prepare_s"] for r in runs)
    windows_per_question = statistics.median(r["train_windows"] / r["n"] for r in runs)
    batch = load_job(JOB).train.batch_size
    total_s = 0.0
    for n in d.ns:
        windows = round(n * windows_per_question)
        epochs = max(d.epochs, math.ceil(d.min_steps / math.ceil(windows / batch)))
        run_s = windows * epochs / rate + d.val / score_rate + fixed
        total_s += len(d.seeds) * (len(d.arms) * run_s + prepare)
    total_s += len(d.seeds) * d.val / score_rate  # the start scorings
    return {
        "train_samples_per_s": rate,
        "score_questions_per_s": score_rate,
        "fixed_s_per_run": fixed,
        "total_min": total_s / 60,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    quiet_libraries(args.verbose)
    torch.set_num_threads(args.threads)  # the runs set it too; the start scoring runs here
    started = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tether-qa-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(workdir)  # local mode leaves checkpoints in temp dirs: keep them here
    os.environ.setdefault("TETHER_CACHE", str(workdir / "cache"))
    result: dict[str, Any] = {
        "benchmark": "qa_study",
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": machine_info(torch_threads=args.threads),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"job": str(JOB.relative_to(REPO)), "squad_data": SQUAD_DATA},
        "complete": False,
    }
    try:
        for name in DATASETS:
            data = dataset_overrides(name, args.squad_dir)
            if isinstance(data, dict) and name not in args.datasets:
                data = f"not run (--datasets {','.join(args.datasets)})"
            if isinstance(data, str):
                result[name] = data
                print(f"{name}: {data}")
                continue
            run_dataset(args, name, data, workdir, result)
            print_dataset(name, result[name]["summary"])
            if args.quick:  # a smoke run's purpose: size the real one
                est = result[name]["estimate_default"] = estimate_default_run(result[name])
                print(
                    f"sizing: the default study on {name} would take about "
                    f"{est['total_min']:.0f} min here (training at "
                    f"{est['train_samples_per_s']:.0f} samples/s, scoring at "
                    f"{est['score_questions_per_s']:.0f} questions/s, "
                    f"{est['fixed_s_per_run']:.0f} s fixed per run)"
                )
            write_json(args.out, result)
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
