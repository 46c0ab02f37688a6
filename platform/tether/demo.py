"""`tether demo`: the whole workflow on the embedded defaults, in one command.

    tether demo [--llm] [--job JOB.yaml] [--quick] [--exit | --no-serve] [--port 8000]

1. an anchored sweep (λ × lr, plus the λ = 0 control arm) on a local Ray cluster, tracked in
   the SQLite MLflow store: the packaged MiniLM on synthetic sentiment (default), or with
   ``--llm`` the packaged SmolLM2-135M-Instruct on synthetic chat (jobs/chat_sft.yaml, sized
   to finish in about 15 minutes on 2 cores);
2. the best trial registered; `champion` moved to it if it beats the current champion;
3. the champion served by Ray Serve on 127.0.0.1, sample requests sent and answered: labels,
   or chat completions printed beside θ*'s own answers to the same prompts;
4. the results: table, the winning λ and lr and its margin over λ = 0 (for the LLM, the
   forgetting of the best anchored and best plain trials), plots, the MLflow UI command, a
   curl and (LLM) a three-line `openai` snippet. Serves until Ctrl-C (``--exit`` stops after
   the sample requests, ``--no-serve`` after registration).

``--quick`` shrinks the sweep to a few short trials (for tests and a first look).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_TEXTS = [
    "An absolutely wonderful film, I was moved from start to finish.",
    "The plot was dull and the acting was painfully wooden.",
    "The hotel was not bad at all, the staff were lovely.",
    "I wanted my money back after ten minutes.",
]
SAMPLE_CHATS = [
    "What is the sentiment of this review? The soundtrack was not bad at all.",
    "Is this review positive or negative? The staff were rude and the room was dirty.",
    "What is the capital of France?",  # general: what SFT may cost
    "Give one tip for sleeping better.",
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
# the LLM sweep: one 2-CPU worker per trial, one trial at a time (SmolLM2 steps take seconds)
LLM_OVERRIDES = [
    "data.max_train_samples=128",
    "data.max_validation_samples=32",
    "train.epochs=1",
    "train.eval_interval=8",
    "eval.generate_examples=16",
    "scaling.num_workers=1",
    "scaling.cpus_per_worker=2",
    "tune.num_samples=2",
    "tune.baseline_samples=1",
]
LLM_QUICK_OVERRIDES = [
    "data.max_train_samples=32",
    "data.max_validation_samples=8",
    "train.max_steps=2",
    "train.eval_interval=2",
    "train.batch_size=4",
    "eval.generate_examples=4",
    "eval.samples=0",
    "tune.num_samples=1",
]


@dataclass(frozen=True)
class DemoKind:
    job: str
    overrides: list[str]
    quick: list[str]


KINDS = {
    "classifier": DemoKind("jobs/demo.yaml", [], QUICK_OVERRIDES),
    "llm": DemoKind("jobs/chat_sft.yaml", LLM_OVERRIDES, LLM_OVERRIDES + LLM_QUICK_OVERRIDES),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="sweep → register → serve on the embedded defaults")
    p.add_argument("--llm", action="store_true", help="the LLM path: SmolLM2 chat SFT, OpenAI API")
    p.add_argument(
        "--job", type=Path, default=None, help="default jobs/demo.yaml (--llm: jobs/chat_sft.yaml)"
    )
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

    kind = KINDS["llm" if args.llm else "classifier"]
    overrides = (kind.quick if args.quick else kind.overrides) + list(args.overrides)
    try:
        spec = load_job(args.job or Path(kind.job), overrides)
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
    has_champion = registered and bool(registry.get("promoted") or registry.get("champion_version"))
    model_uri = f"models:/{registry['name']}@champion" if has_champion else None
    if has_champion and not registry.get("promoted"):
        # the answers below come from the champion, not from the trial described above
        print(
            f"  note: this sweep's best (v{registry['version']}) did not beat the champion, "
            "so the champion is what is served and answers below"
        )
    elif registered and not has_champion:  # a diverged first version is never champion
        print("  note: there is no champion yet: the sweep's best model is served as it is")
    step("4/4", f"serving {model_uri or best['model_dir']} on {args.host}:{args.port}")
    return serve_and_ask(sweep, summary, model_uri, report, args)


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
        better = margin > 0 if summary["mode"] == "max" else margin < 0
        verdict = "beats" if better else "does not beat"
        lines.append(f"anchoring {verdict} plain fine-tuning here: margin {margin:+.4f} {metric}")
    for label, row in (("best anchored", summary.get("best_anchored")), ("best λ=0", base)):
        forgetting = ((row or {}).get("best_metrics") or {}).get("eval/forgetting")
        if forgetting is not None:
            lines.append(
                f"forgetting of the {label} trial: {forgetting:+.4f} nats per token (0 = none)"
            )
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


def serve_and_ask(sweep, summary: dict, model_uri: str | None, report: list[str], args) -> int:
    import hashlib
    import os

    import ray

    from tether.cluster import ensure_ray
    from tether.serving.cli import API_KEY_ENV, generates
    from tether.serving.deploy import ServeOptions, deploy, model_user_config, serve_config
    from tether.serving.model import card_task, resolve_model_dir

    model_dir = resolve_model_dir(None if model_uri else summary["best"]["model_dir"], model_uri)
    key = os.environ.get(API_KEY_ENV)  # a user who exported it gets an app that requires it
    task = card_task(model_dir)
    options = ServeOptions(
        task=task,
        host=args.host,
        port=args.port,
        api_key_sha256=hashlib.sha256(key.encode()).hexdigest() if key else None,
        request_timeout_s=300.0 if generates(task) else 30.0,
    )
    config = serve_config(options, model_user_config(model_dir, model_uri))
    started_ray = not ray.is_initialized()  # the sweep shut nothing down; usually connected
    ensure_ray()
    deploy(config)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        if generates(task):
            ask_llm(sweep, options, headers, summary, report)
        else:
            ask_classifier(options, headers, summary, report)
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


def ask_classifier(options, headers: dict, summary: dict, report: list[str]) -> None:
    import httpx

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


def ask_llm(sweep, options, headers: dict, summary: dict, report: list[str]) -> None:
    """Chat completions from the champion, each beside θ*'s own answer to the same prompt."""
    import httpx

    from tether.models import resolve_model_source
    from tether.tasks.causal_lm import CausalLM

    base = CausalLM().predictor(
        resolve_model_source(sweep.spec.model.name, sweep.spec.storage.path), {}
    )
    served = []
    print("  sample chat completions (greedy), beside θ*'s answers:")
    for prompt in SAMPLE_CHATS:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 32,
        }
        response = httpx.post(
            f"{options.url}/v1/chat/completions", json=body, headers=headers, timeout=300
        )
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
        theta_star = base.decode(base.offline_greedy(base.chat_prompt(body["messages"]), 32))
        served.append({"prompt": prompt, "answer": answer, "theta_star": theta_star})
        print(
            f"    user:       {prompt}\n    fine-tuned: {answer.strip()}\n    θ*:         {theta_star.strip()}"
        )
    summary["sample_completions"] = served
    report.append(
        f"endpoint: curl -s {options.url}/v1/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"messages": [{"role": "user", "content": "Is this review positive? A lovely film."}]}\''
    )
    name = (summary.get("registry") or {}).get("name") or sweep.spec.name
    report += [
        "openai: from openai import OpenAI",
        f"        client = OpenAI(base_url='{options.url}/v1', api_key='unused-without---api-key')",
        f"        client.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'Hi'}}])",
    ]


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
