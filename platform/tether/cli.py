"""tether command line.

    tether train JOB.yaml [key=value ...] [--summary PATH]
    tether validate JOB.yaml [key=value ...]

Overrides use the spec's dotted keys: ``objective.lambda=0.1 scaling.num_workers=2``.
Exit status is 0 on success, 2 for an invalid spec, 1 for a failed run, with a one-line
reason at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Protocol

from tether.errors import first_line


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return args.handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether", description="Anchored fine-tuning (L2-SP) on Ray: train, search, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune with the anchored objective on Ray Train")
    _job_args(train)
    train.add_argument("--summary", type=Path, help="write the run summary JSON here")
    train.add_argument(
        "--register",
        action="store_true",
        help="register the model in MLflow (alias challenger; champion only if it is better)",
    )
    train.add_argument(
        "--verbose", action="store_true", help="show Ray's own worker logs as well as progress"
    )
    train.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="resuming a run: accept a changed train.epochs, train.max_steps or "
        "train.eval_interval (repeatable)",
    )
    train.set_defaults(handler=cmd_train)

    validate = sub.add_parser("validate", help="validate a job spec and print it resolved")
    _job_args(validate)
    validate.set_defaults(handler=cmd_validate)

    # other commands live next to their feature and register themselves here
    for module in COMMAND_MODULES:
        import importlib

        importlib.import_module(module).register(sub)
    # no prefix matching: a removed flag (`--token`, `--api-key`) must fail, not silently
    # become the longer one it abbreviates (`--token-file`)
    parser.allow_abbrev = False
    for command in sub.choices.values():
        command.allow_abbrev = False
    return parser


class Subcommand(Protocol):
    """A module that adds its command(s) with ``set_defaults(handler=...)``."""

    def register(self, subparsers) -> None: ...


COMMAND_MODULES: list[str] = [  # each is a Subcommand, imported when the parser is built
    "tether.serving.cli",
    "tether.sweep.cli",
    "tether.registry.cli",
    "tether.interpolate",
    "tether.submit",
    "tether.demo",
]


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", type=Path, help="job spec YAML (see jobs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override spec keys")


def _load(args):
    from tether.config import load_job

    return load_job(args.job, args.overrides)


def cmd_validate(args) -> int:
    import yaml

    from tether.errors import SpecError

    try:
        spec = _load(args)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
    return 0


def cmd_train(args) -> int:
    from tether.errors import DataError, ModelSourceError, RunIdentityError, SpecError
    from tether.run import prepare_run_data, run_training

    try:
        spec = _load(args)
        task, data = prepare_run_data(spec)
    except (SpecError, DataError, ModelSourceError) as e:
        print(e, file=sys.stderr)
        print("tether: invalid job spec; nothing was started", file=sys.stderr)
        return 2
    except ConnectionError as e:  # a hub or store the checks above did not name
        reason = f"{type(e).__name__}: {first_line(e)}"
        print(f"tether: a connection failed while preparing the run ({reason})", file=sys.stderr)
        print("tether: nothing was started", file=sys.stderr)
        return 2
    print(
        f"tether: training {spec.model.name} ({task.name}) on {data.lineage['num_train']} "
        f"examples (λ={spec.objective.lam}, {spec.objective.mode}) with "
        f"{spec.scaling.num_workers or 'in-process'} worker(s)",
        flush=True,
    )
    try:
        outcome = run_training(
            spec,
            prepared=(task, data),
            verbose=args.verbose,
            register=args.register,
            allow_changes=tuple(args.allow_change),
        )
    except (RunIdentityError, SpecError) as e:
        print(f"tether: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one line at the end; Ray has already printed the traceback
        print(f"tether: training failed: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 1
    summary = outcome.summary
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2))
    metric = summary.get("primary_metric", task.primary_metric)
    value = summary["metrics"].get(metric, float("nan"))
    print(f"tether: done: {metric} {value:.4f}; model: {summary['model_dir']}")
    if summary.get("mlflow_run_id"):
        print(f"tether: MLflow run {summary['mlflow_run_id']} ({summary.get('tracking')})")
    registry = summary.get("registry") or {}
    if registry.get("error"):
        print(f"tether: {registry['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
