"""Training throughput: tether's loop (λ=0 and coupled λ>0) vs Hugging Face's Trainer, on CPU.

    .venv/bin/python benchmarks/throughput_vs_hf.py              # 4k SST-2 sentences, 1 epoch, 3 rounds
    .venv/bin/python benchmarks/throughput_vs_hf.py --quick      # smoke run: 256 sentences, 8 steps
    .venv/bin/python benchmarks/throughput_vs_hf.py --help       # --train-samples --epochs --repeats ...

Four arms, one process, the packaged all-MiniLM-L6-v2 with the same fresh 2-label head (same
seed), the same SST-2 training subset (tether's own sampler picks it, and the Trainer arms get
exactly those rows), batch 32, AdamW at the same lr, warm-up, weight decay and clipping:

    tether-lambda0    tether.run.run_training, scaling.num_workers=0 (the loop in-process)
    tether-coupled    the same with the coupled anchor, grad += 2λ(θ − θ*)
    hf-defaults       transformers.Trainer as commonly set up: padding="max_length", 128 tokens
    hf-best           Trainer with dynamic padding (DataCollatorWithPadding) and
                      length-grouped batches (train_sampling_strategy="group_by_length")

tether always pads each batch to its longest example; --tether-group-by-length (on by default)
sets data.group_by_length, the counterpart of Trainer's length grouping. Throughput is training
examples per second from the first step to the last, excluding evaluation and checkpoints in
every arm (tether: the loop's train/samples_per_s with one evaluation at the end; Trainer: a
callback's on_train_begin → on_train_end, with saving off). Each arm also reports its accuracy
on the full SST-2 dev set (872), so no speed is bought with accuracy. Rounds are interleaved:
every round runs each arm once, rotating the order, and the summary is the median over rounds.
Targets: tether ≥ 1.3× Trainer defaults and ≥ 1.0× Trainer best.

Data: ../shared/data/sst2/{train,dev}.tsv; without them, tether's synthetic:sentiment data
(4000 train / 800 held-out validation), said in the output and the JSON. Writes
benchmarks/results/throughput_vs_hf.json (--quick: throughput_vs_hf_quick.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fix torch's threads ourselves
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import torch  # noqa: E402

from _common import RESULTS, apply_quick, exit_on_sigterm, machine_info, quiet_libraries, write_json  # noqa: E402
from tether.config import JobSpec, validate_job  # noqa: E402
from tether.data import split_rows  # noqa: E402
from tether.models import label_kwargs, load_pretrained, load_tokenizer, resolve_model_source  # noqa: E402
from tether.run import prepare_run_data, run_training  # noqa: E402

MODEL = "packaged:all-MiniLM-L6-v2"
LABEL_NAMES = ["negative", "positive"]
ARMS = ("tether-lambda0", "tether-coupled", "hf-defaults", "hf-best")
TETHER_ARMS, HF_ARMS = ARMS[:2], ARMS[2:]
TARGETS = {"hf-defaults": 1.3, "hf-best": 1.0}  # minimum tether / Trainer samples/s
REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
# a whole epoch, not max_steps: Trainer's length grouping puts its longest batches first, so a
# run cut short would time long batches for hf-best and a random mix for tether
QUICK = {"train_samples": 256, "epochs": 1, "max_steps": None, "repeats": 1, "dev_samples": 200}


# --------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-samples", type=int, default=4000, help="SST-2 training sentences")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run")
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after N steps")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median over them)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step, every arm")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW peak lr, every arm")
    p.add_argument("--lam", type=float, default=0.01, help="λ of the tether-coupled arm")
    p.add_argument(
        "--max-length", type=int, default=128, help="truncate (hf-defaults pads) to this"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, every arm")
    p.add_argument(
        "--dev-samples", type=int, default=None, help="score on a dev subset (default all)"
    )
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument(
        "--tether-group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="data.group_by_length for the tether arms (Trainer's hf-best groups too)",
    )
    p.add_argument("--seed", type=int, default=42, help="subset sample, head init, data order")
    p.add_argument("--data-dir", type=Path, default=SST2, help="folder with train.tsv, dev.tsv")
    p.add_argument("--workdir", type=Path, help="runs and temp checkpoints (default: a temp dir)")
    p.add_argument("--keep-runs", action="store_true", help="keep the workdir afterwards")
    p.add_argument("--verbose", action="store_true", help="library INFO logs and progress")
    p.add_argument(
        "--out", type=Path, help=f"JSON results (default {RESULTS.name}/throughput_vs_hf.json)"
    )
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from --out's JSON, only")
    args = p.parse_args(argv)
    apply_quick(args, QUICK, "throughput_vs_hf")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        p.error(f"--arms: unknown {unknown}; choose from {ARMS}")
    if args.repeats < 1 or args.epochs < 1 or args.train_samples < args.batch_size:
        p.error("need --repeats >= 1, --epochs >= 1, --train-samples >= --batch-size")
    if args.max_steps is not None and args.max_steps * args.batch_size < args.train_samples:
        print(
            "warning: --max-steps ends the run mid-epoch; Trainer's length grouping runs its "
            "longest batches first, so hf-best is timed on longer batches than the others"
        )
    return args


# --------------------------------------------------------------------------- data


def data_section(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The job spec's data section (SST-2 TSVs, else synthetic) and a line saying which."""
    common = {
        "max_train_samples": args.train_samples,
        "sample_seed": args.seed,
        "max_length": args.max_length,
        "group_by_length": args.tether_group_by_length,
        "max_validation_samples": args.dev_samples,
    }
    train, dev = args.data_dir / "train.tsv", args.data_dir / "dev.tsv"
    if train.is_file() and dev.is_file():
        # the dev file names its text column `content`; the rename maps it onto `sentence`
        section = {
            "train": str(train),
            "validation": str(dev),
            "text_column": "sentence",
            "rename_columns": {"content": "sentence"},
        }
        return section | common, f"SST-2 from {args.data_dir} (dev set: dev.tsv)"
    note = (
        f"SST-2 not found in {args.data_dir}: using tether's SYNTHETIC data (synthetic:sentiment,"
        " 4000 train / 800 held-out validation as 'dev'); numbers are a smoke test only"
    )
    return {"train": "synthetic:sentiment"} | common, note


def base_job(args: argparse.Namespace, data: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The tether job every tether arm runs (λ is set per arm)."""
    return {
        "name": "throughput",
        "model": {"name": MODEL, "label_names": LABEL_NAMES},
        "data": data,
        "objective": {"lambda": 0.0, "mode": "coupled"},
        "optim": {"lr": args.lr, "weight_decay": 0.01, "warmup_ratio": 0.06, "max_grad_norm": 1.0},
        "train": {
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "eval_batch_size": 64,
            "eval_interval": 10**9,  # evaluate (and checkpoint) once, after the last step
            "seed": args.seed,
            "num_threads": args.threads,
        },
        "scaling": {"num_workers": 0},  # local mode: the same loop, in this process
        "tracking": {"enabled": False},
        "storage": {"path": str(workdir / "runs")},
    }


def samples_seen(n_train: int, batch_size: int, steps: int) -> int:
    """Examples processed in ``steps`` steps of epochs that end with a partial batch."""
    steps_per_epoch = math.ceil(n_train / batch_size)
    full_epochs, rest = divmod(steps, steps_per_epoch)
    return full_epochs * n_train + min(rest * batch_size, n_train)


def planned_steps(n_train: int, args: argparse.Namespace) -> int:
    return args.max_steps or args.epochs * math.ceil(n_train / args.batch_size)


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    arm: str
    round: int
    samples_per_s: float
    train_s: float  # first step to last step
    samples: int
    steps: int
    dev_accuracy: float
    dev_examples: int
    wall_s: float  # model load + train + dev scoring (+ tether's checkpoint/export)
    load_avg_1m: float | None = None  # after the run: other work on the machine skews it


def run_tether(
    arm: str, k: int, job: dict[str, Any], lam: float, prepared: tuple, keep: bool
) -> RunResult:
    """One run of tether's loop through run_training; the dev set is its validation split."""
    job = job | {
        "objective": {"lambda": lam if arm == "tether-coupled" else 0.0, "mode": "coupled"}
    }
    job["storage"] = job["storage"] | {"run_name": f"{arm}-round{k}"}  # a reused name resumes
    spec = validate_job(job)
    t0 = time.perf_counter()
    summary = run_training(spec, prepared=prepared).summary
    wall_s = time.perf_counter() - t0
    if not keep:  # the run folder and local mode's temp checkpoint: ~350 MB a run
        for path in (summary["run_dir"], summary["checkpoint"]):
            shutil.rmtree(path or "", ignore_errors=True)
    m = summary["metrics"]
    samples = samples_seen(len(prepared[1].train), spec.train.batch_size, int(summary["step"]))
    return RunResult(
        arm=arm,
        round=k,
        samples_per_s=m["train/samples_per_s"],
        train_s=samples / m["train/samples_per_s"],
        samples=samples,
        steps=int(summary["step"]),
        dev_accuracy=m["eval/accuracy"],
        dev_examples=int(m["eval/num_examples"]),
        wall_s=wall_s,
    )


def hf_datasets(
    arm: str, rows: dict[str, list[dict]], text_column: str, max_length: int, tokenizer
):
    """Tokenized train/dev datasets the way each Trainer setup is usually written."""
    import datasets

    datasets.disable_progress_bars()
    # hf-defaults: every example padded to max_length up front, the common tutorial recipe;
    # hf-best: truncation only, the collator pads each batch to its longest example
    padding = "max_length" if arm == "hf-defaults" else False

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length, padding=padding)

    out = {}
    for split, examples in rows.items():
        ds = datasets.Dataset.from_dict(
            {
                "text": [str(r[text_column]) for r in examples],
                "label": [int(r["label"]) for r in examples],
            }
        )
        out[split] = ds.map(encode, batched=True, remove_columns=["text"])
    return out


def run_trainer(arm: str, k: int, args: argparse.Namespace, ds: dict, workdir: Path) -> RunResult:
    """One Trainer run on the same rows, head init, lr schedule and optimizer settings."""
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class TrainSpan(TrainerCallback):
        """Times first step → last step, like tether's window (dataloader and optimizer built)."""

        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_train_end(self, *_, **__):
            self.end = time.perf_counter()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    source = resolve_model_source(MODEL)
    torch.manual_seed(args.seed)  # the same head init as tether's loop
    model = load_pretrained(
        source, AutoModelForSequenceClassification, **label_kwargs(LABEL_NAMES)
    ).model
    tokenizer = load_tokenizer(source)
    training_args = TrainingArguments(
        output_dir=str(workdir / f"{arm}-round{k}"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        weight_decay=0.01,  # Trainer's default is 0; tether's is 0.01: match the optimizer
        warmup_steps=0.06,  # a float < 1 is a ratio in transformers 5 (tether's warmup_ratio)
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        seed=args.seed,
        save_strategy="no",  # no mid-run checkpoint writes: we time the training steps
        disable_tqdm=not args.verbose,
        report_to="none",
        train_sampling_strategy="group_by_length" if arm == "hf-best" else "random",
    )
    span = TrainSpan()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        # hf-defaults gets Trainer's own default (DataCollatorWithPadding on pre-padded rows)
        data_collator=DataCollatorWithPadding(tokenizer) if arm == "hf-best" else None,
        processing_class=tokenizer,
        callbacks=[span],
    )
    trainer.train()
    predictions = trainer.predict(ds["dev"])
    wall_s = time.perf_counter() - t0
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    samples = samples_seen(len(ds["train"]), args.batch_size, trainer.state.global_step)
    train_s = span.end - span.start
    return RunResult(
        arm=arm,
        round=k,
        samples_per_s=samples / train_s,
        train_s=train_s,
        samples=samples,
        steps=trainer.state.global_step,
        dev_accuracy=accuracy,
        dev_examples=len(ds["dev"]),
        wall_s=wall_s,
    )


# --------------------------------------------------------------------------- interleaved rounds


def warm_up(threads: int, batch_size: int, steps: int = 3) -> None:
    """A few throwaway steps, so the first measured run does not pay one-time start-up costs
    (kernel selection, allocator growth, lazy imports) that the others skip."""
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    source = resolve_model_source(MODEL)
    model = load_pretrained(
        source, AutoModelForSequenceClassification, **label_kwargs(LABEL_NAMES)
    ).model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids = torch.randint(1000, 2000, (batch_size, 48))
    for _ in range(steps):
        model(input_ids=input_ids, labels=torch.zeros(batch_size, dtype=torch.long)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def rotated(arms: list[str], k: int) -> list[str]:
    """Round k starts at arm k mod A: each arm runs first, middle and last equally often."""
    shift = k % len(arms)
    return arms[shift:] + arms[:shift]


def run_rounds(
    args: argparse.Namespace, job: dict[str, Any], workdir: Path
) -> tuple[list[RunResult], int]:
    """Every round runs each arm once; slow spells on the shared machine hit all arms alike.

    Returns the runs and the number of training examples.
    """
    spec: JobSpec = validate_job(job)
    prepared = prepare_run_data(spec)  # tokenized once, outside every timing (tether caches it)
    data = prepared[1]
    train_rows, dev_rows = split_rows(spec.data)  # exactly the rows tether trains and scores on
    assert len(train_rows) == len(data.train) and len(dev_rows) == len(data.validation)
    rows = {"train": train_rows, "dev": dev_rows}
    tokenizer = load_tokenizer(resolve_model_source(MODEL))
    hf_ds = {
        arm: hf_datasets(arm, rows, spec.data.text_column, args.max_length, tokenizer)
        for arm in args.arms
        if arm in HF_ARMS
    }
    steps = planned_steps(len(data.train), args)
    print(f"{len(data.train)} training examples, {len(dev_rows)} dev, {steps} steps per run")
    warm_up(args.threads, args.batch_size)
    results = []
    for k in range(args.repeats):
        for arm in rotated(args.arms, k):
            print(f"round {k + 1}/{args.repeats}: {arm} ...", flush=True)
            if arm in TETHER_ARMS:
                r = run_tether(arm, k, job, args.lam, prepared, args.keep_runs)
            else:
                r = run_trainer(arm, k, args, hf_ds[arm], workdir)
            r.load_avg_1m = os.getloadavg()[0]
            print(
                f"  {r.samples_per_s:.1f} samples/s, dev acc {r.dev_accuracy:.4f}, "
                f"wall {r.wall_s:.0f} s, load {r.load_avg_1m:.1f}",
                flush=True,
            )
            results.append(r)
            gc.collect()  # drop the finished run's model and optimizer before the next
    return results, len(data.train)


# --------------------------------------------------------------------------- summary


def summarize(results: list[RunResult], arms: list[str], n_train: int) -> dict[str, Any]:
    """Per arm: median samples/s over rounds, time per epoch, dev accuracy, raw runs."""
    out: dict[str, Any] = {}
    for arm in arms:
        runs = [r for r in results if r.arm == arm]
        sps = [r.samples_per_s for r in runs]
        median = statistics.median(sps)
        out[arm] = {
            "samples_per_s_median": median,
            "samples_per_s_min": min(sps),
            "samples_per_s_max": max(sps),
            "epoch_s_median": n_train / median,
            "dev_accuracy_median": statistics.median(r.dev_accuracy for r in runs),
            "dev_examples": runs[0].dev_examples,
            "wall_s_median": statistics.median(r.wall_s for r in runs),
            "runs": [asdict(r) for r in runs],
        }
    return out


def ratios(arms: dict[str, Any], results: list[RunResult]) -> dict[str, Any]:
    """tether arm / Trainer arm: ratio of medians (the verdict) and per-round paired ratios."""
    out = {}
    for mine in (a for a in TETHER_ARMS if a in arms):
        for theirs in (a for a in HF_ARMS if a in arms):
            by_round = {r.round: r.samples_per_s for r in results if r.arm == theirs}
            paired = [r.samples_per_s / by_round[r.round] for r in results if r.arm == mine]
            ratio = arms[mine]["samples_per_s_median"] / arms[theirs]["samples_per_s_median"]
            out[f"{mine}/{theirs}"] = {
                "ratio": ratio,
                "paired_ratios": paired,
                "target": TARGETS[theirs],
                "pass": ratio >= TARGETS[theirs],
            }
    return out


def print_table(arms: dict[str, Any], vs: dict[str, Any], repeats: int) -> None:
    print(f"\ntraining throughput, median of {repeats} interleaved round(s)")
    head = (
        f"{'arm':<16} {'samples/s':>9} {'[min, max]':>15} {'s/epoch':>8} {'×defaults':>9}"
        f" {'×best':>6} {'dev acc':>8} {'wall s':>7}"
    )
    print(head)
    print("-" * len(head))
    for arm, a in arms.items():
        times = []
        for hf in HF_ARMS:
            times.append(
                f"{a['samples_per_s_median'] / arms[hf]['samples_per_s_median']:.2f}"
                if hf in arms
                else "-"
            )
        spread = f"[{a['samples_per_s_min']:.1f}, {a['samples_per_s_max']:.1f}]"
        print(
            f"{arm:<16} {a['samples_per_s_median']:>9.1f} {spread:>15} {a['epoch_s_median']:>8.0f}"
            f" {times[0]:>9} {times[1]:>6} {a['dev_accuracy_median']:>8.4f} {a['wall_s_median']:>7.0f}"
        )
    if vs:
        print("\ntargets (tether samples/s ÷ Trainer samples/s, ratio of medians)")
    for key, v in vs.items():
        paired = ", ".join(f"{x:.2f}" for x in v["paired_ratios"])
        verdict = "PASS" if v["pass"] else "FAIL"
        print(
            f"  {key:<30} {v['ratio']:.2f}×  target ≥{v['target']}×  {verdict}  (per round: {paired})"
        )
    accs = [a["dev_accuracy_median"] for a in arms.values()]
    print(f"dev accuracy spread across arms: {100 * (max(accs) - min(accs)):.1f} points")


# --------------------------------------------------------------------------- output


def plot(result: dict[str, Any], path: Path) -> Path:
    """Median samples/s per arm (bars span min–max over rounds), dev accuracy on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    names = list(arms)
    medians = [arms[a]["samples_per_s_median"] for a in names]
    spans = [
        [m - arms[a]["samples_per_s_min"] for a, m in zip(names, medians, strict=True)],
        [arms[a]["samples_per_s_max"] - m for a, m in zip(names, medians, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colors = ["tab:blue" if a in TETHER_ARMS else "tab:gray" for a in names]
    bars = ax.bar(names, medians, yerr=spans, capsize=4, color=colors)
    for bar, arm in zip(bars, names, strict=True):
        acc = 100 * arms[arm]["dev_accuracy_median"]
        ax.annotate(
            f"{bar.get_height():.0f}/s\ndev {acc:.1f}%",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 4),
            textcoords="offset points",
        )
    s = result["settings"]
    ax.set_ylabel("training samples/s (median over rounds)")
    ax.set_ylim(0, max(medians) * 1.3)
    ax.set_title(
        f"MiniLM on {result['data']['num_train']} SST-2 sentences, batch {s['batch_size']}, "
        f"{s['threads']} CPU threads",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        print(f"wrote {plot(json.loads(args.out.read_text()), args.out.with_suffix('.png'))}")
        return 0
    exit_on_sigterm()
    quiet_libraries(args.verbose)
    # DataLoader's pin_memory=True (Trainer's default) is a no-op without an accelerator
    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator.*")
    torch.set_num_threads(args.threads)  # fixed: the thread count moves step time most
    started = time.time()
    info = machine_info(torch_threads=args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tether-throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # tether's local mode leaves each run's checkpoint in a temp dir: keep them all in ours
    tempfile.tempdir = str(workdir)
    os.environ.setdefault("TETHER_CACHE", str(workdir / "cache"))
    data, data_note = data_section(args)
    print(data_note)
    print(f"arms {args.arms}; batch {args.batch_size}, lr {args.lr}, {args.threads} threads")
    try:
        job = base_job(args, data, workdir)
        results, n_train = run_rounds(args, job, workdir)
    finally:
        if not args.keep_runs:
            shutil.rmtree(workdir, ignore_errors=True)
    arms = summarize(results, args.arms, n_train)
    vs = ratios(arms, results)
    print_table(arms, vs, args.repeats)
    info["load_avg_1m_end"] = os.getloadavg()[0]
    result = {
        "benchmark": "throughput_vs_hf",
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": info,
        "data": {
            "note": data_note,
            "synthetic": data["train"].startswith("synthetic:"),
            "num_train": n_train,
            "num_dev": results[0].dev_examples,
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"model": MODEL, "weight_decay": 0.01, "warmup_ratio": 0.06, "max_grad_norm": 1.0},
        "arms": arms,
        "ratios": vs,
        "wall_s": time.time() - started,
    }
    write_json(args.out, result)
    png = plot(result, args.out.with_suffix(".png"))
    print(f"\nwall {result['wall_s']:.0f} s; wrote {args.out} and {png}")
    return 0  # verdicts are printed and recorded; a noisy machine should not fail a build


if __name__ == "__main__":
    sys.exit(main())
