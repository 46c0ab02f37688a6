"""LoRA (r = 8, 16) vs full fine-tuning of SmolLM2 on chat SFT: cost, task and forgetting.

    .venv/bin/python benchmarks/lora_vs_full.py --quick    # 2 arms, 32 chats (~6 min)
    .venv/bin/python benchmarks/lora_vs_full.py            # 7 arms, seed 0 (~40 min)
    .venv/bin/python benchmarks/lora_vs_full.py --timing   # s/step and peak RSS only (~8 min)

Same task, data, steps and schedule as benchmarks/forgetting_study.py (the packaged
SmolLM2-135M-Instruct on tether's synthetic chats, 256 chats × 2 epochs, batch 16), one arm per
run, each in its own process so its peak resident memory (ru_maxrss) is its own:

    full-plain         full fine-tuning, λ = 0, lr 2e-4 (the forgetting study's plain arm)
    full-coupled-0.1   full fine-tuning, coupled λ = 0.1 (the study's best-kept-gain arm)
    lora{r}-plain      LoRA on every linear layer but the LM head, alpha = 2r, λ = 0, lr 1e-3
    lora{r}-coupled-*  the same with the exact anchor λ‖(alpha/r)·B·A‖² (coupled)

LoRA's lr is 5× full FT's, the usual practice (its factors start at B = 0 and move only
within rank r); both are fixed, not tuned per arm. Reported per arm: trainable parameters,
seconds per optimizer step (from the loop's samples/s over the training phase), peak RSS of the
run's process, eval/exact_match, eval/loss, eval/forgetting (NLL of θ*'s own probe answers
minus θ*'s) and the drift ‖θ − θ*‖ of the exported (merged) weights from the base's. The
forgetting study's 3-seed numbers for full fine-tuning are printed beside them when its JSON is present.
Writes benchmarks/results/lora_vs_full.json (--quick: lora_vs_full_quick.json).

--timing measures cost alone, for a quiet machine: every arm runs --timing-steps optimizer
steps with no evaluation, one process per arm, and the table (s/step, peak RSS, load average)
is added to the JSON under "timing" (the quality runs' own s/step are kept but flagged by
their load average: they can share the machine with other work).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import RESULTS, apply_quick, exit_on_sigterm, machine_info, quiet_libraries, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL_LR, LORA_LR = 2e-4, 1e-3
ARMS: dict[str, dict[str, Any]] = {
    "full-plain": {"adapter": None, "lambda": 0.0},
    "full-coupled-0.1": {"adapter": None, "lambda": 0.1},
    "lora8-plain": {"adapter": 8, "lambda": 0.0},
    "lora8-coupled-0.1": {"adapter": 8, "lambda": 0.1},
    "lora8-coupled-10": {"adapter": 8, "lambda": 10.0},
    "lora16-plain": {"adapter": 16, "lambda": 0.0},
    "lora16-coupled-0.1": {"adapter": 16, "lambda": 0.1},
}
QUICK = {"arms": "full-plain,lora8-plain", "examples": 32, "epochs": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--examples", type=int, default=256, help="training chats")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timing", action="store_true", help="cost only: no evaluation")
    p.add_argument("--timing-steps", type=int, default=8)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this arm in this process
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def job(args, arm: str) -> dict[str, Any]:
    settings = ARMS[arm]
    r = settings["adapter"]
    model: dict[str, Any] = {"name": "packaged:SmolLM2-135M-Instruct", "task": "causal-lm"}
    if r is not None:
        model["adapter"] = {"type": "lora", "r": r, "alpha": 2.0 * r}
    train_extra = {"max_steps": args.timing_steps} if args.timing else {}
    evaluation = (
        {"generate_examples": 0, "samples": 0, "forgetting_probe": "none"}
        if args.timing
        else {
            "generate_examples": 48,
            "max_new_tokens": 8,
            "samples": 0,
            "forgetting_probe": "builtin",
        }
    )
    return {
        "name": "lora-vs-full",
        "model": model,
        "data": {
            "train": "synthetic:chat",
            "max_train_samples": args.examples,
            "max_validation_samples": 48,
            "max_length": 128,
            "sample_seed": args.seed,
        },
        "objective": {"lambda": settings["lambda"], "mode": "coupled"},
        "optim": {"lr": FULL_LR if r is None else LORA_LR, "warmup_ratio": 0.1},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "eval_interval": 10_000,
            "seed": args.seed,
            "num_threads": args.threads,
            "keep_checkpoints": 1,
        }
        | train_extra,
        "eval": evaluation,
        "scaling": {"num_workers": 0},
        "tracking": {"enabled": False},
        "storage": {"path": str(args.workdir / "runs"), "run_name": f"{arm}-s{args.seed}"},
    }


def run_one(args) -> dict[str, Any]:
    """One arm in this process: train, then count what it trained; the peak RSS is ours."""
    import torch

    from tether.config import validate_job
    from tether.models import resolve_model_source
    from tether.run import run_training
    from tether.tasks import build_task
    from tether.train.setup import build_model

    torch.set_num_threads(args.threads)
    spec = validate_job(job(args, args.one))
    summary = run_training(spec).summary
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the checks
    source = resolve_model_source(spec.model.name)
    drift = merged_drift(Path(summary["model_dir"]), Path(source))
    shutil.rmtree(summary["run_dir"], ignore_errors=True)
    m = summary["metrics"]
    model, _ = build_model(spec, build_task(spec), source)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.timing:
        return {
            "arm": args.one,
            "steps": args.timing_steps,
            "s_per_step": args.batch_size / m["train/samples_per_s"],
            "peak_rss_mb": peak_rss_mb,
            "trainable_params": trainable,
            "load_avg_1m": os.getloadavg()[0],
        }
    return {
        "arm": args.one,
        "seed": args.seed,
        "trainable_params": trainable,
        "s_per_step": args.batch_size / m["train/samples_per_s"],
        "peak_rss_mb": peak_rss_mb,
        "exact_match": m["eval/exact_match"],
        "eval_loss": m["eval/loss"],
        "forgetting": m["eval/forgetting"],
        "drift_l2": drift,
        "load_avg_1m": os.getloadavg()[0],
    }


def merged_drift(model_dir: Path, base_dir: Path) -> float:
    """‖θ − θ*‖ over every weight, from the exported (merged) model and the base it started
    from: the same number for full fine-tuning and LoRA, whatever the loop logged."""
    import torch
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out |= load_file(file)
        return out

    tuned, base = weights(model_dir), weights(base_dir)
    total = sum(
        float((tuned[k].double() - base[k].double()).pow(2).sum()) for k in base if k in tuned
    )
    return total**0.5


def run_arm(args, arm: str) -> dict[str, Any]:
    """The arm in a child process (its own ru_maxrss); its last stdout line is the JSON."""
    cmd = [sys.executable, __file__, "--one", arm, "--workdir", str(args.workdir)]
    cmd += ["--seed", str(args.seed), "--examples", str(args.examples)]
    cmd += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    cmd += ["--threads", str(args.threads)] + (["--verbose"] if args.verbose else [])
    cmd += ["--timing", "--timing-steps", str(args.timing_steps)] if args.timing else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"arm {arm} failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def full_ft_study() -> dict[str, Any] | None:
    """The forgetting study's 3-seed full fine-tuning numbers, when it has been run."""
    path = RESULTS / "forgetting_study.json"
    if not path.exists():
        return None
    study = json.loads(path.read_text())
    return {
        "seeds": study["settings"]["seeds"],
        "theta_star": study["theta_star"],
        "arms": {a: study["arms"][a] for a in ("plain", "coupled-0.1") if a in study["arms"]},
    }


def table(runs: list[dict[str, Any]]) -> list[str]:
    head = f"{'arm':<20}{'trainable':>12}{'s/step':>8}{'peak RSS':>10}{'exact':>7}{'loss':>8}{'forget':>9}{'drift':>8}"
    lines = [head]
    for r in runs:
        drift = f"{r['drift_l2']:.3f}"
        lines.append(
            f"{r['arm']:<20}{r['trainable_params']:>12,}{r['s_per_step']:>8.2f}"
            f"{r['peak_rss_mb']:>8.0f}MB{r['exact_match']:>7.3f}{r['eval_loss']:>8.4f}"
            f"{r['forgetting']:>+9.4f}{drift:>8}"
        )
    return lines


def timing(args) -> int:
    """Cost alone, every arm in its own process, added to the JSON under "timing"."""
    args.workdir = Path(tempfile.mkdtemp(prefix="tether-lora-"))
    runs = []
    try:
        for arm in args.arms.split(","):
            runs.append(run_arm(args, arm))
            r = runs[-1]
            print(
                f"{arm:<20}{r['s_per_step']:>8.2f} s/step{r['peak_rss_mb']:>8.0f} MB "
                f"load {r['load_avg_1m']:.2f}",
                flush=True,
            )
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["timing"] = {"machine": machine_info(threads=args.threads), "runs": runs}
    result["timing"]["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    write_json(args.out, result)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        quiet_libraries(args.verbose)
        print(json.dumps(run_one(args)))
        return 0
    apply_quick(args, QUICK, "lora_vs_full")
    exit_on_sigterm()
    if args.timing:
        return timing(args)
    args.workdir = Path(tempfile.mkdtemp(prefix="tether-lora-"))
    result: dict[str, Any] = {
        "machine": machine_info(threads=args.threads),
        "settings": vars(args) | {"out": str(args.out), "workdir": None},
        "lr": {"full": FULL_LR, "lora": LORA_LR},
        "runs": [],
        "forgetting_study_full_ft": full_ft_study(),
    }
    try:
        for arm in args.arms.split(","):
            result["runs"].append(run_arm(args, arm))
            print(table(result["runs"])[-1], flush=True)
            write_json(args.out, result)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    write_json(args.out, result)
    print("\n".join(table(result["runs"])))
    return 0


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    raise SystemExit(main())
