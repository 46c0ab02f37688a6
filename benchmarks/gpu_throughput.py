"""GPU training throughput: MiniLM and a BERT-base-sized model, fp32 vs bf16, λ=0 vs anchored;
and SmolLM2-135M full fine-tuning, DDP vs FSDP on one GPU.

    .venv/bin/python benchmarks/gpu_throughput.py              # needs CUDA; ≈ 4 min on one GPU
    .venv/bin/python benchmarks/gpu_throughput.py --quick      # fewer steps
    .venv/bin/python benchmarks/gpu_throughput.py --models smollm2      # the causal-LM part only
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --quick --models minilm
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --quick --models smollm2 --tiny-llm
                                                               # check the script, measure nothing

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

The causal-LM part (``--models smollm2``) fine-tunes all of the packaged SmolLM2-135M-Instruct
(Llama, tied embeddings) with a causal-LM loss on fixed random tokens (8 × 512, labels = the
inputs), under both of tether's strategies at world 1 (``tether.train.strategy``): ``ddp`` is
the plain model (one worker wraps nothing), ``fsdp`` is ``FullySharded.shard`` (fully_shard per
decoder layer, then the root, over a one-process group). bf16 as ``bf16-mixed`` runs it: fp32
weights under autocast, plus FSDP's MixedPrecisionPolicy. Same three modes, the anchor on every
parameter, and the loop's own step (``scale_gradients_``, ``anchored_clipped_gradient_`` with the
strategy's clip). Reports tokens/s, ms/step, overhead over λ=0 of the same strategy, peak memory
and the anchor's bytes. On CPU it runs in fp32; ``--tiny-llm`` swaps in a 2-layer random Llama.

Writes benchmarks/results/gpu_throughput.json (--quick: gpu_throughput_quick.json): encoder
rows under "results", causal-LM rows under "causal_lm". A CPU or --tiny-llm run writes to the
temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _common import apply_quick, machine_info, write_json  # noqa: E402
from anchor_overhead import make_runner  # noqa: E402
from tether.anchor import (  # noqa: E402
    add_anchor_grad_,
    pull_toward_anchor_,
)
from tether.models import label_kwargs, load_pretrained, resolve_model_source  # noqa: E402
from tether.train.loop import anchored_clipped_gradient_, scale_gradients_  # noqa: E402
from tether.train.strategy import STRATEGIES, make_strategy  # noqa: E402

MODES = ("lambda0", "coupled", "decoupled")
PRECISIONS = ("fp32", "bf16")
ENCODERS = ("minilm", "bert-base")
MODELS = (*ENCODERS, "smollm2")
SMOLLM2 = "packaged:SmolLM2-135M-Instruct"
LLM_BATCH = {"full": (8, 512), "tiny": (2, 64)}  # (sequences, tokens each) per step
QUICK = {"warmup": 3, "steps": 10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {MODELS}")
    p.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help=f"subset of {PRECISIONS} (encoders; the causal LM runs bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="encoder examples per step")
    p.add_argument("--seq-len", type=int, default=128, help="encoder tokens per example")
    p.add_argument("--llm-batch-size", type=int, help="causal-LM sequences per step (default 8)")
    p.add_argument("--llm-seq-len", type=int, help="causal-LM tokens per sequence (default 512)")
    p.add_argument(
        "--tiny-llm",
        action="store_true",
        help="causal LM: a 2-layer random Llama at 2×64 tokens instead of SmolLM2 (script check)",
    )
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    p.add_argument("--lam", type=float, default=0.01, help="λ of the anchored modes")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default results/gpu_throughput.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    if (args.device != "cuda" or args.tiny_llm) and args.out is None:  # a check, not a result
        args.out = Path(tempfile.gettempdir()) / "gpu_throughput_script_check.json"
    apply_quick(args, QUICK, "gpu_throughput")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    batch, seq = LLM_BATCH["tiny" if args.tiny_llm else "full"]
    args.llm_batch_size = args.llm_batch_size or batch
    args.llm_seq_len = args.llm_seq_len or seq
    bad = [m for m in args.models if m not in MODELS]
    bad += [x for x in args.precisions if x not in PRECISIONS]
    if bad or args.steps < 1 or args.warmup < 0 or args.llm_seq_len < 2:
        p.error(f"unknown {bad}; need --steps >= 1, --warmup >= 0, --llm-seq-len >= 2")
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

    times = time_steps(step, batches, args.warmup, args.steps, device)
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


def time_steps(
    step: Callable[[dict[str, torch.Tensor]], None],
    batches: list[dict[str, torch.Tensor]],
    warmup: int,
    steps: int,
    device: torch.device,
) -> list[float]:
    """Seconds of each of ``steps`` steps after ``warmup`` untimed ones; the peak-memory
    counter restarts after the warm-up, so it holds the timed steps' peak."""
    for k in range(warmup):
        step(batches[k % len(batches)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        step(batches[k % len(batches)])
        sync(device)  # per step: the median needs per-step times, and the cost is a few µs
        times.append(time.perf_counter() - t0)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overheads(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Each anchored row's step-time overhead over the λ=0 row with the same ``keys``."""
    base = {tuple(r[k] for k in keys): r for r in rows if r["mode"] == "lambda0"}
    for r in rows:
        b = base.get(tuple(r[k] for k in keys))
        r["overhead_pct"] = (
            100 * (r["step_ms_median"] / b["step_ms_median"] - 1) if b and r is not b else None
        )


def overhead_and_peak(r: dict[str, Any]) -> tuple[str, str]:
    """A row's overhead % and peak GiB as table cells ("-" when not measured)."""
    over = "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%"
    peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
    return over, peak


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'model':<10} {'precision':<9} {'mode':<10} {'samples/s':>10} {'ms/step':>8} {'overhead':>9} {'peak GiB':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        over, peak = overhead_and_peak(r)
        print(
            f"{r['model']:<10} {r['precision']:<9} {r['mode']:<10} {r['samples_per_s']:>10.1f}"
            f" {r['step_ms_median']:>8.1f} {over:>9} {peak:>9}"
        )


# --------------------------------------------------------------------------- causal LM: DDP vs FSDP


def build_causal_lm(tiny: bool, seed: int) -> torch.nn.Module:
    """SmolLM2-135M-Instruct in fp32 (Llama, 30 layers, tied embeddings), or for a script
    check a tiny random Llama with its vocabulary (hidden 64, 2 layers), seeded."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar would bury the table in logs
    torch.manual_seed(seed)
    if not tiny:
        return AutoModelForCausalLM.from_pretrained(
            resolve_model_source(SMOLLM2), dtype=torch.float32
        )
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config)


def token_batches(
    vocab: int, batch: int, seq: int, k: int, device: torch.device, seed: int
) -> list[dict[str, torch.Tensor]]:
    """k fixed (batch, seq) batches of random token ids, each its own causal-LM target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})  # no padding: no attention mask
    return out


def measure_causal_lm(
    strategy_name: str, mode: str, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """A fresh model under the strategy (fully_shard changes it in place), its anchor and
    fused AdamW; time ``args.steps`` of the loop's optimizer steps."""
    precision = "bf16-mixed" if device.type == "cuda" else "fp32"  # CPU: a script check
    strategy = make_strategy(strategy_name, 0, 1, device, precision)
    memory_at_start = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    model = build_causal_lm(args.tiny_llm, args.seed).to(device).train()
    model = strategy.shard(model)  # fsdp: θ becomes DTensors (one shard at world 1); ddp: as is
    # no new head: every parameter is pretrained, so the anchor covers all of θ; built after
    # sharding, as the loop does, so θ* is kept per shard
    r = make_runner(mode, model, set(), args.lam, args.lr)
    batch, seq = args.llm_batch_size, args.llm_seq_len
    batches = token_batches(model.config.vocab_size, batch, seq, 4, device, args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32")
    units = batch * (seq - 1)  # target tokens per step: the loss's labelled units

    def step(b: dict[str, torch.Tensor]) -> None:
        with autocast:
            fine_loss_sum = model(**b).loss * units  # the loop backpropagates the sum ...
        fine_loss_sum.backward()
        scale_gradients_(r.trainable, strategy.world / units)  # ... and scales it to the mean
        anchored_clipped_gradient_(r.trainable, r.anchor, 1.0, "total", strategy)
        r.optimizer.step()
        pull_toward_anchor_(r.anchor, args.lr)  # decoupled only
        r.optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, batches, args.warmup, args.steps, device)
    median = statistics.median(times)
    return {
        "model": "tiny-llama (random)" if args.tiny_llm else "SmolLM2-135M-Instruct",
        "strategy": strategy_name,
        "world_size": strategy.world,
        "precision": "bf16" if precision == "bf16-mixed" else "fp32",
        "mode": mode,
        "params": sum(p.numel() for p in model.parameters()),  # tied embeddings counted once
        "batch_size": batch,
        "seq_len": seq,
        "anchor_bytes": r.anchor.num_bytes if r.anchor is not None else 0,
        "step_ms_median": 1e3 * median,
        "tokens_per_s": batch * seq / median,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "memory_at_start_bytes": memory_at_start,  # ≈ 0 unless an earlier row leaked
        "step_s": times,
    }


def measure_causal_lms(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Every strategy × mode, each on a fresh model, in one single-process group."""
    rows = []
    with single_process_group(device):
        for strategy_name in STRATEGIES:
            for mode in MODES:
                rows.append(measure_causal_lm(strategy_name, mode, args, device))
                free_device_memory(device)
                r = rows[-1]
                print(
                    f"{r['model']} {strategy_name} {mode}: {r['tokens_per_s']:.0f} tokens/s",
                    flush=True,
                )
    overheads(rows, ("model", "strategy"))
    return rows


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A torch.distributed group of one process (NCCL on GPU, gloo on CPU): FSDP's device
    mesh needs one even at world 1. Destroyed on the way out, errors included."""
    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # NCCL and FSDP's mesh use the current device
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_device_memory(device: torch.device) -> None:
    """Back to the pool: the last row's model, optimizer and anchor. FSDP's hooks hold
    reference cycles, so the frame's exit alone does not free them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_causal_lm_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'strategy':<8} {'precision':<9} {'mode':<10} {'tokens/s':>10} {'ms/step':>8}"
        f" {'overhead':>9} {'peak GiB':>9} {'anchor MiB':>10}"
    )
    print(f"{rows[0]['model']}, {rows[0]['batch_size']}×{rows[0]['seq_len']} tokens per step")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        over, peak = overhead_and_peak(r)
        print(
            f"{r['strategy']:<8} {r['precision']:<9} {r['mode']:<10} {r['tokens_per_s']:>10.0f}"
            f" {r['step_ms_median']:>8.1f} {over:>9} {peak:>9} {r['anchor_bytes'] / 2**20:>10.1f}"
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
    for name in [m for m in args.models if m in ENCODERS]:
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
    if rows:
        overheads(rows, ("model", "precision"))
        print_table(rows)
    causal_lm = []
    if "smollm2" in args.models:
        causal_started = time.time()
        causal_lm = measure_causal_lms(args, device)
        print_causal_lm_table(causal_lm)
        print(f"causal-LM part: {time.time() - causal_started:.0f} s")
    info["load_avg_1m_end"] = os.getloadavg()[0]
    settings = {k: str(v) if k == "out" else v for k, v in vars(args).items()}
    result = {
        "benchmark": "gpu_throughput",
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": info,
        "settings": settings,
        "results": rows,
        "causal_lm": causal_lm,
        "wall_s": time.time() - started,
    }
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
