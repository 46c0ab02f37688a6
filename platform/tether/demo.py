"""`tether demo`: the whole workflow on the embedded defaults, in one command.

    tether demo [--job jobs/demo.yaml] [--quick] [--exit | --no-serve] [--port 8000]

1. an anchored sweep (λ × lr, plus the λ = 0 control arm) of the packaged MiniLM on the
   synthetic demo data, on a local Ray cluster, tracked in the SQLite MLflow store;
2. the best trial registered; `champion` moved to it if it beats the current champion;
3. the champion served by Ray Serve on 127.0.0.1, a few sample requests sent and answered;
4. the results: table, the winning λ and lr and its margin over λ = 0, plots, the MLflow UI
   command and a curl for the live endpoint. Serves until Ctrl-C (``--exit`` stops after the
   sample requests, ``--no-serve`` after registration).

``--quick`` shrinks the sweep to a few short trials (for tests and a first look).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SAMPLE_TEXTS = [
    "An absolutely wonderful film, I was moved from start to finish.",
    "The plot was dull and the acting was painfully wooden.",
    "The hotel was not bad at all, the staff were lovely.",
    "I wanted my money back after ten minutes.",
]

# a few short trials: the pipeline end to end in a couple of minutes on 2 cores
QUICK_OVERRIDES = [
    "data.max_train_samples=256",
    "data.max_validation_samples=200",
    "train.max_steps=8",
    "train.eval_interval=4",
    "train.batch_size=16",
    "scaling.num_workers=1",
    "tune.num_samples=2",
    "tune.baseline_samples=1",
    "tune.scheduler=none",
    "tune.max_concurrent_trials=2",  # 1-worker trials: two fit on 2 cores
]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="sweep → register → serve on the embedded defaults")
    p.add_argument("--job", type=Path, default=Path("jobs/demo.yaml"))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--quick", action="store_true", help="a few short trials (tests, first look)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--exit", action="store_true", help="stop after the sample requests")
    stop.add_argument("--no-serve", action="store_true", help="stop after registration")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--summary", type=Path, help="write the demo summary JSON here")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from tether.config import load_job
    from tether.errors import DataError, ModelSourceError, SpecError
    from tether.sweep import open_sweep

    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    try:
        spec = load_job(args.job, overrides)
        if args.quick:  # a fresh sweep name each time: quick runs are throwaway
            spec.tune.name = f"{spec.name}-quick-{time.strftime('%Y%m%d-%H%M%S')}"
        step("1/4", f"preparing the sweep: {spec.model.name} on {spec.data.train}")
        sweep = open_sweep(spec)
    except (SpecError, DataError, ModelSourceError) as e:
        print(e, file=sys.stderr)
        return 2
    return run_demo(sweep, args)


def step(n: str, text: str) -> None:
    print(f"\n=== tether demo [{n}] {text}", flush=True)


def run_demo(sweep, args: argparse.Namespace) -> int:
    from tether.config import resolve_tracking_uri
    from tether.sweep import run_tracked_sweep

    step("2/4", f"searching λ and lr with Ray Tune ({sweep.dir})")
    outcome = run_tracked_sweep(sweep)
    summary = outcome.summary
    best = summary.get("best") or {}
    if not best.get("model_dir"):
        print("tether demo: no trial left a model; nothing to register or serve", file=sys.stderr)
        return 1
    step("3/4", "registry")
    registry = summary.get("registry") or {}
    registered = bool(registry.get("version"))
    print(
        f"  {registry.get('decision') or registry.get('error') or 'not registered (tracking is off)'}"
    )
    report = results_lines(summary, resolve_tracking_uri(sweep.spec.tracking.uri))
    if args.no_serve:
        _finish(report, summary, args)
        return 0
    model_uri = f"models:/{registry['name']}@champion" if registered else None
    step("4/4", f"serving {model_uri or best['model_dir']} on {args.host}:{args.port}")
    return serve_and_ask(summary, model_uri, report, args)


def results_lines(summary: dict, tracking_uri: str) -> list[str]:
    """What a person wants to read at the end: winner, margin, where everything is."""
    best, base = summary["best"], summary.get("baseline_best")
    metric = summary["metric"]
    lines = [
        f"best trial: {best['arm']} {format_config(best['config'])} → {metric} "
        f"{best['metric']:.4f}",
    ]
    if base:
        lines.append(
            f"best λ=0 (plain fine-tuning): {format_config(base['config'])} → {base['metric']:.4f}"
        )
    margin = summary.get("anchored_minus_baseline")
    if margin is not None:
        verdict = "beats" if margin > 0 else "does not beat"
        lines.append(f"anchoring {verdict} plain fine-tuning here: margin {margin:+.4f} {metric}")
    lines.append(f"trials table: {summary['csv']}")
    lines += [f"plot: {p}" for p in summary.get("plots", [])]
    if tracking_uri.startswith("sqlite:///"):
        lines.append(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri}")
    else:
        lines.append(f"MLflow: {tracking_uri}")
    return lines


def format_config(config: dict) -> str:
    return ", ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in config.items()
    )


def serve_and_ask(summary: dict, model_uri: str | None, report: list[str], args) -> int:
    import hashlib
    import os

    import httpx
    import ray

    from tether.cluster import ensure_ray
    from tether.serving.cli import API_KEY_ENV
    from tether.serving.deploy import ServeOptions, deploy, model_user_config, serve_config
    from tether.serving.model import card_task, resolve_model_dir

    model_dir = resolve_model_dir(None if model_uri else summary["best"]["model_dir"], model_uri)
    key = os.environ.get(API_KEY_ENV)  # a user who exported it gets an app that requires it
    options = ServeOptions(
        task=card_task(model_dir),
        host=args.host,
        port=args.port,
        api_key_sha256=hashlib.sha256(key.encode()).hexdigest() if key else None,
    )
    config = serve_config(options, model_user_config(model_dir, model_uri))
    started_ray = not ray.is_initialized()  # the sweep shut nothing down; usually connected
    ensure_ray()
    deploy(config)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.post(
            f"{options.url}/v1/predict", json={"texts": SAMPLE_TEXTS}, headers=headers, timeout=60
        )
        response.raise_for_status()
        answers = response.json()
        print("  sample requests:")
        for text, pred in zip(SAMPLE_TEXTS, answers["predictions"], strict=True):
            p = max(pred["probabilities"].values())
            print(f"    {pred['label']:>8} ({p:.2f})  {text}")
        summary["sample_predictions"] = answers["predictions"]
        report.append(
            f"endpoint: curl -s {options.url}/v1/predict -H 'Content-Type: application/json' "
            '-d \'{"texts": ["a gripping, beautifully acted film"]}\''
        )
        _finish(report, summary, args)
        if args.exit:
            return 0
        print("\nserving until Ctrl-C ...", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        stop_serving(options.app_name, shutdown_ray=started_ray)


def stop_serving(app_name: str, shutdown_ray: bool) -> None:
    """Delete the demo app (and Serve, if nothing else runs); Ray only if we started it."""
    import ray
    from ray import serve

    try:
        serve.delete(app_name)
        if not serve.status().applications:
            serve.shutdown()
    finally:
        if shutdown_ray:
            ray.shutdown()


def _finish(report: list[str], summary: dict, args) -> None:
    import json

    print("\n=== tether demo: results")
    for line in report:
        print(f"  {line}")
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2, default=str))
