"""LLM training throughput: tether (λ = 0, coupled anchor) vs Hugging Face Trainer, on SmolLM2.

    .venv/bin/python benchmarks/llm_throughput.py --quick     # smoke run (~4 min)
    .venv/bin/python benchmarks/llm_throughput.py             # 2 interleaved rounds (~20 min)

Same data (tether's synthetic chat SFT set, the assistant turns as targets), same effective
batch (--batch-size chats per step), same number of optimizer steps, same machine, same
threads, one process at a time:

    tether-lambda0   tether.run.run_training, in-process (scaling.num_workers=0), λ = 0
    tether-coupled   the same with the coupled anchor (λ = 0.1)
    trainer          transformers Trainer on the same token ids and labels, with the settings
                     a user would pick for this job: dynamic padding (DataCollatorForSeq2Seq),
                     length-grouped batches, fused AdamW, no evaluation during training
                     (tether's arms group by length too: data.group_by_length)

Throughput is target-and-context tokens (all non-pad input tokens) per second of the training
loop, from each framework's own timer (tether: train/samples_per_s × mean tokens per chat;
Trainer: train_samples_per_second × the same mean). The anchor overhead is 1 − coupled / λ=0.
Targets (the causal-LM issue): tether λ = 0 ≥ 1.0× Trainer; coupled overhead ≤ 3%.
Writes benchmarks/results/llm_throughput.json (--quick: llm_throughput_quick.json).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import apply_quick, exit_on_sigterm, machine_info, quiet_libraries, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARMS = ("tether-lambda0", "tether-coupled", "trainer")
QUICK = {"rounds": 1, "steps": 6, "examples": 64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="chats per step")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--lam", type=float, default=0.1, help="λ of the coupled arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--op-calls", type=int, default=9, help="isolated calls per anchor op")
    p.add_argument(
        "--op-only",
        action="store_true",
        help="only time the anchor ops, adding them to an existing --out JSON (its step times)",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def job(args, workdir: Path, lam: float, name: str) -> dict[str, Any]:
    return {
        "name": "llm-throughput",
        "model": {"name": "packaged:SmolLM2-135M-Instruct", "task": "causal-lm"},
        "data": {
            "train": "synthetic:chat",
            "max_train_samples": args.examples,
            "max_validation_samples": 16,
            "max_length": 128,
            "group_by_length": True,  # as the Trainer arm: batches of similar lengths
        },
        "objective": {"lambda": lam, "mode": "coupled"},
        "optim": {"lr": 5e-5, "warmup_ratio": 0.0},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "eval_interval": args.steps,
            "num_threads": args.threads,
            "keep_checkpoints": 1,
        },
        "eval": {"generate_examples": 0, "samples": 0, "forgetting_probe": "none"},
        "scaling": {"num_workers": 0},
        "tracking": {"enabled": False},
        "storage": {"path": str(workdir / "runs"), "run_name": name},
    }


def run_tether(args, workdir: Path, arm: str, k: int, mean_tokens: float) -> dict[str, Any]:
    from tether.config import validate_job
    from tether.run import run_training

    lam = args.lam if arm == "tether-coupled" else 0.0
    spec = validate_job(job(args, workdir, lam, f"{arm}-{k}"))
    summary = run_training(spec).summary
    shutil.rmtree(summary["run_dir"], ignore_errors=True)
    samples_per_s = summary["metrics"]["train/samples_per_s"]
    return {
        "arm": arm,
        "round": k,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * mean_tokens,
    }


def run_trainer(args, workdir: Path, k: int, data, mean_tokens: float) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from tether.models import resolve_model_source
    from tether.tasks.causal_lm import CausalLM

    torch.set_num_threads(args.threads)
    source = resolve_model_source("packaged:SmolLM2-135M-Instruct")
    tokenizer = CausalLM().load_tokenizer(source, None, False)
    model = AutoModelForCausalLM.from_pretrained(source)
    rows = {
        "input_ids": [data.train.input_ids.row(i).tolist() for i in range(len(data.train))],
        "labels": [data.train.fields["labels"].row(i).tolist() for i in range(len(data.train))],
    }
    training_args = TrainingArguments(
        output_dir=str(workdir / f"trainer-{k}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=5e-5,
        lr_scheduler_type="linear",
        optim="adamw_torch_fused",
        train_sampling_strategy="group_by_length",  # transformers 5's name for length grouping
        dataloader_num_workers=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=42,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=datasets.Dataset.from_dict(rows),
        data_collator=collator,
    )
    metrics = trainer.train().metrics
    samples_per_s = metrics["train_samples_per_second"]
    return {
        "arm": "trainer",
        "round": k,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * mean_tokens,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_quick(args, QUICK, "llm_throughput")
    exit_on_sigterm()
    quiet_libraries(args.verbose)
    from tether.config import validate_job
    from tether.run import prepare_run_data

    if args.op_only:
        import json

        result = json.loads(args.out.read_text())
        result["anchor_ops"] = anchor_op_times(args, result)
        write_json(args.out, result)
        for line in result["anchor_ops"]["lines"]:
            print(line)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="tether-llmtp-"))
    result: dict[str, Any] = {
        "machine": machine_info(threads=args.threads),
        "settings": vars(args) | {"out": str(args.out)},
        "runs": [],
    }
    try:
        _, data = prepare_run_data(validate_job(job(args, workdir, 0.0, "prep")))
        mean_tokens = float(data.train.lengths.mean())
        result["mean_tokens_per_chat"] = mean_tokens
        print(f"{len(data.train)} chats, {mean_tokens:.1f} tokens each on average")
        for k in range(args.rounds):
            order = ARMS[k % len(ARMS) :] + ARMS[: k % len(ARMS)]  # each arm first, middle, last
            for arm in order:
                t0 = time.perf_counter()
                run = (
                    run_trainer(args, workdir, k, data, mean_tokens)
                    if arm == "trainer"
                    else run_tether(args, workdir, arm, k, mean_tokens)
                )
                run["wall_s"] = time.perf_counter() - t0
                run["load_avg_1m"] = os.getloadavg()[0]
                result["runs"].append(run)
                print(
                    f"round {k} {arm:<15} {run['tokens_per_s']:8.1f} tokens/s ({run['wall_s']:.0f} s)"
                )
                write_json(args.out, result)
        result["summary"] = summarise(result["runs"])
        result["anchor_ops"] = anchor_op_times(args, result)
        result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
        write_json(args.out, result)
        for line in result["summary"]["lines"]:
            print(line)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def anchor_op_times(args, result: dict[str, Any]) -> dict[str, Any]:
    """The anchor's own cost, timed alone on SmolLM2's 134.5M parameters (as the loop anchors
    them), as a share of the λ = 0 step: end-to-end rounds drift by more than the op costs.

    coupled: add_anchor_grad_ (grad += 2λ(θ − θ*)); decoupled: pull_toward_anchor_ (the
    compensated pull). Medians over --op-calls calls after two unmeasured ones.
    """
    import torch

    from tether.anchor import (
        add_anchor_grad_,
        anchored_parameters,
        build_anchor,
        pull_toward_anchor_,
    )
    from tether.models import resolve_model_source
    from tether.tasks.causal_lm import CausalLM

    torch.set_num_threads(args.threads)
    loaded = CausalLM().load_model(
        resolve_model_source("packaged:SmolLM2-135M-Instruct"), None, False
    )
    named = anchored_parameters(loaded.model, loaded.new_param_names)
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    lam0 = [r for r in result["runs"] if r["arm"] == "tether-lambda0"]
    step_s = statistics.median(args.batch_size / r["samples_per_s"] for r in lam0)
    out: dict[str, Any] = {"step_s_lambda0": step_s, "lines": []}
    for mode in ("coupled", "decoupled"):
        anchor = build_anchor(named, args.lam, mode)
        times = []
        for _ in range(args.op_calls + 2):
            t0 = time.perf_counter()
            if mode == "coupled":
                add_anchor_grad_(anchor)
            else:
                pull_toward_anchor_(anchor, 5e-5)
            times.append(time.perf_counter() - t0)
        op_s = statistics.median(times[2:])
        out[mode] = {"op_s": op_s, "share_of_step": op_s / step_s, "times_s": times}
        target = 0.03 if mode == "coupled" else 0.02
        verdict = "PASS" if op_s / step_s <= target else "FAIL"
        out["lines"].append(
            f"{mode} anchor op {op_s * 1000:.0f} ms = {100 * op_s / step_s:.1f}% of the λ=0 step "
            f"({step_s:.2f} s, {args.batch_size} chats) (target <= {100 * target:.0f}%: {verdict})"
        )
        del anchor
    out["load_avg_1m"] = os.getloadavg()[0]
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    median = {
        a: statistics.median([r["tokens_per_s"] for r in runs if r["arm"] == a]) for a in ARMS
    }
    ratio = median["tether-lambda0"] / median["trainer"]
    overhead = 1.0 - median["tether-coupled"] / median["tether-lambda0"]
    return {
        "median_tokens_per_s": median,
        "lambda0_vs_trainer": ratio,
        "coupled_overhead": overhead,
        "lines": [
            f"tether λ=0 {median['tether-lambda0']:.1f} vs Trainer {median['trainer']:.1f} tokens/s: {ratio:.2f}x (target >= 1.0: {'PASS' if ratio >= 1.0 else 'FAIL'})",
            f"coupled anchor overhead {100 * overhead:.1f}% of the step (target <= 3%: {'PASS' if overhead <= 0.03 else 'FAIL'})",
        ],
    }


if __name__ == "__main__":
    raise SystemExit(main())
