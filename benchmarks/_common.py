"""What every benchmark script records and how it writes it: one copy, imported by each.

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and
``from _common import ...`` works. Only driver-side code uses it: functions that Ray ships to
its workers must not reference this module (a worker would not find it on its path).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# the versions a result depends on, where installed (accelerate only matters for Trainer)
VERSIONED = ("torch", "transformers", "accelerate", "ray", "mlflow")


def apply_quick(args: argparse.Namespace, quick: dict[str, Any], name: str) -> None:
    """--quick: the smoke-run settings; and a default --out that a smoke run writes as
    ``<name>_quick.json``, so it never overwrites the real numbers."""
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    if args.out is None:
        args.out = RESULTS / f"{name}{'_quick' if args.quick else ''}.json"


def machine_info(**settings: Any) -> dict[str, Any]:
    """The machine, library versions and load average at the start, plus ``settings``.

    The load average is the one number that says whether other work skewed a timing: the
    caller records it again as ``load_avg_1m_end`` when it finishes.
    """
    # a container or taskset may allow fewer CPUs than the machine has
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(affinity) if affinity is not None else None,
        **settings,
    }
    return (
        info
        | library_versions()
        | {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_1m_start": os.getloadavg()[0],
        }
    )


def library_versions() -> dict[str, str]:
    """Installed versions of VERSIONED, read from package metadata: importing torch would
    cost seconds and add to a measured RSS."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write via a .tmp sibling and rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    """numpy scalars become numbers; anything else (paths, enums) its string."""
    item = getattr(x, "item", None)
    if callable(item) and type(x).__module__ == "numpy":
        return item()
    return str(x)


def quiet_libraries(verbose: bool) -> None:
    """Ray's local mode logs every report at INFO (a 30-key dict per run): keep tables readable."""
    if verbose:
        return
    from transformers.utils import logging as hf_logging

    for name in ("ray", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def exit_on_sigterm() -> None:
    """`timeout` and job schedulers send SIGTERM: exit through the finally blocks, so the
    workdir (gigabytes of checkpoints) is removed and the JSON so far is kept."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def verdict(diffs: list[float]) -> str:
    """Paired differences over seeds (arm − control): 'helps' / 'hurts' only when the mean is
    two standard errors from zero, else 'no clear difference'. The studies share this rule."""
    if len(diffs) < 2:
        return "one seed: no verdict"
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if mean - 2 * se > 0:
        return "helps"
    if mean + 2 * se < 0:
        return "hurts"
    return "no clear difference"


def summarize_study(
    cells: dict[int, dict[int, dict]],
    arms: list[str],
    score: Callable[[dict], float],
    key: str,
) -> list[dict[str, Any]]:
    """Per n and arm of a plain-vs-anchored study: the scores over seeds (under ``key``), mean
    ± std, the paired Δ to plain, seeds better, the verdict and the selected λ and lr.
    ``cells[n][seed][arm]`` holds an arm's result and its ``selected`` hyperparameters."""
    rows = []
    for n, by_seed in cells.items():
        seeds = sorted(by_seed)
        plain = [score(by_seed[s]["plain"]) for s in seeds]
        for arm in arms:
            values = [score(by_seed[s][arm]) for s in seeds]
            diffs = [a - b for a, b in zip(values, plain, strict=True)]
            selected = [by_seed[s][arm]["selected"] for s in seeds]
            rows.append(
                {
                    "n": n,
                    "arm": arm,
                    "seeds": seeds,
                    key: values,
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "delta_vs_plain_mean": statistics.mean(diffs),
                    "seeds_better_than_plain": sum(d > 0 for d in diffs),
                    "verdict": "control" if arm == "plain" else verdict(diffs),
                    "selected_lambdas": [s["lambda"] for s in selected],
                    "selected_lrs": [s["lr"] for s in selected],
                }
            )
    return rows


def print_plain_verdicts(rows: list[dict[str, Any]]) -> None:
    """Say it plainly where the anchor did not earn its keep."""
    for r in rows:
        delta = f"{100 * r['delta_vs_plain_mean']:+.1f} points"
        if r["verdict"] in ("no clear difference", "hurts"):
            print(f"anchoring ({r['arm']}) does NOT help at n={r['n']}: {r['verdict']} ({delta})")
        elif r["verdict"].startswith("one seed"):
            print(f"{r['arm']} at n={r['n']}: one seed only, no verdict ({delta})")
