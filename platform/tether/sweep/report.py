"""Sweep results for people: the trial table, trials.csv, the verdict lines and plots.

Pure functions on the rows ``tether.sweep.runner.collect_trials`` builds, one per trial:
{"trial", "trial_id", "arm", "config" (dotted key → value, λ and lr always), "metric" (the
ranked metric's best value over the trial's evaluations), "last_metric", "best_step",
"best_metrics", "metrics" (last), "epochs", "step", "status", "model_dir", "checkpoint",
"best_checkpoint", "train_attempts"}. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

LAMBDA, LR = "objective.lambda", "optim.lr"  # the spec keys, as in tether.sweep.search


# --------------------------------------------------------------------------- selection


def pick_best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The trial whose best evaluation is best. Every trial is scored the same way, at its
    best checkpoint, so a trial ASHA stopped early and one that overfit later compare fairly;
    ties go to completed trials."""
    scored = [r for r in rows if _finite(r["metric"])]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda r: (sign * r["metric"], r["status"] == "completed"))


def public(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A row as the summary JSON shows it."""
    if row is None:
        return None
    keys = (
        "trial_id",
        "arm",
        "config",
        "searched",  # the trial's own sampled values: its spec is rebuilt from them
        "metric",
        "last_metric",
        "best_step",
        "best_metrics",
        "metrics",
        "epochs",
        "status",
        "model_dir",
        "model_from",
        "checkpoint",
        "best_checkpoint",
    )
    return {k: row.get(k) for k in keys}


def difference(anchored: dict | None, baseline: dict | None) -> float | None:
    """Best anchored minus best λ = 0 trial, in the metric's units (None if either is missing)."""
    if anchored is None or baseline is None:
        return None
    return anchored["metric"] - baseline["metric"]


def verdict(summary: dict[str, Any]) -> list[str]:
    """Plain-language lines: the best trial, and whether anchoring beat plain fine-tuning."""
    metric, best = summary["metric"], summary["best"]
    if best is None:
        return [f"no trial reported {metric}"]
    model = best["model_dir"] or "none (its checkpoints are gone)"
    lines = [
        f"best: trial {best['trial_id']} ({best['arm']}, {_params(best['config'])}) "
        f"{metric} {best['metric']:.4f} at step {best['best_step']}; model: {model}"
    ]
    a, b, d = summary["best_anchored"], summary["baseline_best"], summary["anchored_minus_baseline"]
    if d is not None:
        better = d > 0 if summary["mode"] == "max" else d < 0
        scale, unit = (100.0, " points") if metric.endswith(("accuracy", "f1")) else (1.0, "")
        outcome = "ties with" if d == 0 else "beats" if better else "does not beat"
        by = "" if d == 0 else f" by {abs(d) * scale:.2f}{unit}"
        lines.append(
            f"anchored best {a['metric']:.4f} vs λ=0 best {b['metric']:.4f} "
            f"({_params(b['config'], lam=False)}): anchoring {outcome} plain fine-tuning{by}"
        )
    counts = summary["status_counts"]
    lines.append(
        f"{summary['trials']} trials: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + f"; {summary['trial_epochs']:.2f} trial-epochs; {summary['sweep_dir']}"
    )
    return lines


# --------------------------------------------------------------------------- table and CSV


def format_table(rows: list[dict], keys: list[str], metric: str, best: dict | None) -> str:
    """A fixed-width table, one line per trial, the best marked with '*'."""
    head = ["trial", "arm", *[short(k) for k in keys], f"best {metric}", "last", "epochs", "status"]
    body = []
    for r in rows:
        mark = "*" if best is not None and r["trial_id"] == best["trial_id"] else " "
        body.append(
            [
                f"{mark}{r['trial']}",
                r["arm"],
                *[fmt(r["config"].get(k)) for k in keys],
                "-" if r["metric"] is None else f"{r['metric']:.4f}",
                "-" if not _finite(r.get("last_metric")) else f"{r['last_metric']:.4f}",
                f"{r['epochs']:.2f}",
                r["status"],
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(rows: list[dict], keys: list[str], path: Path) -> Path:
    """trials.csv: one row per trial, searched keys and last eval metrics as columns."""
    metric_keys = sorted({k for r in rows for k in r["metrics"] if k.startswith("eval/")})
    fields = ["trial", "trial_id", "arm", *keys, "metric", "best_step", "last_metric", *metric_keys]
    fields += ["epochs", "step", "status", "train_attempts", "model_dir", "checkpoint"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        # a row's nested config/metrics dicts are not columns: their values are spread in
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            config = {k: r["config"].get(k) for k in keys}
            writer.writerow({**r, **config, **{k: r["metrics"].get(k) for k in metric_keys}})
    return path


# --------------------------------------------------------------------------- plots


def write_plots(rows: list[dict], curves: dict[str, list], metric: str, folder: Path) -> list[Path]:
    """metric_vs_lambda_lr.png and validation_curves.png under ``folder``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_metric_vs_hparams(rows, metric, folder / "metric_vs_lambda_lr.png"),
        plot_curves(rows, curves, metric, folder / "validation_curves.png"),
    ]


def plot_metric_vs_hparams(rows: list[dict], metric: str, path: Path) -> Path:
    """Scatter of the last metric against λ and against lr; λ = 0 trials marked apart.

    The λ axis is symmetric-log so λ = 0 sits at its left edge; hollow markers were stopped
    early by the scheduler.
    """
    import matplotlib.pyplot as plt

    scored = [r for r in rows if _finite(r["metric"])]
    anchored = [r for r in scored if r["arm"] == "anchored"]
    baseline = [r for r in scored if r["arm"] == "baseline"]
    fig, (ax_lam, ax_lr) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key in ((ax_lam, LAMBDA), (ax_lr, LR)):
        for group, style in (
            (anchored, dict(marker="o", color="tab:blue", label="anchored")),
            (baseline, dict(marker="X", color="black", label="λ = 0 (baseline)")),
        ):
            for stopped in (False, True):
                pts = [r for r in group if (r["status"] != "completed") == stopped]
                if pts:
                    ax.scatter(
                        [r["config"][key] for r in pts],
                        [r["metric"] for r in pts],
                        s=46,
                        marker=style["marker"],
                        edgecolors=style["color"],
                        facecolors="none" if stopped else style["color"],
                        label=style["label"] + (" (stopped early)" if stopped else ""),
                    )
        ax.grid(alpha=0.3)
    positive = [r["config"][LAMBDA] for r in scored if r["config"][LAMBDA] > 0]
    if positive:
        ax_lam.set_xscale("symlog", linthresh=min(positive))
        ax_lam.set_xlim(-0.3 * min(positive), 2 * max(positive))  # no negative half
    ax_lam.set_xlabel("λ (anchor strength; 0 = plain fine-tuning)")
    ax_lr.set_xscale("log")
    ax_lr.set_xlabel("learning rate")
    ax_lam.set_ylabel(f"{metric} (best evaluation)")
    ax_lr.legend(fontsize=8, loc="best")
    fig.suptitle(f"{metric} per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(rows: list[dict], curves: dict[str, list], metric: str, path: Path) -> Path:
    """The metric over epochs for every trial: anchored coloured by log λ, λ = 0 dashed black."""
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    lams = {r["config"][LAMBDA] for r in rows if r["arm"] == "anchored" and r["config"][LAMBDA] > 0}
    norm = colors.LogNorm(min(lams), max(lams)) if len(lams) > 1 else None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        points = curves.get(r["trial_id"])
        if not points:
            continue
        epochs, values = zip(*points, strict=True)
        if r["arm"] == "baseline" or r["config"][LAMBDA] <= 0:
            ax.plot(epochs, values, "--", color="black", lw=1.2, alpha=0.8)
        else:
            color = cm.viridis(norm(r["config"][LAMBDA])) if norm else "tab:blue"
            ax.plot(epochs, values, "-", color=color, lw=1.2)
        if r["status"] == "stopped":  # where the scheduler cut it
            ax.plot(epochs[-1], values[-1], "o", mfc="none", color="gray", ms=6)
    if norm is not None:
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="λ")
    elif lams:
        ax.plot([], [], "-", color="tab:blue", label=f"λ = {fmt(next(iter(lams)))}")
    ax.plot([], [], "--", color="black", label="λ = 0 (baseline)")
    ax.plot([], [], "o", mfc="none", color="gray", label="stopped early")
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"validation curves ({len(curves)} trials)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- small helpers


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def short(key: str) -> str:
    return {LAMBDA: "λ", LR: "lr"}.get(key, key)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _params(config: dict[str, Any], lam: bool = True) -> str:
    keys = [k for k in config if lam or k != LAMBDA]
    return ", ".join(f"{short(k)}={fmt(config[k])}" for k in keys)
