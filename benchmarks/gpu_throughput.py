"""GPU training throughput: MiniLM and a BERT-base-sized model, fp32 vs bf16, λ=0 vs anchored.

    .venv/bin/python benchmarks/gpu_throughput.py              # needs CUDA; ≈ 3 min on one GPU
    .venv/bin/python benchmarks/gpu_throughput.py --quick      # fewer steps
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --quick --models minilm
                                                               # checks the script, measures nothing

Without a CUDA device it prints why and exits 0 having written nothing, so `make bench` and a
machine without an accelerator skip it cleanly (docs/benchmarks.md then says "not measured").

One process, one device (1 worker). For each model × precision × mode it builds the model on
the device, tether's anchor (``tether.anchor``) and the loop's fused AdamW param groups
(``tether.train.setup.param_groups``), and times optimizer steps in the loop's order:

    autocast forward → backward → add_anchor_grad_ → clip → step → pull_toward_anchor_ → zero

on fixed random-token batches (batch × seq tokens, full attention mask), with
``torch.cuda.synchronize`` around the timed window. Models: the packaged all-MiniLM-L6-v2
(22.7M) and a BERT-base-sized config (hidden 768, 12 layers, 110M; random init: throughput
does not depend on the weights). Precision: fp32, and bf16 autocast as the loop runs it
(``train.precision: bf16-mixed``, weights and optimizer state stay fp32). Modes: λ=0,
coupled and decoupled anchoring. Reports samples/s, ms/step, anchor overhead and peak memory.
Writes benchmarks/results/gpu_throughput.json (--quick: gpu_throughput_quick.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from _common import apply_quick, machine_info, write_json  # noqa: E402
from anchor_overhead import make_runner  # noqa: E402
from tether.anchor import (  # noqa: E402
    add_anchor_grad_,
    pull_toward_anchor_,
)
from tether.models import label_kwargs, load_pretrained, resolve_model_source  # noqa: E402

MODES = ("lambda0", "coupled", "decoupled")
PRECISIONS = ("fp32", "bf16")
MODELS = ("minilm", "bert-base")
QUICK = {"warmup": 3, "steps": 10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {MODELS}")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"subset of {PRECISIONS}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    p.add_argument("--lam", type=float, default=0.01, help="λ of the anchored modes")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default results/gpu_throughput.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    if args.device != "cuda" and args.out is None:  # a script check is not a result
        args.out = Path(tempfile.gettempdir()) / "gpu_throughput_script_check.json"
    apply_quick(args, QUICK, "gpu_throughput")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    bad = [m for m in args.models if m not in MODELS]
    bad += [x for x in args.precisions if x not in PRECISIONS]
    if bad or args.steps < 1 or args.warmup < 0:
        p.error(f"unknown {bad}; need --steps >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- models and data


def build_model(name: str, seed: int) -> tuple[torch.nn.Module, set[str]]:
    """The classifier and the names of its new (unanchored) parameters, seeded."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    if name == "minilm":
        source = resolve_model_source("packaged:all-MiniLM-L6-v2")
        loaded = load_pretrained(
            source, AutoModelForSequenceClassification, **label_kwargs(["n", "p"])
        )
        return loaded.model, loaded.new_param_names
    # BERT-base dimensions (BertConfig's defaults); every parameter counts as pretrained here,
    # except the head, as it would be for a real bert-base-uncased checkpoint
    model = AutoModelForSequenceClassification.from_config(BertConfig(num_labels=2))
    return model, {n for n, _ in model.named_parameters() if n.startswith("classifier.")}


def random_batches(
    vocab: int, batch: int, seq: int, k: int, device: torch.device, seed: int
) -> list[dict[str, torch.Tensor]]:
    """k fixed batches of random token ids: every step does the same work."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g).to(device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long).to(device),
            "labels": torch.randint(0, 2, (batch,), generator=g).to(device),
        }
        for _ in range(k)
    ]


# --------------------------------------------------------------------------- one configuration


def measure(
    name: str, precision: str, mode: str, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Build model, anchor and optimizer on the device; time ``args.steps`` steps."""
    model, new_names = build_model(name, args.seed)
    model.to(device).train()
    # anchor and fused AdamW exactly as the loop builds them (the step benchmark's runner)
    r = make_runner(mode, model, new_names, args.lam, args.lr)
    batches = random_batches(
        model.config.vocab_size, args.batch_size, args.seq_len, 4, device, args.seed
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch: dict[str, torch.Tensor]) -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        add_anchor_grad_(r.anchor)  # coupled only
        torch.nn.utils.clip_grad_norm_(r.trainable, 1.0)
        r.optimizer.step()
        pull_toward_anchor_(r.anchor, args.lr)  # decoupled only
        r.optimizer.zero_grad(set_to_none=True)

    for k in range(args.warmup):
        step(batches[k % len(batches)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for k in range(args.steps):
        t0 = time.perf_counter()
        step(batches[k % len(batches)])
        sync(device)  # per step: the median needs per-step times, and the cost is a few µs
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    out = {
        "model": name,
        "precision": precision,
        "mode": mode,
        "params": sum(p.numel() for p in model.parameters()),
        "anchor_bytes": r.anchor.num_bytes if r.anchor is not None else 0,
        "step_ms_median": 1e3 * median,
        "samples_per_s": args.batch_size / median,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "step_s": times,
    }
    return out  # model, optimizer and anchor go with this frame


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overheads(rows: list[dict[str, Any]]) -> None:
    """Each anchored row's step-time overhead over its λ=0 row (same model and precision)."""
    base = {(r["model"], r["precision"]): r for r in rows if r["mode"] == "lambda0"}
    for r in rows:
        b = base.get((r["model"], r["precision"]))
        r["overhead_pct"] = (
            100 * (r["step_ms_median"] / b["step_ms_median"] - 1) if b and r is not b else None
        )


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'model':<10} {'precision':<9} {'mode':<10} {'samples/s':>10} {'ms/step':>8} {'overhead':>9} {'peak GiB':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        over = "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%"
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        print(
            f"{r['model']:<10} {r['precision']:<9} {r['mode']:<10} {r['samples_per_s']:>10.1f}"
            f" {r['step_ms_median']:>8.1f} {over:>9} {peak:>9}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device here; skipped (nothing written)")
        return 0
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 would blur the pair
    info = machine_info(device=args.device)
    if device.type == "cuda":
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory,
        }
    else:
        print("--device cpu: checks the script only; the numbers are not a GPU measurement")
    started = time.time()
    rows = []
    for name in args.models:
        for precision in args.precisions:
            for mode in MODES:
                rows.append(measure(name, precision, mode, args, device))
                if device.type == "cuda":  # the last configuration's blocks, back to the pool
                    torch.cuda.empty_cache()
                r = rows[-1]
                print(
                    f"{name} {precision} {mode}: {r['samples_per_s']:.1f} samples/s",
                    flush=True,
                )
    overheads(rows)
    print_table(rows)
    info["load_avg_1m_end"] = os.getloadavg()[0]
    settings = {k: str(v) if k == "out" else v for k, v in vars(args).items()}
    result = {
        "benchmark": "gpu_throughput",
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": info,
        "settings": settings,
        "results": rows,
        "wall_s": time.time() - started,
    }
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
