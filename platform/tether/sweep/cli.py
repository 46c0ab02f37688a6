"""`tether tune`: the command line of tether.sweep (kept light: the parser imports it).

    tether tune JOB.yaml [key=value ...] [--summary PATH] [--resume [SWEEP]] [--verbose]

Exit status: 0 with a best trial, 2 for an invalid spec or sweep (nothing started), 1 when
the sweep failed or no trial produced the metric.
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="search λ and lr (and more) with Ray Tune, beside a λ=0 control arm"
    )
    p.add_argument("job", type=Path, help="job spec YAML with a `tune` section (see jobs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override spec keys")
    p.add_argument("--summary", type=Path, help="also write the sweep summary JSON here")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="SWEEP",
        help="continue an interrupted sweep: SWEEP, else tune.name, else this job's latest",
    )
    p.add_argument("--verbose", action="store_true", help="show every trial's worker logs")
    p.set_defaults(handler=cmd_tune)


def cmd_tune(args) -> int:
    from tether.config import SpecError, load_job
    from tether.data import DataError
    from tether.sweep import open_sweep, run_tracked_sweep, write_json

    try:
        if isinstance(args.resume, str) and "=" in args.resume:
            raise SpecError(
                [
                    f"--resume: {args.resume!r} looks like an override; "
                    "put key=value overrides before --resume"
                ]
            )
        sweep = open_sweep(load_job(args.job, args.overrides), resume=args.resume)
    except (SpecError, DataError) as e:
        print(e, file=sys.stderr)
        print("tether: invalid sweep; nothing was started", file=sys.stderr)
        return 2
    try:
        # MLflow parent + child runs, best model registered and gated (tracking.enabled)
        outcome = run_tracked_sweep(sweep, verbose=args.verbose)
    except SpecError as e:  # e.g. one trial does not fit the cluster
        print(e, file=sys.stderr)
        return 2
    except Exception as e:  # one line at the end; Ray has logged the details
        print(f"tether: sweep failed: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        print(f"tether: resume with: tether tune {args.job} --resume {sweep.name}", file=sys.stderr)
        return 1
    if args.summary:
        write_json(args.summary, outcome.summary)
    return 0 if outcome.summary["best"] else 1
