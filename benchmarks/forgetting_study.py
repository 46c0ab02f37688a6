"""Does the anchor buy retention? SmolLM2 chat SFT at λ = 0 and λ > 0: task vs forgetting.

    .venv/bin/python benchmarks/forgetting_study.py --quick    # 1 seed, 2 arms (~8 min)
    .venv/bin/python benchmarks/forgetting_study.py            # 5 arms × 3 seeds (~50 min)

Every run fine-tunes the packaged SmolLM2-135M-Instruct on tether's synthetic chat task
(jobs/chat_sft.yaml's data: sentiment answers in a fixed house style), in-process, with the
same data, steps and learning rate; only the objective differs:

    plain        λ = 0
    coupled-*    grad += 2λ(θ − θ*)
    decoupled-*  θ ← θ − lr·λ(θ − θ*) after each step (λ·Σ lr is the pull's total strength)
    kappa-3      decoupled with objective.strength κ = 3 (tether derives λ = κ / Σ lr_t)
    interp-α     (--interpolate) no training: θ* + α(θ_plain − θ*) of the same seed's plain run
    plain-lr*    λ = 0 at a smaller lr of its own (named in --arms)
    early-plain* (--early-stop-every N) a plain run stopped at its evaluation with the lowest
                 validation loss

At the end of each run: the task (eval/exact_match on the validation chats, eval/loss) and
eval/forgetting, the NLL of θ*'s own greedy answers to tether's 52 general probe prompts
minus θ*'s (0 = nothing forgotten). θ* itself is scored once for the task's starting point.
Reported per arm: mean ± std over seeds; the pass rule stated in the issue: some λ keeps
≥ 95% of plain's task gain (exact match over θ*'s) with ≤ half its forgetting. A Pareto plot
(task vs forgetting) goes to benchmarks/results/forgetting_study.png.
Writes benchmarks/results/forgetting_study.json (--quick: forgetting_study_quick.json).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import RESULTS, apply_quick, exit_on_sigterm, machine_info, quiet_libraries, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARMS = {
    "plain": {"lambda": 0.0, "mode": "coupled"},
    "coupled-0.1": {"lambda": 0.1, "mode": "coupled"},
    "coupled-10": {"lambda": 10.0, "mode": "coupled"},
    "decoupled-300": {"lambda": 300.0, "mode": "decoupled"},
    "decoupled-3000": {"lambda": 3000.0, "mode": "decoupled"},
    "kappa-3": {"strength": 3.0, "mode": "decoupled"},  # λ derived: λ·Σ lr_t = 3
    # plain fine-tuning at a smaller lr of its own (a small lr is an anchor too)
    "plain-lr5e-5": {"lambda": 0.0, "mode": "coupled", "lr": 5e-5},
    "plain-lr1e-4": {"lambda": 0.0, "mode": "coupled", "lr": 1e-4},
}
QUICK = {"seeds": [0], "arms": "plain,decoupled-3000", "examples": 64, "epochs": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--arms", default="plain,coupled-0.1,coupled-10,decoupled-300,decoupled-3000")
    p.add_argument("--examples", type=int, default=256, help="training chats")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--interpolate",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[],
        help="also score θ(α) of each plain run at these α (e.g. 0.25,0.5,0.75)",
    )
    p.add_argument(
        "--early-stop-every",
        type=int,
        default=0,
        help="plain arms evaluate every N steps and add an early-stopping arm: the checkpoint "
        "with the lowest validation loss (early stopping is an anchor too)",
    )
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def job(args, workdir: Path, objective: dict, seed: int, name: str) -> dict[str, Any]:
    objective = dict(objective)
    lr = objective.pop("lr", args.lr)  # an arm may train at an lr of its own
    plain = objective.get("lambda") == 0.0 and "strength" not in objective
    every = args.early_stop_every if plain else 0
    return {
        "name": "forgetting",
        "model": {"name": "packaged:SmolLM2-135M-Instruct", "task": "causal-lm"},
        "data": {
            "train": "synthetic:chat",
            "max_train_samples": args.examples,
            "max_validation_samples": 48,
            "max_length": 128,
            "sample_seed": seed,
        },
        "objective": objective,
        "optim": {"lr": lr, "warmup_ratio": 0.1},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "eval_interval": every or 10_000,
            "seed": seed,
            "num_threads": args.threads,
            "keep_checkpoints": 100 if every else 1,
        },
        "eval": {
            "generate_examples": 48,
            "max_new_tokens": 8,
            "samples": 0,
            "forgetting_probe": "builtin",
        },
        "scaling": {"num_workers": 0},
        "tracking": {"enabled": False},
        "storage": {"path": str(workdir / "runs"), "run_name": name},
    }


def theta_star_scores(args, workdir: Path) -> dict[str, float]:
    """θ*'s own task metrics (the starting point every gain is measured from)."""
    import torch

    from tether.config import validate_job
    from tether.run import prepare_run_data
    from tether.train.loop import evaluate, score_split
    from tether.train.strategy import DataParallel

    torch.set_num_threads(args.threads)
    spec = validate_job(job(args, workdir, ARMS["plain"], 0, "theta-star"))
    task, data = prepare_run_data(spec)
    from tether.models import resolve_model_source

    source = resolve_model_source(spec.model.name)
    model = task.load_model(source, None, False).model.eval()
    tokenizer = task.load_tokenizer(source, None, False)
    strategy = DataParallel(0, 1, torch.device("cpu"))
    metrics = evaluate(model, data.validation, task, data.pad_id, spec, strategy)

    def score(split, counts_fn, size):
        return score_split(model, split, counts_fn, size, data.pad_id, spec, strategy)

    with torch.no_grad():
        metrics |= task.extra_metrics(model, tokenizer, data, score)
    return metrics


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_quick(args, QUICK, "forgetting_study")
    exit_on_sigterm()
    quiet_libraries(args.verbose)
    from tether.config import validate_job
    from tether.run import run_training

    workdir = Path(tempfile.mkdtemp(prefix="tether-forget-"))
    arms = args.arms.split(",")
    result: dict[str, Any] = {
        "machine": machine_info(threads=args.threads),
        "settings": vars(args) | {"out": str(args.out)},
        "runs": [],
    }
    try:
        result["theta_star"] = base = theta_star_scores(args, workdir)
        print(
            f"θ*: exact match {base['eval/exact_match']:.3f}, eval loss {base['eval/loss']:.4f}, forgetting {base['eval/forgetting']:+.5f}"
        )
        for seed in args.seeds:
            for arm in arms:
                spec = validate_job(job(args, workdir, ARMS[arm], seed, f"{arm}-s{seed}"))
                summary = run_training(spec).summary
                if arm == "plain" and args.interpolate:
                    result["runs"] += interpolated(args, spec, summary, seed)
                if arm.startswith("plain") and args.early_stop_every:
                    result["runs"].append(early_stopped(arm, summary, seed))
                shutil.rmtree(summary["run_dir"], ignore_errors=True)
                m = summary["metrics"]
                run = {
                    "arm": arm,
                    "seed": seed,
                    "exact_match": m["eval/exact_match"],
                    "eval_loss": m["eval/loss"],
                    "forgetting": m["eval/forgetting"],
                    "drift_l2": m.get("train/drift_l2"),
                    "load_avg_1m": os.getloadavg()[0],
                }
                result["runs"].append(run)
                print(
                    f"seed {seed} {arm:<15} exact {run['exact_match']:.3f} loss {run['eval_loss']:.4f} forgetting {run['forgetting']:+.4f}"
                )
                write_json(args.out, result)
        interp = [f"interp-{a:g}" for a in args.interpolate]
        early = [f"early-{a}" for a in arms if a.startswith("plain") and args.early_stop_every]
        result["arms"] = summarise(result, arms + interp + early)
        result["verdict"] = verdict(result)
        result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
        write_json(args.out, result)
        plot(result, args.out.with_suffix(".png"))
        for line in result["verdict"]:
            print(line)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def early_stopped(arm: str, summary: dict[str, Any], seed: int) -> dict[str, Any]:
    """The plain run stopped at its evaluation with the lowest validation loss (what early
    stopping on the validation set would have kept), with that evaluation's metrics."""
    from tether.train.checkpoint import checkpoints, read_state

    evaluated = [read_state(c)["metrics"] for c in checkpoints(summary["run_dir"])]
    best = min(evaluated, key=lambda m: m["eval/loss"])
    run = {
        "arm": f"early-{arm}",
        "seed": seed,
        "exact_match": best["eval/exact_match"],
        "eval_loss": best["eval/loss"],
        "forgetting": best["eval/forgetting"],
        "drift_l2": None,
        "stopped_at_step": best["step"],
        "load_avg_1m": os.getloadavg()[0],
    }
    print(
        f"seed {seed} {run['arm']:<15} exact {run['exact_match']:.3f} loss {run['eval_loss']:.4f} "
        f"forgetting {run['forgetting']:+.4f} (step {best['step']} of {evaluated[-1]['step']})"
    )
    return run


def interpolated(args, spec, summary: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """θ(α) = θ* + α(θ_plain − θ*) of this plain run, scored like a trained arm."""
    from tether.interpolate import score_curve

    curve, _, _ = score_curve(spec, Path(summary["model_dir"]), args.interpolate)
    runs = []
    for alpha, m in zip(curve.alphas, curve.metrics, strict=True):
        runs.append(
            {
                "arm": f"interp-{alpha:g}",
                "seed": seed,
                "exact_match": m["eval/exact_match"],
                "eval_loss": m["eval/loss"],
                "forgetting": m["eval/forgetting"],
                "drift_l2": None,
                "load_avg_1m": os.getloadavg()[0],
            }
        )
        print(
            f"seed {seed} {runs[-1]['arm']:<15} exact {m['eval/exact_match']:.3f} "
            f"loss {m['eval/loss']:.4f} forgetting {m['eval/forgetting']:+.4f}"
        )
    return runs


def summarise(result: dict[str, Any], arms: list[str]) -> dict[str, Any]:
    out = {}
    for arm in arms:
        runs = [r for r in result["runs"] if r["arm"] == arm]
        out[arm] = {
            k: mean_std([r[k] for r in runs]) for k in ("exact_match", "eval_loss", "forgetting")
        }
    return out


def verdict(result: dict[str, Any]) -> list[str]:
    arms, base = result["arms"], result["theta_star"]
    if "plain" not in arms:
        return ["no plain arm: nothing to compare against"]
    plain_gain = arms["plain"]["exact_match"][0] - base["eval/exact_match"]
    plain_forgetting = arms["plain"]["forgetting"][0]
    lines = [
        f"plain: task gain {plain_gain:+.3f} exact match over θ*, forgetting {plain_forgetting:+.4f}"
    ]
    passing = []
    for arm, s in arms.items():
        if arm == "plain" or arm.startswith("interp-"):
            continue
        gain = s["exact_match"][0] - base["eval/exact_match"]
        keeps = gain >= 0.95 * plain_gain if plain_gain > 0 else gain >= plain_gain
        halves = s["forgetting"][0] <= 0.5 * plain_forgetting
        lines.append(
            f"{arm}: gain {gain:+.3f} ({'≥' if keeps else '<'} 95% of plain's), forgetting "
            f"{s['forgetting'][0]:+.4f} ± {s['forgetting'][1]:.4f} ({'≤' if halves else '>'} half of plain's)"
        )
        if keeps and halves:
            passing.append(arm)
    lines.append(
        "pass rule (≥ 95% of plain's task gain with ≤ half its forgetting): "
        + (f"met by {', '.join(passing)}" if passing else "met by no arm")
    )
    interp = {a: s for a, s in arms.items() if a.startswith("interp-")}
    for arm in passing:  # the cheap alternative: does interpolation do as well at equal gain?
        gain = arms[arm]["exact_match"][0]
        rivals = [a for a, s in interp.items() if s["exact_match"][0] >= gain]
        beaten = [a for a in rivals if interp[a]["forgetting"][0] > arms[arm]["forgetting"][0]]
        lines.append(
            f"{arm} vs interpolation at ≥ its task score: "
            + (
                f"less forgetting than {', '.join(beaten)}"
                + (
                    ""
                    if beaten == rivals
                    else f"; not than {', '.join(sorted(set(rivals) - set(beaten)))}"
                )
                if rivals
                else "no interpolated model reaches its task score"
            )
        )
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm, s in result["arms"].items():
        (f, fs), (e, es) = s["forgetting"], s["exact_match"]
        ax.errorbar(
            f,
            e,
            xerr=fs,
            yerr=es,
            fmt="o",
            capsize=3,
            label=arm,
            color="black" if arm == "plain" else None,
        )
    base = result["theta_star"]
    ax.scatter([0.0], [base["eval/exact_match"]], marker="*", s=120, color="gray", label="θ*")
    ax.set_xlabel("eval/forgetting (NLL of θ*'s probe answers − θ*'s; lower is better)")
    ax.set_ylabel("eval/exact_match (task)")
    ax.set_title("SmolLM2 chat SFT: task vs forgetting (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    raise SystemExit(main())
