"""What does the L2-SP anchor cost per optimizer step? λ=0 vs coupled vs decoupled on MiniLM.

    .venv/bin/python benchmarks/anchor_overhead.py            # defaults: 32×64 tokens, 30 steps
    .venv/bin/python benchmarks/anchor_overhead.py --quick    # smoke run: 8×32 tokens, 5 steps

Three copies of the packaged all-MiniLM-L6-v2 (same weights, same head init), each with its own
AdamW built from ``tether.train.setup.param_groups``, run the loop's step on the same batches:

    forward + backward → add_anchor_grad_ → clip → optimizer.step → pull_toward_anchor_ → zero_grad

Rounds are interleaved (one step of each mode per round, rotating the order), so load from
other processes on the machine hits all modes alike; each mode's step time is the median over
the measured rounds. Because the anchor is a few percent of a noisy step, the anchor ops are
also timed on their own, inside the step and in isolation, and reported as a share of the λ=0
step. Targets: coupled ≤ 3 %, decoupled ≤ 2 % over λ=0.

Writes a JSON with machine info, settings, medians and every raw step time
(default benchmarks/results/anchor_overhead.json; --quick writes anchor_overhead_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from _common import RESULTS, apply_quick, machine_info, write_json
from tether.anchor import (
    Anchor,
    add_anchor_grad_,
    anchored_parameters,
    build_anchor,
    pull_toward_anchor_,
)
from tether.models import label_kwargs, load_pretrained, load_tokenizer, resolve_model_source
from tether.synthetic import sentiment_examples
from tether.train.setup import param_groups

MODEL = "packaged:all-MiniLM-L6-v2"
MODES = ("lambda0", "coupled", "decoupled")
TARGET_OVERHEAD_PCT = {"coupled": 3.0, "decoupled": 2.0}
QUICK = {"batch_size": 8, "seq_len": 32, "warmup": 3, "steps": 5, "op_calls": 10}


# --------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example (no padding)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured rounds (one step per mode)")
    p.add_argument("--steps", type=int, default=30, help="measured rounds (one step per mode)")
    p.add_argument("--op-calls", type=int, default=30, help="isolated calls per anchor op")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lam", type=float, default=0.01, help="λ for the anchored modes")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW lr (also scales the pull)")
    p.add_argument("--num-batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, help=f"JSON results path (default {RESULTS.name}/anchor_overhead.json)"
    )
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    apply_quick(args, QUICK, "anchor_overhead")
    if args.steps < 1 or args.warmup < 0 or args.op_calls < 1:
        p.error("need --steps >= 1, --warmup >= 0, --op-calls >= 1")
    return args


# --------------------------------------------------------------------------- model and data


@dataclass
class Runner:
    """One model + optimizer + anchor: the state a training run holds for one mode."""

    mode: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    anchor: Anchor | None
    trainable: list[torch.nn.Parameter]
    step_s: list[float] = field(default_factory=list)
    anchor_op_s: list[float] = field(default_factory=list)


def load_model(seed: int) -> tuple[torch.nn.Module, set[str]]:
    """MiniLM with a fresh 2-label head, seeded so every copy starts identical."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar would bury the table in logs
    torch.manual_seed(seed)
    loaded = load_pretrained(
        resolve_model_source(MODEL), AutoModelForSequenceClassification, **label_kwargs(["n", "p"])
    )
    return loaded.model, loaded.new_param_names


def make_runner(
    mode: str, model: torch.nn.Module, new_names: set[str], lam: float, lr: float
) -> Runner:
    """Anchor and AdamW exactly as tether.train.setup builds them (the spec's defaults)."""
    anchored = anchored_parameters(model, new_names)
    lam_mode = 0.0 if mode == "lambda0" else lam
    anchor = build_anchor(anchored, lam_mode, "decoupled" if mode == "decoupled" else "coupled")
    # like the loop: pretrained weights never decay toward zero by default, at any λ, so the
    # arms differ only in the anchor's own work
    groups = param_groups(model, {n for n, _ in anchored}, lr, 0.01, 1.0, decay_anchored=False)
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)  # as the loop builds it
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Runner(mode, model, optimizer, anchor, trainable)


def make_batches(
    batch_size: int, seq_len: int, num_batches: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Real tokenized synthetic sentences, packed so every row fills ``seq_len`` tokens.

    Synthetic sentences are ~15 tokens; joining several per row makes each batch a fixed
    (B, T) with a full attention mask, so every step does identical work.
    """
    tokenizer = load_tokenizer(resolve_model_source(MODEL))
    per_row = max(1, seq_len // 4)  # ≥ 4 tokens per sentence, so rows always overflow
    n_rows = batch_size * num_batches
    examples = sentiment_examples("train", n_rows * per_row, seed=seed)
    texts = [
        " ".join(e["text"] for e in examples[i * per_row : (i + 1) * per_row])
        for i in range(n_rows)
    ]
    enc = tokenizer(
        texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
    )
    labels = torch.tensor([examples[i * per_row]["label"] for i in range(n_rows)])
    return [
        {
            "input_ids": enc["input_ids"][b * batch_size : (b + 1) * batch_size],
            "attention_mask": enc["attention_mask"][b * batch_size : (b + 1) * batch_size],
            "labels": labels[b * batch_size : (b + 1) * batch_size],
        }
        for b in range(num_batches)
    ]


# --------------------------------------------------------------------------- the step


def train_step(r: Runner, batch: dict[str, torch.Tensor], max_grad_norm: float = 1.0) -> float:
    """One optimizer step, ordered as in tether.train.loop; returns the anchor ops' seconds."""
    r.model.train()
    fine_loss = r.model(**batch).loss
    fine_loss.backward()
    fine_loss.item()  # the loop logs it every micro-batch
    t0 = time.perf_counter()
    add_anchor_grad_(r.anchor)  # no-op unless coupled
    anchor_s = time.perf_counter() - t0
    torch.nn.utils.clip_grad_norm_(r.trainable, max_grad_norm)
    group = r.optimizer.param_groups[0]
    lr_t = group["lr"] / group["lr_scale"]
    r.optimizer.step()
    t0 = time.perf_counter()
    pull_toward_anchor_(r.anchor, lr_t)  # no-op unless decoupled
    anchor_s += time.perf_counter() - t0
    r.optimizer.zero_grad(set_to_none=True)
    return anchor_s


def run_interleaved(
    runners: list[Runner], batches: list[dict[str, torch.Tensor]], warmup: int, steps: int
) -> None:
    """Round k runs one step per mode, starting at mode k mod 3, all on batch k mod B.

    Rotating the order puts each mode first, middle and last equally often, so anything that
    drifts within a round (caches, clocks, the scheduler) and slow spells from other
    processes land on all modes alike.
    """
    for k in range(warmup + steps):
        batch = batches[k % len(batches)]
        shift = k % len(runners)
        for r in runners[shift:] + runners[:shift]:
            t0 = time.perf_counter()
            anchor_s = train_step(r, batch)
            step_s = time.perf_counter() - t0
            if k >= warmup:
                r.step_s.append(step_s)
                r.anchor_op_s.append(anchor_s)
        if sys.stdout.isatty():  # a live counter for people; logs get only the summary
            print(f"  round {k + 1}/{warmup + steps}" + (" (warm-up)" * (k < warmup)), end="\r")
    if sys.stdout.isatty():
        print()


# --------------------------------------------------------------------------- anchor ops alone


def time_anchor_op(
    anchor: Anchor, params: list[torch.nn.Parameter], lr: float, calls: int
) -> list[float]:
    """Seconds per call of the anchor's own op, repeated back to back (warm caches)."""
    if anchor.mode == "coupled":
        for p in params:  # the op adds into existing gradients, as after a backward
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        op = lambda: add_anchor_grad_(anchor)  # noqa: E731
    else:
        op = lambda: pull_toward_anchor_(anchor, lr)  # noqa: E731
    op()  # first call allocates
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return times


def isolated_op_times(
    model: torch.nn.Module, new_names: set[str], lam: float, lr: float, calls: int
) -> dict[str, dict[str, Any]]:
    """Per-call medians for coupled/decoupled × fp32/bf16 θ*, plus θ* memory per dtype.

    Uses a scratch copy of the model: the ops change its grads and weights.
    """
    scratch = copy.deepcopy(model)
    anchored = anchored_parameters(scratch, new_names)
    out: dict[str, dict[str, Any]] = {}
    for dtype in ("float32", "bfloat16"):
        for mode in ("coupled", "decoupled"):
            anchor = build_anchor(anchored, lam, mode, dtype)
            times = time_anchor_op(anchor, [p for _, p in anchored], lr, calls)
            out[f"{mode}/{dtype}"] = {
                "median_ms": 1e3 * statistics.median(times),
                "anchor_bytes": anchor.num_bytes,
                "raw_s": times,
            }
            del anchor
    return out


# --------------------------------------------------------------------------- report


def pct(x: float, base: float) -> float:
    return 100.0 * x / base


def bootstrap_ci95(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of the median by resampling rounds: how far noise can move the estimate."""
    if len(values) < 2:
        return [values[0], values[0]]
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def overhead_entry(r: Runner, base: Runner, isolated_ms: float) -> dict[str, Any]:
    """An anchored mode against λ=0: full-step overhead three ways, and the anchor op alone."""
    target = TARGET_OVERHEAD_PCT[r.mode]
    base_s = statistics.median(base.step_s)
    # same round, same batch: the per-round ratio cancels slow spells that hit both steps
    paired_pct = [100.0 * (m / b - 1) for m, b in zip(r.step_s, base.step_s, strict=True)]
    op_ms = 1e3 * statistics.median(r.anchor_op_s)
    overhead = pct(statistics.median(r.step_s) - base_s, base_s)
    ci = bootstrap_ci95(paired_pct)
    return {
        "target_pct": target,
        "overhead_pct": overhead,
        "overhead_paired_pct": statistics.median(paired_pct),
        "overhead_paired_ci95_pct": ci,
        "anchor_op_in_step_median_ms": op_ms,
        "anchor_op_in_step_pct": pct(op_ms / 1e3, base_s),
        "anchor_op_isolated_median_ms": isolated_ms,
        "anchor_op_isolated_pct": pct(isolated_ms / 1e3, base_s),
        "anchor_bytes": r.anchor.num_bytes if r.anchor else 0,
        "pass_full_step": overhead <= target,
        "full_step_conclusive": not ci[0] <= target <= ci[1],
        "pass_anchor_op": pct(op_ms / 1e3, base_s) <= target,
    }


def summarize(runners: list[Runner], isolated: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-mode step medians and spread; for anchored modes, the overhead over λ=0."""
    modes: dict[str, Any] = {}
    for r in runners:
        median_s = statistics.median(r.step_s)
        q1, _, q3 = statistics.quantiles(r.step_s, n=4) if len(r.step_s) > 1 else (0, 0, 0)
        modes[r.mode] = {
            "step_median_s": median_s,
            "step_iqr_pct": pct(q3 - q1, median_s),  # noise floor for the overhead numbers
            "step_s": r.step_s,
            "anchor_op_in_step_s": r.anchor_op_s,
        }
        if r.mode != "lambda0":
            isolated_ms = isolated[f"{r.mode}/float32"]["median_ms"]
            modes[r.mode] |= overhead_entry(r, runners[0], isolated_ms)
    return modes


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(modes: dict[str, Any], isolated: dict[str, dict[str, Any]], steps: int) -> None:
    print(f"\nstep time, median of {steps} interleaved steps per mode")
    head = (
        f"{'mode':<10} {'median ms':>10} {'IQR %':>6} {'overhead %':>11} {'paired %':>9}"
        f" {'paired 95% CI':>17} {'target':>7}  full step"
    )
    print(head)
    print("-" * len(head))
    for mode, m in modes.items():
        row = f"{mode:<10} {1e3 * m['step_median_s']:>10.1f} {m['step_iqr_pct']:>6.1f}"
        if mode != "lambda0":
            lo, hi = m["overhead_paired_ci95_pct"]
            row += f" {m['overhead_pct']:>+11.2f} {m['overhead_paired_pct']:>+9.2f}"
            row += f" {f'[{lo:+.1f}, {hi:+.1f}]':>17} {'≤' + str(m['target_pct']):>7}"
            row += f"  {verdict(m['pass_full_step'])}"
            row += "" if m["full_step_conclusive"] else " (CI spans target: noise)"
        print(row)

    print("\nanchor op alone, as % of the λ=0 step median")
    head = f"{'mode':<10} {'in-step ms':>10} {'%':>6} {'isolated ms':>12} {'%':>6} {'target':>7}  anchor op"
    print(head)
    print("-" * len(head))
    for mode, m in modes.items():
        if mode == "lambda0":
            continue
        print(
            f"{mode:<10} {m['anchor_op_in_step_median_ms']:>10.2f} {m['anchor_op_in_step_pct']:>6.2f}"
            f" {m['anchor_op_isolated_median_ms']:>12.2f} {m['anchor_op_isolated_pct']:>6.2f}"
            f" {'≤' + str(m['target_pct']):>7}  {verdict(m['pass_anchor_op'])}"
        )

    print("\nθ* memory and isolated op time by anchor dtype")
    for key, v in isolated.items():
        print(f"  {key:<20} {v['anchor_bytes']:>12,d} B  {v['median_ms']:>8.2f} ms/call")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # fixed: the thread count moves step time most
    started = time.time()
    info = machine_info(torch_threads=args.threads)  # load average before we add our own

    print(f"loading {MODEL} ×3, batches {args.batch_size}×{args.seq_len}, {args.threads} threads")
    model, new_names = load_model(args.seed)
    copies = [model, copy.deepcopy(model), copy.deepcopy(model)]
    runners = [
        make_runner(mode, m, new_names, args.lam, args.lr)
        for mode, m in zip(MODES, copies, strict=True)
    ]
    batches = make_batches(args.batch_size, args.seq_len, args.num_batches, args.seed)

    print(f"interleaved: {args.warmup} warm-up + {args.steps} measured rounds × {len(MODES)} modes")
    run_interleaved(runners, batches, args.warmup, args.steps)
    print(f"anchor ops alone: {args.op_calls} calls each")
    isolated = isolated_op_times(model, new_names, args.lam, args.lr, args.op_calls)

    modes = summarize(runners, isolated)
    print_table(modes, isolated, args.steps)
    info["load_avg_1m_end"] = os.getloadavg()[0]
    result = {
        "benchmark": "anchor_overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"model": MODEL, "modes": list(MODES), "max_grad_norm": 1.0, "weight_decay": 0.01},
        "modes": modes,
        "anchor_ops_isolated": isolated,
        "anchor_bytes": {k.split("/")[1]: v["anchor_bytes"] for k, v in isolated.items()},
        "peak_rss_bytes": peak_rss_bytes(),  # whole process: three models + optimizers + θ*
        "wall_s": time.time() - started,
    }
    write_json(args.out, result)
    print(f"\npeak RSS {peak_rss_bytes() / 2**20:,.0f} MiB; wall {result['wall_s']:.0f} s")
    print(f"wrote {args.out}")
    return 0  # verdicts are printed and recorded; a noisy machine should not fail a build


if __name__ == "__main__":
    sys.exit(main())
