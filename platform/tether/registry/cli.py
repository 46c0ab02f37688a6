"""`tether models`: what is registered, and moving aliases by hand.

tether models list [NAME]
tether models promote NAME VERSION [--alias champion]
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list registered models; promote a version")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else ./mlflow.db")
    sub = p.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="models, versions, aliases and their gate metric")
    ls.add_argument("name", nargs="?", help="only this registered model")
    ls.set_defaults(handler=cmd_list)
    promote = sub.add_parser("promote", help="point an alias (default: champion) at a version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", default="champion")
    promote.set_defaults(handler=cmd_promote)


def _client(args):
    from mlflow.tracking import MlflowClient

    from tether.tracking import resolve_tracking_uri

    return MlflowClient(tracking_uri=resolve_tracking_uri(args.tracking_uri))


def cmd_list(args: argparse.Namespace) -> int:
    client = _client(args)
    models = client.search_registered_models()
    if args.name:
        models = [m for m in models if m.name == args.name]
    if not models:
        print("no registered models" + (f" named {args.name!r}" if args.name else ""))
        return 0 if not args.name else 1
    for m in models:
        aliases = m.aliases or {}
        print(f"{m.name}")
        versions = client.search_model_versions(f"name='{m.name}'")
        for v in sorted(versions, key=lambda v: int(v.version)):
            names = [a for a, ver in aliases.items() if str(ver) == str(v.version)]
            tags = v.tags or {}
            metric = tags.get("tether.metric", "eval/accuracy")
            value = tags.get(metric)
            shown = f"{float(value):.4f}" if value is not None else "-"
            print(
                f"  v{v.version:<4} {metric.removeprefix('eval/')} {shown:<7} "
                f"λ={tags.get('lambda', '-'):<8} "
                f"{tags.get('mode', '-'):<9} run {v.run_id[:12] if v.run_id else '-'}  "
                + (f"[{', '.join(sorted(names))}]" if names else "")
                + lineage(tags)
            )
    return 0


def lineage(tags: dict) -> str:
    """' ← models:/x/2' for a version fine-tuned from a registered one (its chain, step by
    step: each parent's own line shows its parent); ' (LoRA r=8)' for an adapter."""
    import json

    out = ""
    base = tags.get("tether.base_model", "")
    if base.startswith("models:/"):
        out += f"  ← {base}"
    adapter = json.loads(tags.get("tether.adapter") or "null")
    if isinstance(adapter, dict):
        out += f"  (LoRA r={adapter.get('r')})"
    return out


def cmd_promote(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from tether.registry import promote_by_hand

    client = _client(args)
    try:
        promote_by_hand(client, args.name, args.alias, args.version)
    except MlflowException as e:
        print(f"tether: cannot promote {args.name} v{args.version}: {e.message}", file=sys.stderr)
        return 1
    print(f"{args.name}@{args.alias} → v{args.version}")
    return 0
