"""Does the anchor buy retention on an encoder? MiniLM on SST-2: task vs kept sentence embeddings.

    .venv/bin/python benchmarks/anchor_strength_study.py           # n=1000, 3 seeds, 10 arms (~30–40 min, 2 cores)
    .venv/bin/python benchmarks/anchor_strength_study.py --quick   # smoke run: n=64, 1 seed, 1 epoch, κ=1 only
    .venv/bin/python benchmarks/anchor_strength_study.py --add-clip-arm results/anchor_strength_study.json
    .venv/bin/python benchmarks/anchor_strength_study.py --help    # --n --seeds --epochs --plain-lrs --strengths ...

Part 1 of the anchor strength study. The packaged all-MiniLM-L6-v2 (θ*) is fine-tuned for
SST-2 (sequence classification) on n sampled training sentences (``data.max_train_samples``,
``data.sample_seed`` = the seed) with a validation split carved from them
(``data.validation_fraction``); fixed epochs and batch, the same data, order and schedule for
every arm of a seed. Every run is tether's own loop in this process (``run_training``,
``scaling.num_workers=0``). Arms, per seed:

    plain          λ = 0 at the lr from --plain-lrs with the best final validation accuracy
    early-stop     plain's winner at its best-validation evaluation instead of its last one
                   (no extra training: its checkpoint re-exported with tether.run.export_checkpoint)
    interp-α       θ(α) = θ* + α(θ − θ*) toward plain's winner, α ∈ --alphas, the trained head
                   kept (tether.interpolate's interpolation_pairs / set_alpha / export_alpha)
    kappa-κ        decoupled anchor, objective.strength κ ∈ --strengths (λ = κ/Σ lr_t: a
                   displacement the data stops pushing shrinks by ≈ e^(−κ) over the run)
    coupled        grad += 2λ(θ − θ*), λ from --coupled-lambdas picked on validation accuracy
    coupled-clip-fine  the same λ and lr with objective.clip: fine_only (the data's gradient is
                   clipped alone, the anchor's added after): the pair measures the clipping order
    lp-ft          train.head_warmup_steps = one epoch's steps (head only), then plain (λ = 0)

All trained arms use the plain winner's lr. Selection uses the carved validation split only;
the SST-2 dev set (872 sentences) only scores. Per arm and seed:

    dev accuracy   on the SST-2 dev set (tether's served-model predictor)
    retention@k    θ*'s neighbourhood structure kept, from θ* alone (no labels): a fixed probe of
                   --probe-sentences CoNLL-2003 sentences (news, not sentiment: the first distinct
                   ones of dev.txt, words joined by spaces) embedded by the ENCODER (mean of the
                   attention-masked last hidden states) of θ* and of the model; retention =
                   mean over sentences of |kNN_k(θ) ∩ kNN_k(θ*)| / k under cosine similarity.
                   θ* scores 1.0 by construction (asserted; also through the α = 0 export)
    CKA            linear CKA between the two embedding matrices, a second view of the same
    drift          ‖θ − θ*‖ over the encoder's weights (the head has no θ*)

Task gain = dev accuracy − 0.5: θ* with a fresh head is chance, so its gain is 0 by definition
(the dev set is 51 % positive). Forgetting = 1 − retention@k. Summary: mean ± std over seeds per
arm and, against plain, the paired verdicts of _common.verdict on accuracy and on retention.

Pass rule (on the means over seeds), stated before any number was seen: the anchor PAYS if some
κ arm (1) keeps ≥ 95 % of plain's task gain, (2) with ≤ half of plain's forgetting, and (3) has
lower forgetting than every early-stop / interp-α arm whose task gain is ≥ its own (the free
alternatives, at equal or better task, must not retain as much). If (1) and (2) hold for some κ
but (3) fails for all of them, the verdict is "λ is a retention dial, not an improvement". The
coupled and lp-ft arms are reported, not judged.

Writes benchmarks/results/anchor_strength_study.json after every seed (--quick: *_quick.json)
and a Pareto plot (dev accuracy vs retention, mean ± std per arm) beside it as .png.
Data: ../shared/data/sst2/{train,dev}.tsv and ../shared/data/conll2003/dev.txt; without SST-2,
tether's synthetic:sentiment data (as anchoring_quality.py), without CoNLL, distinct sentences of
tether's synthetic:entities news templates as the probe: both said in the output and the JSON,
a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    apply_quick,
    exit_on_sigterm,
    machine_info,
    quiet_libraries,
    verdict,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fix torch's threads ourselves
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from anchoring_quality import (  # noqa: E402
    data_files,
    discard,
    floats,
    ints,
    load_dev,
    score_on_dev,
    select,
)
from tether.config import validate_job  # noqa: E402
from tether.data import steps_per_epoch  # noqa: E402
from tether.interpolate import export_alpha, interpolation_pairs, set_alpha  # noqa: E402
from tether.models import resolve_model_source  # noqa: E402
from tether.run import export_checkpoint, prepare_run_data, run_training  # noqa: E402
from tether.synthetic import entity_examples  # noqa: E402
from tether.train.checkpoint import checkpoints, read_state  # noqa: E402

MODEL = "packaged:all-MiniLM-L6-v2"
LABEL_NAMES = ["negative", "positive"]
CHANCE = 0.5  # θ* with a fresh head: the task gain every arm is measured from
SHARED = REPO.parent / "shared" / "data"
PLAIN = {"lambda": 0.0, "mode": "coupled"}
METRICS = ("dev_accuracy", "task_gain", "retention_at_k", "forgetting", "cka", "drift_l2")
RULE = (
    "the anchor pays if some κ keeps ≥ 95% of plain's task gain (dev acc − 0.5) with ≤ half "
    "plain's forgetting (1 − retention@k) AND has lower forgetting than every early-stop / "
    "interp-α arm whose task gain is ≥ its own; if only the first part holds: 'λ is a "
    "retention dial, not an improvement' (means over seeds)"
)
QUICK = {
    "n": 64,
    "seeds": [0],
    "epochs": 1,
    "plain_lrs": [5e-5],
    "coupled_lambdas": [1e-2],
    "strengths": [1.0],  # the quick run has 2 steps: a larger κ would be refused
    "probe_sentences": 100,
}


# --------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="SST-2 training sentences (before carve)")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="data (and training) seeds")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, every arm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--plain-lrs", type=floats, default=[2e-5, 5e-5, 1e-4], help="plain's lr grid")
    p.add_argument("--coupled-lambdas", type=floats, default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--strengths", type=floats, default=[1.0, 3.0, 10.0], help="decoupled κ")
    p.add_argument("--alphas", type=floats, default=[0.25, 0.5, 0.75], help="interpolation α")
    p.add_argument(
        "--evals-per-epoch",
        type=int,
        default=4,
        help="plain runs' validation evaluations (and checkpoints) per epoch: early-stop's choice",
    )
    p.add_argument("--probe-sentences", type=int, default=500, help="CoNLL sentences for retention")
    p.add_argument("--knn", type=int, default=10, help="k of retention@k")
    p.add_argument("--new-param-lr-scale", type=float, default=10.0, help="head lr multiplier")
    p.add_argument("--validation-fraction", type=float, default=0.2, help="carved from the n")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--data-dir", type=Path, default=SHARED / "sst2", help="train.tsv, dev.tsv")
    p.add_argument("--conll-dir", type=Path, default=SHARED / "conll2003", help="dev.txt")
    p.add_argument("--workdir", type=Path, help="runs and checkpoints (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="library INFO logs")
    p.add_argument(
        "--out", type=Path, help="JSON path (default results/anchor_strength_study.json)"
    )
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument(
        "--add-clip-arm",
        type=Path,
        metavar="JSON",
        help=f"only run the {CLIP_ARM} arm for the seeds of an existing result and update it",
    )
    args = p.parse_args(argv)
    apply_quick(args, QUICK, "anchor_strength_study")
    if not (args.seeds and args.plain_lrs and args.coupled_lambdas and args.strengths):
        p.error("need --seeds, --plain-lrs, --coupled-lambdas and --strengths")
    if args.epochs < 1 or args.evals_per_epoch < 1 or args.knn < 1:
        p.error("--epochs, --evals-per-epoch and --knn must be >= 1")
    if args.probe_sentences <= args.knn:
        p.error("--probe-sentences must exceed --knn")
    if any(not 0.0 < a < 1.0 for a in args.alphas):
        p.error("--alphas: each α strictly between 0 (θ*) and 1 (plain)")
    return args


CLIP_ARM = "coupled-clip-fine"  # coupled at its selected λ, clipping the data's gradient alone


def arm_names(args: argparse.Namespace) -> list[str]:
    """Every arm in table order: the control, its free alternatives, then the anchored ones."""
    return [
        "plain",
        "early-stop",
        *(f"interp-{a:g}" for a in args.alphas),
        *(f"kappa-{k:g}" for k in args.strengths),
        "coupled",
        CLIP_ARM,
        "lp-ft",
    ]


# --------------------------------------------------------------------------- the probe


@dataclass
class Probe:
    sentences: list[str]
    note: str
    synthetic: bool


def conll_sentences(path: Path) -> Iterator[str]:
    """CoNLL-2003 sentences: the first column's words, joined by spaces."""
    words: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == "-DOCSTART-":
                continue
            if parts:
                words.append(parts[0])
            elif words:
                yield " ".join(words)
                words = []
    if words:
        yield " ".join(words)


def first_distinct(sentences: Iterator[str], k: int) -> list[str]:
    """A repeated sentence (news has bylines and score lines) is its own nearest neighbour in
    every model: it would count as retained whatever the model did, so each text counts once."""
    kept: dict[str, None] = {}
    for s in sentences:
        kept.setdefault(s)
        if len(kept) == k:
            break
    return list(kept)


def probe_sentences(conll_dir: Path, k: int) -> Probe:
    dev = conll_dir / "dev.txt"
    if dev.is_file():
        sentences = first_distinct(conll_sentences(dev), k)
        return Probe(
            sentences, f"probe: the first {len(sentences)} distinct sentences of {dev}", False
        )
    examples = entity_examples("validation", 50 * k)  # templates repeat: draw many, keep distinct
    sentences = first_distinct((" ".join(e["tokens"]) for e in examples), k)
    note = (
        f"CoNLL-2003 not found in {conll_dir}: the probe is {len(sentences)} SYNTHETIC "
        "sentences (synthetic:entities news templates); a smoke test, not a measurement"
    )
    return Probe(sentences, note, True)


# --------------------------------------------------------------------------- retention


@dataclass
class Reference:
    """θ*'s side of every retention score, computed once."""

    sentences: list[str]
    tokenizer: Any
    encoder_params: dict[str, torch.Tensor]
    embeddings: np.ndarray
    neighbours: np.ndarray


def load_encoder(folder: str) -> torch.nn.Module:
    """The encoder (BertModel) of a base folder or of an exported classifier: AutoModel drops
    the head. A weight it had to initialise would make every score meaningless: refused."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, output_loading_info=True
    )
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in info.get("missing_keys", ()) if k in params]
    if missing:
        raise RuntimeError(f"{folder}: encoder weights missing from the checkpoint: {missing[:4]}")
    return model.eval()


@torch.no_grad()
def embed(encoder: torch.nn.Module, tokenizer, sentences: list[str], max_length: int) -> np.ndarray:
    """Mean of the last hidden states over real tokens (the mask keeps padding out), float64.
    Same batches for every model, so θ* against its own export is bit for bit the same."""
    out = []
    for i in range(0, len(sentences), 64):
        batch = tokenizer(
            sentences[i : i + 64],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).numpy())
    return np.concatenate(out).astype(np.float64)


def neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Each sentence's k nearest others by cosine similarity (itself excluded)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def retention(mine: np.ndarray, theirs: np.ndarray) -> float:
    """Mean over sentences of |kNN(θ) ∩ kNN(θ*)| / k."""
    k = mine.shape[1]
    return statistics.fmean(len(set(a) & set(b)) / k for a, b in zip(mine, theirs, strict=True))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centred embeddings: 1 = the same geometry up to
    rotation and scale."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def drift_l2(encoder: torch.nn.Module, star: dict[str, torch.Tensor]) -> float:
    """‖θ − θ*‖ over every encoder weight, in float64."""
    total = 0.0
    for name, p in encoder.named_parameters():
        if name not in star or star[name].shape != p.shape:
            raise RuntimeError(f"encoder parameter {name} has no θ* of its shape")
        total += float((p.detach().double() - star[name].double()).pow(2).sum())
    return math.sqrt(total)


def theta_star_reference(sentences: list[str], args: argparse.Namespace) -> Reference:
    from transformers import AutoTokenizer

    source = resolve_model_source(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(source)
    encoder = load_encoder(source)
    emb = embed(encoder, tokenizer, sentences, args.max_length)
    ref = Reference(
        sentences,
        tokenizer,
        {n: p.detach().clone() for n, p in encoder.named_parameters()},
        emb,
        neighbours(emb, args.knn),
    )
    # the score's fixed point: θ* against itself keeps everything
    assert retention(neighbours(emb, args.knn), ref.neighbours) == 1.0
    assert abs(linear_cka(emb, emb) - 1.0) < 1e-9
    return ref


def encoder_scores(model_dir: str, ref: Reference, args: argparse.Namespace) -> dict[str, float]:
    encoder = load_encoder(model_dir)
    emb = embed(encoder, ref.tokenizer, ref.sentences, args.max_length)
    return {
        "retention_at_k": retention(neighbours(emb, args.knn), ref.neighbours),
        "cka": linear_cka(emb, ref.embeddings),
        "drift_l2": drift_l2(encoder, ref.encoder_params),
    }


def score_model(model_dir: str | Path, dev, ref: Reference, args) -> dict[str, float]:
    """An exported model folder's task (dev accuracy) and retention numbers."""
    scores = {"dev_accuracy": score_on_dev(str(model_dir), dev)}
    scores |= encoder_scores(str(model_dir), ref, args)
    scores["task_gain"] = scores["dev_accuracy"] - CHANCE
    scores["forgetting"] = 1.0 - scores["retention_at_k"]
    scores["load_avg_1m"] = os.getloadavg()[0]
    return scores


def check_alpha_zero(model_dir: Path, ref: Reference, args: argparse.Namespace) -> None:
    """θ(0) is θ*'s encoder with plain's head: through export, reload and embedding it must
    score as θ* (this checks the whole retention path, not only the formula)."""
    s = encoder_scores(str(model_dir), ref, args)
    if s["drift_l2"] > 1e-6 or s["retention_at_k"] < 0.998 or s["cka"] < 0.9999:
        raise AssertionError(f"θ(α=0) should score as θ* (retention 1, drift 0), got {s}")


# --------------------------------------------------------------------------- one run


def job(args: argparse.Namespace, train: Path, workdir: Path, seed: int) -> dict:
    """The tether job for one seed; objective, lr and evaluation are set per run."""
    return {
        "name": "anchor-strength",
        "model": {"name": MODEL, "label_names": LABEL_NAMES},
        "data": {
            "train": str(train),
            "text_column": "sentence",
            "max_train_samples": args.n,
            "sample_seed": seed,
            "validation_fraction": args.validation_fraction,
            "max_length": args.max_length,
            "group_by_length": True,
        },
        "optim": {"new_param_lr_scale": args.new_param_lr_scale},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": seed,
            "num_threads": args.threads,
            # one evaluation (and checkpoint), after the last step; only plain evaluates more
            # often. Evaluating consumes no randomness, so it does not change the trajectory
            "eval_interval": 10**9,
        },
        "scaling": {"num_workers": 0},  # local mode: the loop runs in this process
        "tracking": {"enabled": False},
        "storage": {"path": str(workdir / "runs")},
    }


@dataclass
class Trial:
    arm: str
    seed: int
    lr: float
    objective: dict[str, Any]
    head_warmup_steps: int
    lam: float  # λ as run: derived from κ for the decoupled arms
    steps: int
    val_accuracy: float
    val_loss: float
    samples_per_s: float  # over the last evaluation interval
    wall_s: float
    model_dir: str | None
    run_dir: str
    checkpoint: str | None


def run_trial(
    base: dict,
    prepared: tuple,
    arm: str,
    lr: float,
    objective: dict[str, Any],
    head_warmup_steps: int = 0,
    eval_interval: int | None = None,
) -> Trial:
    """Train once with tether's loop; validation metrics come from the carved split.
    ``eval_interval``: evaluate (and keep a checkpoint) that often, every one kept."""
    seed = base["train"]["seed"]
    train = base["train"] | {"head_warmup_steps": head_warmup_steps}
    if eval_interval is not None:
        train |= {"eval_interval": eval_interval, "keep_checkpoints": 10**6}
    raw = base | {
        "objective": objective,
        "optim": base["optim"] | {"lr": lr},
        "train": train,
        # a reused name would resume: the arm and lr name the run
        "storage": base["storage"] | {"run_name": f"s{seed}-{arm}-lr{lr:g}"},
    }
    t0 = time.perf_counter()
    summary = run_training(validate_job(raw), prepared=prepared).summary
    m = summary["metrics"]
    return Trial(
        arm=arm,
        seed=seed,
        lr=lr,
        objective=objective,
        head_warmup_steps=head_warmup_steps,
        lam=summary["objective"]["lambda"],
        steps=int(summary["step"]),
        val_accuracy=m["eval/accuracy"],
        val_loss=m["eval/loss"],
        samples_per_s=m["train/samples_per_s"],
        wall_s=time.perf_counter() - t0,
        model_dir=summary["model_dir"],
        run_dir=summary["run_dir"],
        checkpoint=summary["checkpoint"],
    )


def show_trial(t: Trial) -> None:
    print(
        f"    {t.arm:<12} lr={t.lr:<6g} λ={t.lam:<8.3g}: val acc {t.val_accuracy:.3f}, "
        f"loss {t.val_loss:.3f} ({t.steps} steps, {t.wall_s:.0f} s)",
        flush=True,
    )


def best_validation_checkpoint(run_dir: str) -> tuple[Path, dict[str, Any]]:
    """The evaluation with the highest validation accuracy (then lower loss, then the earlier
    step: early stopping stops at the first best)."""
    found = [(p, read_state(p)["metrics"]) for p in checkpoints(Path(run_dir))]
    return max(found, key=lambda c: (c[1]["eval/accuracy"], -c[1]["eval/loss"], -c[1]["step"]))


def interpolated_models(task, tuned_dir: str, alphas: list[float], out: Path) -> dict[float, Path]:
    """θ(α) = θ* + α(θ − θ*) as model folders, with tether.interpolate's own pieces: every
    pretrained weight interpolated, the trained head kept at every α."""
    folder = Path(tuned_dir)
    tuned = task.load_model(str(folder), None, False).model.eval()
    base = task.load_model(resolve_model_source(MODEL), None, False)
    pairs = interpolation_pairs(tuned, base.model, base.new_param_names)
    del base
    tokenizer = task.load_tokenizer(str(folder), None, False)
    folders = {}
    for alpha in alphas:
        set_alpha(pairs, alpha)
        folders[alpha] = export_alpha(folder, tuned, tokenizer, alpha, {}, out / f"alpha-{alpha:g}")
    return folders


# --------------------------------------------------------------------------- one seed


def run_seed(
    args: argparse.Namespace, base: dict, dev, ref: Reference, workdir: Path
) -> dict[str, dict[str, Any]]:
    """Every arm for one seed: plain first (its lr and weights feed the others)."""
    prepared = prepare_run_data(validate_job(base))  # tokenized once for every run of the seed
    task, data = prepared
    per_epoch = steps_per_epoch(len(data.train), args.batch_size, 1, 1)
    eval_interval = max(1, per_epoch // args.evals_per_epoch)
    print(
        f"  {len(data.train)} train / {len(data.validation)} validation, {per_epoch} steps per "
        f"epoch × {args.epochs}; plain evaluates every {eval_interval} steps",
        flush=True,
    )
    seed = base["train"]["seed"]
    arms: dict[str, dict[str, Any]] = {}

    def record(arm: str, model_dir, selected: dict[str, Any], trials: list[Trial]) -> None:
        scores = score_model(model_dir, dev, ref, args)
        arms[arm] = {"arm": arm, "seed": seed, **scores, "selected": selected}
        arms[arm]["trials"] = [asdict(t) for t in trials]
        print(
            f"  {arm:<12} dev acc {scores['dev_accuracy']:.4f}  retention@{args.knn} "
            f"{scores['retention_at_k']:.3f}  CKA {scores['cka']:.4f}  drift "
            f"{scores['drift_l2']:.3f}  ({', '.join(f'{k} {v:g}' for k, v in selected.items())})",
            flush=True,
        )

    plain_trials = []
    for lr in args.plain_lrs:
        plain_trials.append(run_trial(base, prepared, "plain", lr, PLAIN, 0, eval_interval))
        show_trial(plain_trials[-1])
    winner = select(plain_trials)
    discard([t for t in plain_trials if t is not winner])
    lr = winner.lr
    record("plain", winner.model_dir, {"lr": lr, "val_accuracy": winner.val_accuracy}, plain_trials)

    exports = workdir / f"exports-s{seed}"
    checkpoint, metrics = best_validation_checkpoint(winner.run_dir)
    spec = validate_job(yaml.safe_load((Path(winner.model_dir) / "job.yaml").read_text()))
    early = export_checkpoint(spec, task, checkpoint, exports / "early-stop")
    step = int(metrics["step"])
    record(
        "early-stop",
        early,
        {
            "lr": lr,
            "step": step,
            "of_steps": winner.steps,
            "val_accuracy": metrics["eval/accuracy"],
        },
        [],
    )

    folders = interpolated_models(task, winner.model_dir, [0.0, *args.alphas], exports)
    check_alpha_zero(folders[0.0], ref, args)
    for alpha in args.alphas:
        record(f"interp-{alpha:g}", folders[alpha], {"lr": lr, "alpha": alpha}, [])
    discard([winner])
    shutil.rmtree(exports, ignore_errors=True)

    for kappa in args.strengths:
        arm = f"kappa-{kappa:g}"
        t = run_trial(base, prepared, arm, lr, {"mode": "decoupled", "strength": kappa})
        show_trial(t)
        record(arm, t.model_dir, {"lr": lr, "strength": kappa, "lambda": t.lam}, [t])
        discard([t])

    coupled = []
    for lam in args.coupled_lambdas:
        name = f"coupled-{lam:g}"  # each λ its own run folder
        coupled.append(run_trial(base, prepared, name, lr, {"lambda": lam, "mode": "coupled"}))
        show_trial(coupled[-1])
    best = select(coupled)
    selected = {"lr": lr, "lambda": best.lam, "val_accuracy": best.val_accuracy}
    record("coupled", best.model_dir, selected, coupled)
    discard(coupled)

    t = run_clip_arm(base, prepared, lr, best.lam)
    record(CLIP_ARM, t.model_dir, {"lr": lr, "lambda": best.lam, "clip": "fine_only"}, [t])
    discard([t])

    t = run_trial(base, prepared, "lp-ft", lr, PLAIN, head_warmup_steps=per_epoch)
    show_trial(t)
    record("lp-ft", t.model_dir, {"lr": lr, "head_warmup_steps": per_epoch}, [t])
    discard([t])
    return arms


def run_clip_arm(base: dict, prepared: tuple, lr: float, lam: float) -> Trial:
    """objective.clip: fine_only at the coupled arm's λ and lr: the same run but for the order
    of clipping and adding 2λ(θ − θ*), so the pair measures the clipping order alone."""
    objective = {"lambda": lam, "mode": "coupled", "clip": "fine_only"}
    t = run_trial(base, prepared, CLIP_ARM, lr, objective)
    show_trial(t)
    return t


def add_clip_arm(args: argparse.Namespace, path: Path, workdir: Path) -> int:
    """--add-clip-arm: run only the clip arm for each seed of an existing result (its own
    selected lr and coupled λ), score it the same way, and rewrite the summary and rule."""
    result = json.loads(path.read_text())
    for key in ("n", "epochs", "batch_size", "knn", "probe_sentences", "new_param_lr_scale"):
        setattr(args, key, result["settings"][key])
    train, dev_path, _, _ = data_files(args, workdir)
    dev = load_dev(dev_path)
    ref = theta_star_reference(
        probe_sentences(args.conll_dir, args.probe_sentences).sentences, args
    )
    cells: dict[int, dict[str, dict]] = {}
    for r in result["runs"]:
        cells.setdefault(r["seed"], {})[r["arm"]] = r
    for seed, arms in sorted(cells.items()):
        print(f"seed {seed}", flush=True)
        base = job(args, train, workdir, seed)
        prepared = prepare_run_data(validate_job(base))
        lr, lam = arms["plain"]["selected"]["lr"], arms["coupled"]["selected"]["lambda"]
        t = run_clip_arm(base, prepared, lr, lam)
        scores = score_model(t.model_dir, dev, ref, args)
        selected = {"lr": lr, "lambda": lam, "clip": "fine_only"}
        arms[CLIP_ARM] = {"arm": CLIP_ARM, "seed": seed, **scores, "selected": selected}
        arms[CLIP_ARM]["trials"] = [asdict(t)]
        discard([t])
        print(
            f"  {CLIP_ARM} dev acc {scores['dev_accuracy']:.4f} retention {scores['retention_at_k']:.3f}"
        )
    names = [a for a in result["settings"]["arms"] if a != CLIP_ARM]
    names.insert(names.index("coupled") + 1, CLIP_ARM)
    args.alphas, args.strengths = result["settings"]["alphas"], result["settings"]["strengths"]
    rows = summarize(cells, names)
    rule = pass_rule(rows, args)
    result["settings"]["arms"] = names
    result["settings"]["clip_arm_added"] = "afterwards by --add-clip-arm (same seeds and settings)"
    result |= {"runs": [r for a in cells.values() for r in a.values()], "summary": rows}
    result |= {"pass_rule": rule, "training_time": training_time(cells)}
    write_json(path, result)
    print_summary(rows, args.knn)
    for line in rule["lines"]:
        print(line)
    plot(rows, path.with_suffix(".png"), args.knn, result["data"]["probe_note"])
    return 0


def clip_line(by_arm: dict[str, dict[str, Any]]) -> str | None:
    """The clipping order's effect: the clip arm against coupled (same λ, lr, seeds)."""
    if CLIP_ARM not in by_arm or "coupled" not in by_arm:
        return None
    a, b = by_arm[CLIP_ARM], by_arm["coupled"]
    return (
        f"clipping order at the coupled λ: fine_only vs total: dev accuracy "
        f"{100 * (a['dev_accuracy_mean'] - b['dev_accuracy_mean']):+.2f} points, retention "
        f"{a['retention_at_k_mean'] - b['retention_at_k_mean']:+.3f}"
    )


# --------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(cells: dict[int, dict[str, dict]], arms: list[str]) -> list[dict[str, Any]]:
    """Per arm: mean and std over seeds of every metric, and the paired verdicts against
    plain (accuracy, retention) by _common.verdict's two-standard-error rule."""
    seeds = sorted(cells)
    rows = []
    for arm in arms:
        runs = [cells[s][arm] for s in seeds if arm in cells[s]]
        if len(runs) < len(seeds):
            continue  # a seed still running
        row: dict[str, Any] = {"arm": arm, "seeds": seeds}
        for key in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in runs])
        for key in ("dev_accuracy", "retention_at_k"):
            diffs = [cells[s][arm][key] - cells[s]["plain"][key] for s in seeds]
            row[f"{key}_vs_plain"] = "control" if arm == "plain" else verdict(diffs)
        row["selected"] = [r["selected"] for r in runs]
        rows.append(row)
    return rows


def pass_rule(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The docstring's rule on the means: which κ pays, which is only a retention dial."""
    by_arm = {r["arm"]: r for r in rows}
    plain = by_arm["plain"]
    plain_gain, plain_forgetting = plain["task_gain_mean"], plain["forgetting_mean"]
    free = ["early-stop", *(f"interp-{a:g}" for a in args.alphas)]
    lines = [
        f"plain: task gain {100 * plain_gain:+.1f} points over chance, forgetting "
        f"{plain_forgetting:.3f}"
    ]
    dial, pays = [], []
    for kappa in args.strengths:
        arm = f"kappa-{kappa:g}"
        gain, forgetting = by_arm[arm]["task_gain_mean"], by_arm[arm]["forgetting_mean"]
        keeps = gain >= 0.95 * plain_gain if plain_gain > 0 else gain >= plain_gain
        halves = forgetting <= 0.5 * plain_forgetting
        # the free alternatives at equal or better task: κ must retain more than each of them
        rivals = [a for a in free if by_arm[a]["task_gain_mean"] >= gain]
        beaten = [a for a in rivals if forgetting < by_arm[a]["forgetting_mean"]]
        share = f"{100 * gain / plain_gain:.0f}%" if plain_gain > 0 else "n/a"
        lines.append(
            f"{arm}: gain {100 * gain:+.1f} ({share} of plain's, {'≥' if keeps else '<'} 95%), "
            f"forgetting {forgetting:.3f} ({'≤' if halves else '>'} half of plain's); lower "
            f"forgetting than {len(beaten)}/{len(rivals)} free arms with ≥ its gain"
            + (f" (not: {', '.join(a for a in rivals if a not in beaten)})" if rivals else "")
        )
        if keeps and halves:
            dial.append(arm)
            if len(beaten) == len(rivals):
                pays.append(arm)
    if plain_gain <= 0:
        # nothing learned, nothing to keep: any arm would "keep" plain's gain
        outcome = "no verdict: plain fine-tuning did not beat chance (nothing to keep)"
        dial, pays = [], []
    elif pays:
        outcome = f"the anchor PAYS: {', '.join(pays)}"
    elif dial:
        outcome = (
            f"λ is a retention dial, not an improvement: {', '.join(dial)} keep the task with "
            "half the forgetting, but early stopping or interpolation retains as much at ≥ the gain"
        )
    else:
        outcome = (
            "the anchor does NOT pay: no κ keeps ≥ 95% of plain's gain with ≤ half its forgetting"
        )
    lines.append(f"pass rule: {outcome}")
    clip = clip_line(by_arm)
    if clip:
        lines.append(clip)
    return {"rule": RULE, "lines": lines, "outcome": outcome, "passing": pays, "dial": dial}


def print_summary(rows: list[dict[str, Any]], k: int) -> None:
    print(
        f"\nSST-2 dev accuracy and retention@{k} of θ*'s embedding neighbourhoods, mean ± std over"
        " seeds; gain = dev acc − 0.5; vs plain: paired verdicts (accuracy / retention)"
    )
    head = (
        f"{'arm':<12} {'dev acc %':>14} {'gain':>6} {'retention':>15} {'forget':>7} {'CKA':>6}"
        f" {'drift':>7}  vs plain (acc / retention)"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['arm']:<12} {100 * r['dev_accuracy_mean']:>6.2f} ± {100 * r['dev_accuracy_std']:<5.2f}"
            f" {100 * r['task_gain_mean']:>+6.1f} {r['retention_at_k_mean']:>7.3f} ± "
            f"{r['retention_at_k_std']:<5.3f} {r['forgetting_mean']:>7.3f} {r['cka_mean']:>6.4f}"
            f" {r['drift_l2_mean']:>7.3f}  {r['dev_accuracy_vs_plain']} / "
            f"{r['retention_at_k_vs_plain']}"
        )


def plot(rows: list[dict[str, Any]], out: Path, k: int, note: str) -> None:
    """Dev accuracy vs retention per arm (mean ± std); the interpolation path θ* → plain dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for r in rows:
        ax.errorbar(
            r["retention_at_k_mean"],
            100 * r["dev_accuracy_mean"],
            xerr=r["retention_at_k_std"],
            yerr=100 * r["dev_accuracy_std"],
            fmt="s" if r["arm"].startswith("kappa") else "o",
            capsize=3,
            label=r["arm"],
            color="black" if r["arm"] == "plain" else None,
        )
    # the interpolation path toward plain (α ascending); θ(0) has plain's head, so θ* (a fresh
    # head, chance) is not on it
    by_arm = {r["arm"]: r for r in rows}
    path = [a for a in by_arm if a.startswith("interp-")]
    path = sorted(path, key=lambda a: float(a.removeprefix("interp-"))) + ["plain"]
    ax.plot(
        [by_arm[a]["retention_at_k_mean"] for a in path],
        [100 * by_arm[a]["dev_accuracy_mean"] for a in path],
        ls="--",
        lw=1,
        color="gray",
        zorder=0,
    )
    ax.scatter([1.0], [100 * CHANCE], marker="*", s=140, color="gray", label="θ* (chance)")
    ax.set_xlabel(f"retention@{k} (kNN overlap with θ*'s embeddings of CoNLL sentences; 1 = kept)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("MiniLM on SST-2: task vs retention (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.text(0.01, 0.01, note[:120], fontsize=6, alpha=0.7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def training_time(cells: dict[int, dict[str, dict]]) -> dict[str, float]:
    """Wall time per training run (model load, evaluations and checkpoints included) and the
    loop's own training speed: what a longer run would cost."""
    trials = [t for arms in cells.values() for a in arms.values() for t in a["trials"]]
    if not trials:
        return {}
    return {
        "runs": len(trials),
        "mean_wall_s_per_run": statistics.mean(t["wall_s"] for t in trials),
        "mean_train_samples_per_s": statistics.mean(t["samples_per_s"] for t in trials),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    quiet_libraries(args.verbose)
    torch.set_num_threads(args.threads)  # the loop sets it per run too; scoring runs here
    started = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tether-strength-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(workdir)  # local mode leaves checkpoints in temp dirs: keep them here
    os.environ.setdefault("TETHER_CACHE", str(workdir / "cache"))
    if args.add_clip_arm is not None:
        try:
            return add_clip_arm(args, args.add_clip_arm, workdir)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    arms = arm_names(args)
    cells: dict[int, dict[str, dict]] = {}
    try:
        train, dev_path, note, synthetic = data_files(args, workdir)
        dev = load_dev(dev_path)
        probe = probe_sentences(args.conll_dir, args.probe_sentences)
        ref = theta_star_reference(probe.sentences, args)
        runs = len(args.seeds) * (
            len(args.plain_lrs) + len(args.strengths) + len(args.coupled_lambdas) + 2
        )
        print(f"{note}\n{probe.note}\narms: {', '.join(arms)}")
        print(f"{runs} training runs; dev set: {len(dev.labels)} sentences; θ* retention 1.0 ✓")
        result: dict[str, Any] = {
            "benchmark": "anchor_strength_study",
            "command": " ".join([".venv/bin/python", *sys.argv]),
            "machine": machine_info(torch_threads=args.threads),
            "data": {
                "note": note,
                "synthetic": synthetic,
                "probe_note": probe.note,
                "probe_synthetic": probe.synthetic,
                "num_dev": len(dev.labels),
                "num_probe": len(probe.sentences),
            },
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            | {"model": MODEL, "arms": arms, "chance": CHANCE, "pass_rule": RULE},
            "theta_star": {"retention_at_k": 1.0, "cka": 1.0, "drift_l2": 0.0, "task_gain": 0.0},
            "complete": False,
        }
        for seed in args.seeds:
            print(f"seed {seed}", flush=True)
            base = job(args, train, workdir, seed)
            cells[seed] = run_seed(args, base, dev, ref, workdir)
            result |= {
                "runs": [r for arms_of_seed in cells.values() for r in arms_of_seed.values()],
                "summary": summarize(cells, arms),
                "training_time": training_time(cells),
            }
            result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
            write_json(args.out, result)  # a stopped run keeps the seeds it finished
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = summarize(cells, arms)
    print_summary(rows, args.knn)
    rule = pass_rule(rows, args)
    for line in rule["lines"]:
        print(line)
    png = args.out.with_suffix(".png")
    plot(rows, png, args.knn, f"{note}; {probe.note}")
    result |= {"summary": rows, "pass_rule": rule, "plot": png.name, "complete": True}
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    result["wall_s"] = time.time() - started
    write_json(args.out, result)
    timing = result["training_time"]
    print(
        f"\n{timing['runs']} training runs, {timing['mean_wall_s_per_run']:.0f} s each on average "
        f"(with model load, evaluations, checkpoints; the loop trained "
        f"{timing['mean_train_samples_per_s']:.0f} samples/s)"
    )
    print(f"wall {result['wall_s'] / 60:.1f} min; wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    sys.exit(main())
