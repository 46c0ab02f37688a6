"""``tether serve``: deploy a trained model on Ray Serve and block until Ctrl-C.

    tether serve --model-dir runs/demo/model                    # http://127.0.0.1:8000
    tether serve --model-uri models:/demo@champion --autoscale 1,4 --api-key-file ~/.tether-key
    tether serve --model-dir ... --print-config > serve/my.yaml  # the same app for `serve deploy`
    tether serve --model-uri models:/demo@champion --reload     # swap a running server's model
    tether serve --model-dir ... --throughput-optimized        # Ray Serve's high-throughput mode
    tether serve --base packaged:SmolLM2-135M-Instruct --adapters-from chat-sft \
                 --adapter support=runs/support/model             # many LoRA adapters, one base

A running server also reloads on SIGHUP (``kill -HUP PID``): it re-resolves the model (a
moved alias, or new weights in the same directory) and swaps it in without restarting
replicas. ``--reload`` does the same from another shell for a server on a long-lived cluster
(``ray start --head``, or --address); pass the same flags as the running server.
Exit status: 0 on success, 2 for bad flags or an unusable model, 1 when deploying fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

API_KEY_ENV = "TETHER_API_KEY"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a trained model over HTTP on Ray Serve")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="a model directory from `tether train`")
    source.add_argument("--model-uri", help="a registered model, e.g. models:/NAME@champion")
    source.add_argument(
        "--base",
        help="a pretrained model (packaged:NAME, a folder, a hub id) serving LoRA adapters: "
        "a causal LM, or an encoder whose adapters are classifiers or taggers",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="ID=DIR",
        help="a LoRA adapter (a LoRA run's model folder) requests name as model=ID; repeatable",
    )
    p.add_argument(
        "--adapters-from",
        metavar="NAME[,NAME]",
        help="registered models whose versions requests may name (model=NAME/VERSION or "
        "NAME@ALIAS); * for any",
    )
    p.add_argument(
        "--max-adapters", type=int, default=8, help="adapters held per replica (LRU beyond)"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    scale.add_argument("--autoscale", type=_min_max, metavar="MIN,MAX", help="autoscale replicas")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (= torch threads) per replica")
    p.add_argument("--max-batch-size", type=int, default=16, help="items per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait for a batch to fill")
    p.add_argument("--max-texts", type=int, default=64, help="items per request (422 above)")
    p.add_argument("--max-chars", type=int, default=20_000, help="characters per text (422 above)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="413 above")
    p.add_argument("--max-json-depth", type=int, default=32, help="JSON nesting (400 above)")
    p.add_argument("--max-ongoing-requests", type=int, help="per replica (default 2×batch)")
    p.add_argument("--max-queued-requests", type=int, default=64, help="beyond: 503 at once")
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=None,
        help="HTTP request limit (default 30; 300 for LLMs)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=512, help="LLMs: the largest max_tokens (400 above)"
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        help="LLMs: requests waiting for a batch slot (503 above)",
    )
    p.add_argument(
        "--generation-timeout-s", type=float, default=120.0, help="LLMs: decoding time per request"
    )
    p.add_argument(
        "--api-key-file",
        type=Path,
        help=f"require the bearer token in this file on /v1/* (or ${API_KEY_ENV}; never argv)",
    )
    p.add_argument("--quantize", action="store_true", help="dynamic int8 Linear layers (CPU)")
    p.add_argument(
        "--address",
        help="Ray cluster (default: RAY_ADDRESS, else the `ray start` one, else a new one; local: always new)",
    )
    p.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="Ray Serve's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: direct ingress,"
        " gRPC between proxy and replicas); applies to a cluster this command starts",
    )
    p.add_argument(
        "--tracking-uri",
        help="the registry of --model-uri (default MLFLOW_TRACKING_URI, else ./mlflow.db); replicas use it too",
    )
    p.add_argument("--reload", action="store_true", help="swap the model of a running server")
    p.add_argument("--print-config", action="store_true", help="print the Serve config YAML")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.throughput_optimized:  # before anything imports ray.serve: it reads env at import
        enable_throughput_mode(args.address)
    from tether.serving.deploy import serve_config
    from tether.serving.model import ModelSourceError

    try:
        options = options_from_args(args)  # bad flags fail before any model is touched
        user_config = resolve_user_config(args)
        task = served_task(user_config)
        options = dataclasses.replace(options, task=task, text_pair=reads_pairs(user_config))
        if args.request_timeout_s is None and generates(task):  # an answer streams for minutes
            options = dataclasses.replace(options, request_timeout_s=300.0)
    except (ValueError, ModelSourceError) as e:
        print(f"tether serve: {e}", file=sys.stderr)
        return 2
    config = serve_config(options, user_config)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    if args.reload:
        return reload_running_server(config, options, args.address)
    return serve_until_interrupted(config, options, args)


def enable_throughput_mode(address: str | None) -> None:
    """Set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the cluster this command is about to start.

    Ray's processes read it when they start, and a new local cluster's processes inherit this
    one's environment. On 2 cores it raised tether's throughput from ≈49 to ≈61–66 requests/s
    (benchmarks/serve_load.py). A running cluster keeps the mode it was started with: there,
    set the variable for `ray start` instead.
    """
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if (address and address != "local") or os.environ.get("RAY_ADDRESS"):
        print(
            "tether serve: --throughput-optimized only takes effect on a cluster this command "
            "starts; for an existing one run `RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start ...`",
            file=sys.stderr,
        )


def read_api_key(path: Path | None) -> str | None:
    """The key in ``path`` (whitespace stripped): a file, so `ps` never shows it."""
    if path is None:
        return None
    try:
        key = path.expanduser().read_text().strip()
    except OSError as e:
        raise ValueError(f"--api-key-file {path}: cannot read it ({e.strerror})") from None
    if not key:
        raise ValueError(f"--api-key-file {path} is empty")
    return key


def options_from_args(args: argparse.Namespace, task: str = "sequence-classification"):
    from tether.serving.deploy import ServeOptions

    key = read_api_key(args.api_key_file) or os.environ.get(API_KEY_ENV)
    return ServeOptions(
        task=task,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        autoscale=args.autoscale,
        num_cpus=args.num_cpus,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_texts=args.max_texts,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        max_json_depth=args.max_json_depth,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        request_timeout_s=args.request_timeout_s or 30.0,
        max_new_tokens=args.max_new_tokens,
        max_waiting=args.max_waiting,
        generation_timeout_s=args.generation_timeout_s,
        max_adapters=args.max_adapters,
        # only the hash travels: Serve configs are visible on the dashboard
        api_key_sha256=hashlib.sha256(key.encode()).hexdigest() if key else None,
    )


def resolve_user_config(args: argparse.Namespace) -> dict:
    """Resolve and load the model here first, then describe it as the replicas' user_config.

    A model that fails to load in a replica takes the replica down (Serve restarts it with the
    same config), so on a reload it would replace a working model with an outage: it must
    fail here instead, with exit status 2.
    """
    from tether.config import resolve_tracking_uri
    from tether.serving.deploy import model_user_config
    from tether.serving.model import (
        ModelSourceError,
        base_card,
        card_task,
        load_served_model,
        resolve_model_dir,
    )

    adapters = adapter_config(args)
    registry = args.model_uri or (adapters or {}).get("registered")
    tracking_uri = resolve_tracking_uri(args.tracking_uri) if registry else None
    if args.base:
        from tether.models import resolve_model_source

        try:
            model_dir = Path(resolve_model_source(args.base))
        except Exception as e:
            raise ModelSourceError(f"--base {args.base}: {e}") from e
    else:
        # a URI is always re-resolved (on --reload the alias may have moved)
        model_dir = resolve_model_dir(
            None if args.model_uri else args.model_dir,
            args.model_uri,
            tracking_uri,
            need_card=adapters is None,
        )
    card = base_card(model_dir, adapters_task(adapters)) if adapters is not None else None
    if card is not None:
        check_adapters_task(model_dir, card_task(model_dir, card))
    try:
        if card is not None and not generates(card_task(model_dir, card)):
            from tether.serving.adapters import HeadAdapterPool

            HeadAdapterPool(card_task(model_dir, card), model_dir, max_batch_tokens=1)
        else:
            load_served_model(model_dir, args.model_uri, quantize=args.quantize, card=card)
    except Exception as e:
        raise ModelSourceError(f"{model_dir} does not load: {type(e).__name__}: {e}") from e
    config = model_user_config(
        model_dir, args.model_uri, quantize=args.quantize, tracking_uri=tracking_uri
    )
    if adapters is not None:
        config |= {"adapters": adapters, "tracking_uri": tracking_uri}
    return config


def adapter_config(args: argparse.Namespace) -> dict | None:
    """user_config.adapters from --adapter ID=DIR and --adapters-from (checked here: a missing
    folder fails now, not on the first request); None when neither is given."""
    from tether.serving.adapters import AdapterCatalog

    if args.base and not (args.adapter or args.adapters_from):
        raise ValueError(
            "--base serves LoRA adapters: add --adapter ID=DIR or --adapters-from NAME"
        )
    if not (args.adapter or args.adapters_from):
        return None
    if args.quantize:
        raise ValueError("--quantize does not combine with adapters (LoRA needs fp32 Linear)")
    dirs = {}
    for item in args.adapter:
        model_id, sep, folder = item.partition("=")
        if not sep or not model_id or not folder:
            raise ValueError(f"--adapter {item!r}: expected ID=DIR")
        dirs[model_id] = str(Path(folder).resolve())
    registered = [n.strip() for n in (args.adapters_from or "").split(",") if n.strip()]
    config = {"registered": registered, "dirs": dirs}
    try:
        AdapterCatalog.from_config(config)
    except FileNotFoundError as e:
        raise ValueError(f"--adapter: {e}") from None
    return config


def served_task(user_config: dict) -> str:
    """The task of the served model (a base serving adapters: its adapters' task)."""
    from tether.serving.model import base_card, card_task

    model_dir = Path(user_config["model_dir"])
    adapters = user_config.get("adapters")
    if adapters is not None:
        return card_task(model_dir, base_card(model_dir, adapters_task(adapters)))
    return card_task(model_dir)


def reads_pairs(user_config: dict) -> bool:
    """Whether the served classifier reads text pairs ({"text", "text_pair"}): its card says
    so; a base serving adapters follows its adapter folders' cards, which must agree."""
    from tether.card import card_or_empty

    adapters = user_config.get("adapters")
    if adapters is None:
        return bool(card_or_empty(user_config["model_dir"]).get("text_pair"))
    found = {bool(card.get("text_pair")) for card in adapter_cards(adapters).values()}
    if len(found) > 1:
        raise ValueError("--adapter: pair and single-text classifiers cannot share one app")
    return found.pop() if found else False


def adapters_task(adapters: dict) -> str:
    """The task the configured adapter folders were trained for (they must agree); a causal LM
    when only registered names are given and the base has no card to say otherwise."""
    tasks = {
        model_id: card.get("task", "causal-lm")
        for model_id, card in adapter_cards(adapters).items()
    }
    if len(set(tasks.values())) > 1:
        raise ValueError(f"--adapter: adapters of different tasks cannot share a base: {tasks}")
    return next(iter(tasks.values()), "causal-lm")


def adapter_cards(adapters: dict) -> dict[str, dict]:
    """The cards of the configured adapter folders that have one, by model id."""
    from tether.card import card_or_empty
    from tether.serving.adapters import adapter_folder

    cards = {
        model_id: card_or_empty(adapter_folder(Path(folder)))
        for model_id, folder in (adapters.get("dirs") or {}).items()
    }
    return {model_id: card for model_id, card in cards.items() if card}


def check_adapters_task(model_dir: Path, task: str) -> None:
    """Registered adapters alone do not say their task: a base that is not a causal LM then
    needs one --adapter folder (whose card does)."""
    import json

    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    if task == "causal-lm" and not any(a.endswith("ForCausalLM") for a in architectures):
        raise ValueError(
            f"--base {model_dir.name} is not a causal LM ({architectures}): for classifier or "
            "tagger adapters name at least one with --adapter ID=DIR (its card gives the task)"
        )


# --------------------------------------------------------------------------- serving


def serve_until_interrupted(config: dict, options, args: argparse.Namespace) -> int:
    """Deploy, print how to call it, then wait: SIGHUP reloads, Ctrl-C/SIGTERM shut down."""
    from tether.cluster import ensure_ray
    from tether.serving.deploy import DeployError, deploy

    if not options.is_loopback and options.api_key_sha256 is None:
        print(
            f"tether serve: warning: {options.host} without --api-key: anyone on the network "
            "can call the model",
            file=sys.stderr,
        )
    reload_requested = []
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.append(True))
    try:
        ensure_ray(args.address)
        deploy(config)
        print_ready(options, config)
        while True:
            time.sleep(0.5)
            if reload_requested:
                reload_requested.clear()
                config = _reload_in_place(config, options, args)
    except KeyboardInterrupt:
        print("\ntether serve: shutting down", file=sys.stderr)
        return 0
    except ConnectionError as e:
        print(f"tether serve: cannot reach Ray: {e}", file=sys.stderr)
        return 1
    except DeployError as e:
        print(f"tether serve: deploy failed: {e}", file=sys.stderr)
        return 1
    finally:
        shut_down(options.app_name)


def _reload_in_place(config: dict, options, args: argparse.Namespace) -> dict:
    """SIGHUP: re-resolve the model and redeploy if it changed; a failure keeps the old one."""
    from tether.serving.deploy import DeployError, deploy, serve_config
    from tether.serving.model import ModelSourceError

    try:
        new_user_config = resolve_user_config(args)
        new_task = served_task(new_user_config)
        if new_task != options.task:
            raise ValueError(
                f"the new model is a {new_task} model; this server serves {options.task}"
            )
        if reads_pairs(new_user_config) != options.text_pair:
            raise ValueError("the new model reads another input shape (text pairs or not)")
        new_config = serve_config(options, new_user_config)
        if new_config == config:
            print("tether serve: reload: model unchanged", file=sys.stderr)
            return config
        deploy(new_config)
    except (ModelSourceError, DeployError, ValueError) as e:
        print(
            f"tether serve: reload failed, still serving the previous model: {e}", file=sys.stderr
        )
        return config
    print(f"tether serve: reloaded {served_model_dir(new_config)}")
    return new_config


def reload_running_server(config: dict, options, address: str | None) -> int:
    """--reload: redeploy a running server's app with the re-resolved model, then exit."""
    from ray import serve

    from tether.cluster import ensure_ray
    from tether.serving.deploy import DeployError, deploy

    try:
        ensure_ray(address or os.environ.get("RAY_ADDRESS") or "auto")
    except ConnectionError as e:
        print(
            f"tether serve --reload: cannot reach Ray ({e}); pass the --address the server "
            "printed (with RAY_AUTH_MODE=token when the cluster uses token auth), or send the "
            "server SIGHUP",
            file=sys.stderr,
        )
        return 1
    if options.app_name not in serve.status().applications:
        print(
            f"tether serve --reload: no application {options.app_name!r} is running on this "
            "cluster",
            file=sys.stderr,
        )
        return 1
    try:
        deploy(config)
    except DeployError as e:
        print(f"tether serve --reload: failed: {e}", file=sys.stderr)
        return 1
    print(f"tether serve: now serving {served_model_dir(config)} at {options.url}")
    return 0


def print_ready(options, config: dict) -> None:
    import ray

    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if options.api_key_sha256 else ""
    address = ray.get_runtime_context().gcs_address
    # an explicit --address never turns token auth on by itself (Ray 2.59+)
    auth_env = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
    # with a key the docs pages need it too, and a browser cannot send it: point at the schema
    docs = (
        f"  schema: curl{auth} {options.url}/openapi.json"
        if auth
        else f"  docs:   {options.url}/docs"
    )
    print(
        f"tether serve: serving {served_model_dir(config)} at {options.url}\n"
        f"{docs}\n"
        f"  try:    {try_command(options, auth)}\n"
        f"  reload: kill -HUP {os.getpid()}, or {auth_env}tether serve --reload --address {address} "
        "[same flags]\n"
        "Ctrl-C stops it.",
        flush=True,
    )


def try_command(options, auth: str) -> str:
    """A curl a person can paste: the route and body of the served task."""
    import json

    from tether.tasks import task_class

    if generates(options.task):
        route, body = "chat/completions", {"messages": [{"role": "user", "content": "Hello!"}]}
    else:
        route, body = "predict", task_class(options.task)().request_example()
    return (
        f"curl -s {options.url}/v1/{route} -H 'Content-Type: application/json'{auth} "
        f"-d '{json.dumps(body)}'"
    )


def generates(task: str) -> bool:
    """Is ``task`` served behind the OpenAI generation routes (not /v1/predict)?"""
    from tether.tasks import task_class

    return bool(getattr(task_class(task), "generates", False))


def shut_down(app_name: str) -> None:
    """Delete our app; stop Serve only if nothing else runs on it; leave the cluster alone."""
    import ray
    from ray import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    try:
        if ray.is_initialized():
            if app_name in serve.status().applications:
                serve.delete(app_name)
            if not serve.status().applications:
                serve.shutdown()
    except Exception as e:  # the process is exiting anyway: say what was left behind
        print(f"tether serve: cleanup incomplete: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        ray.shutdown()  # a local cluster this process started ends with it
        signal.signal(signal.SIGINT, signal.default_int_handler)


def served_model_dir(config: dict) -> str:
    return config["applications"][0]["deployments"][0]["user_config"]["model_dir"]


def _min_max(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 1,4), got {text!r}") from None
    return low, high


def _raise_keyboard_interrupt(*_) -> None:
    raise KeyboardInterrupt
