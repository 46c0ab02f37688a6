"""LLM serving: tether's OpenAI-compatible endpoint (continuous batching) vs a naive server.

    .venv/bin/python benchmarks/serve_generation.py --quick    # smoke run (~3 min)
    .venv/bin/python benchmarks/serve_generation.py            # C = 1, 4, 16; 40 s per cell
    .venv/bin/python benchmarks/serve_generation.py --help     # --model-dir --max-tokens ...

Two servers, one at a time, on loopback, each given the whole machine:

    tether   `tether serve` on a causal-LM model folder: Ray Serve, continuous batching
    naive    uvicorn + FastAPI, one `model.generate` at a time (a lock), streamed with
             transformers' TextIteratorStreamer

The model is the packaged SmolLM2-135M-Instruct (or --model-dir), greedy, chat prompts
rendered with its own template by both servers. Load is closed-loop from a separate process
(this script with --client): C clients each send one streamed chat request (asking for
--max-tokens new tokens), read it to the end, send the next, for --duration-s after
--warmup-s. Reported per cell: output tokens/s (completion tokens of finished answers per
second), time to first token p50/p99, request latency p50/p99, errors. A bare in-process
`generate` of one token after the same prompts gives the first-token reference.
Writes benchmarks/results/serve_generation.json (--quick: serve_generation_quick.json).
The client shares the CPUs with the server: compare rows of one run, not machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import apply_quick, exit_on_sigterm, machine_info, write_json

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only
SERVERS = ("tether", "naive")
# also: "tether-fast", tether serve in Ray Serve's high-throughput mode (--throughput-optimized)
PROMPTS = [
    "What is the sentiment of this review? The soundtrack was lovely and the cast superb.",
    "Write two sentences about a rainy morning in a small town.",
    "Give three tips for staying organised at work.",
    "Explain in a few sentences why the sky looks blue.",
    "Describe your ideal weekend in a short paragraph.",
    "What are some good habits for learning a new language?",
    "Tell me a short story about a lost umbrella.",
    "Summarise the benefits of regular exercise.",
]
QUICK = {"concurrency": "1,4", "duration_s": 12.0, "warmup_s": 3.0, "max_tokens": 24}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, help="a causal-LM folder (default: packaged SmolLM2)")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--concurrency", default="1,4,16", help="client counts, comma-separated")
    p.add_argument("--duration-s", type=float, default=40.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens asked per request")
    p.add_argument("--max-batch-size", type=int, default=16, help="tether: sequences per step")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    # internal: the load generator and the naive server run as their own processes
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the model folder


def served_folder(model_dir: Path | None, workdir: Path) -> Path:
    """A folder tether serve accepts: the model's files (linked, not copied) plus a card."""
    sys.path.insert(0, str(REPO / "platform"))
    from tether.models import resolve_model_source

    source = Path(model_dir or resolve_model_source("packaged:SmolLM2-135M-Instruct"))
    out = workdir / "model"
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (out / f.name).symlink_to(f.resolve())
    if not (out / "tether.json").exists():
        card = {
            "name": "smollm2",
            "task": "causal-lm",
            "max_length": 2048,
            "generation": {"max_new_tokens": 256},
        }
        (out / "tether.json").write_text(json.dumps(card))
    return out


# --------------------------------------------------------------------------- the naive server


def run_naive_server(model_dir: Path, port: int, threads: int) -> None:
    """One request at a time through model.generate, streamed as OpenAI chat chunks."""
    import threading

    import torch
    import uvicorn
    from fastapi import Body, FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lock = asyncio.Lock()
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any] = Body(...)):  # noqa: B008 (FastAPI's idiom)
        text = tokenizer.apply_chat_template(
            body["messages"], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        await lock.acquire()
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        counted = {"tokens": 0}

        def work():
            with torch.inference_mode():
                out = model.generate(
                    **ids,
                    max_new_tokens=body["max_tokens"],
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id,
                )
            counted["tokens"] = out.shape[1] - ids["input_ids"].shape[1]

        thread = threading.Thread(target=work)
        thread.start()

        async def events():
            try:
                for piece in streamer:  # blocks per token: fine, one request at a time
                    if piece:
                        yield f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n"
                    await asyncio.sleep(0)
                thread.join()
                usage = {"completion_tokens": counted["tokens"]}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                lock.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


# --------------------------------------------------------------------------- the load generator


async def closed_loop(
    url: str, clients: int, warmup_s: float, duration_s: float, max_tokens: int
) -> dict[str, Any]:
    import httpx

    records: list[dict[str, float]] = []
    errors = 0
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def one_client(c: httpx.AsyncClient, k: int) -> None:
        nonlocal errors
        i = k
        while time.monotonic() < stop_at:
            prompt = PROMPTS[i % len(PROMPTS)]
            i += clients
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sent = time.monotonic()
            first = None
            tokens = 0
            try:
                async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(r.status_code)
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif (
                            chunk["choices"]
                            and chunk["choices"][0].get("delta", {}).get("content")
                            and first is None
                        ):
                            first = time.monotonic()
            except Exception:
                if sent >= measure_from:
                    errors += 1
                continue
            done = time.monotonic()
            if sent >= measure_from and done <= stop_at + 60:
                records.append(
                    {
                        "ttft_s": (first or done) - sent,
                        "latency_s": done - sent,
                        "tokens": tokens,
                        "done": done,
                    }
                )

    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*(one_client(c, k) for k in range(clients)))
    window = max(1e-9, max((r["done"] for r in records), default=stop_at) - measure_from)
    return {
        "clients": clients,
        "requests": len(records),
        "errors": errors,
        "output_tokens_per_s": sum(r["tokens"] for r in records) / window,
        "ttft_p50_s": percentile([r["ttft_s"] for r in records], 50),
        "ttft_p99_s": percentile([r["ttft_s"] for r in records], 99),
        "latency_p50_s": percentile([r["latency_s"] for r in records], 50),
        "latency_p99_s": percentile([r["latency_s"] for r in records], 99),
        "mean_completion_tokens": statistics.mean([r["tokens"] for r in records])
        if records
        else None,
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def run_cell(url: str, clients: int, args) -> dict[str, Any]:
    """The load generator in its own process (so it does not share the server's GIL)."""
    argv = [sys.executable, __file__, "--client", "--url", url, "--clients", str(clients)]
    argv += [
        "--warmup-s",
        str(args.warmup_s),
        "--duration-s",
        str(args.duration_s),
        "--max-tokens",
        str(args.max_tokens),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("server did not become healthy")


def start_server(name: str, model_dir: Path, args, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TETHER_API_KEY")}
    log = (workdir / f"{name}.log").open("w")
    if name.startswith("tether"):
        argv = [
            str(REPO / ".venv" / "bin" / "tether"),
            "serve",
            "--model-dir",
            str(model_dir),
            "--port",
            str(port),
        ]
        argv += [
            "--address",
            "local",
            "--num-cpus",
            str(args.threads),
            "--max-batch-size",
            str(args.max_batch_size),
        ]
        argv += ["--max-new-tokens", str(max(args.max_tokens, 64)), "--max-waiting", "64"]
        argv += ["--throughput-optimized"] if name == "tether-fast" else []
    else:
        argv = [
            sys.executable,
            __file__,
            "--naive-server",
            "--model-dir",
            str(model_dir),
            "--port",
            str(port),
            "--threads",
            str(args.threads),
        ]
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
    )
    url = f"http://{HOST}:{port}"
    wait_healthy(url, proc)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def bare_first_token_s(model_dir: Path, threads: int) -> float:
    """Median time of a bare in-process generate of one token (prefill + first token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    times = []
    for prompt in PROMPTS * 2:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        times.append(time.perf_counter() - t0)
    return statistics.median(times[len(PROMPTS) :])  # the second pass: warm


# --------------------------------------------------------------------------- main


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'server':<8} {'C':>3} {'tok/s':>7} {'ttft p50':>9} {'ttft p99':>9} {'lat p50':>8} {'lat p99':>8} {'req':>4} {'err':>4}"
    print(head)
    print("-" * len(head))
    for r in rows:

        def s(x):
            return f"{x:.2f}" if isinstance(x, float) else "-"

        print(
            f"{r['server']:<8} {r['clients']:>3} {r['output_tokens_per_s']:>7.1f} {s(r['ttft_p50_s']):>9} "
            f"{s(r['ttft_p99_s']):>9} {s(r['latency_p50_s']):>8} {s(r['latency_p99_s']):>8} {r['requests']:>4} {r['errors']:>4}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        print(
            json.dumps(
                asyncio.run(
                    closed_loop(
                        args.url, args.clients, args.warmup_s, args.duration_s, args.max_tokens
                    )
                )
            )
        )
        return 0
    if args.naive_server:
        run_naive_server(args.model_dir, args.port, args.threads)
        return 0
    apply_quick(args, QUICK, "serve_generation")
    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="tether-servegen-"))
    result: dict[str, Any] = {
        "machine": machine_info(threads=args.threads),
        "settings": vars(args) | {"out": str(args.out)},
        "cells": [],
    }
    try:
        model_dir = served_folder(args.model_dir, workdir)
        result["bare_first_token_s"] = bare_first_token_s(model_dir, args.threads)
        print(f"bare generate, first token: {result['bare_first_token_s']:.3f} s")
        for server in args.servers.split(","):
            proc, url = start_server(server, model_dir, args, workdir)
            try:
                for clients in [int(c) for c in args.concurrency.split(",")]:
                    cell = {"server": server} | run_cell(url, clients, args)
                    result["cells"].append(cell)
                    print_table([cell])
                    write_json(args.out, result)
            finally:
                stop_server(proc)
        result["verdict"] = verdict(result)
        result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
        write_json(args.out, result)
        print()
        print_table(result["cells"])
        for line in result["verdict"]:
            print(line)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def verdict(result: dict[str, Any]) -> list[str]:
    cells = {(c["server"], c["clients"]): c for c in result["cells"]}
    top = max((c for _, c in cells), default=None)
    lines = []
    t, n = cells.get(("tether", top)), cells.get(("naive", top))
    if t and n:
        ratio = t["output_tokens_per_s"] / max(n["output_tokens_per_s"], 1e-9)
        lower = (t["latency_p99_s"] or 1e9) < (n["latency_p99_s"] or 0)
        ok = ratio >= 3.0 and lower
        lines.append(
            f"C={top}: tether {t['output_tokens_per_s']:.1f} vs naive {n['output_tokens_per_s']:.1f} tokens/s "
            f"({ratio:.2f}x; target >= 3x), p99 {t['latency_p99_s']:.2f} vs {n['latency_p99_s']:.2f} s: {'PASS' if ok else 'FAIL'}"
        )
    one = cells.get(("tether", 1))
    if one and one["ttft_p50_s"] is not None:
        ratio = one["ttft_p50_s"] / result["bare_first_token_s"]
        lines.append(
            f"C=1: tether time to first token {one['ttft_p50_s']:.3f} s vs bare generate {result['bare_first_token_s']:.3f} s "
            f"({ratio:.2f}x; target <= 1.2x): {'PASS' if ratio <= 1.2 else 'FAIL'}"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
