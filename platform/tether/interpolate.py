"""Post-hoc interpolation toward θ*: θ(α) = θ* + α(θ − θ*), scored without training.

    tether interpolate runs/demo-20261206-…          # a run folder (its model/)
    tether interpolate models:/demo@champion --alphas 0,0.25,0.5,0.75,1 --register

A fine-tuned model and its base span a line of models. Walking it back toward θ* trades task
fit for retention (WiSE-FT): a cheap complement to λ, since it reuses the run's weights. Every
pretrained weight is interpolated; parameters the base does not have (a new head) keep their
fine-tuned values, so α = 0 is θ* with the trained head, and α = 1 is the run's model. Each α
is scored on the run's validation data with the task's own metrics (and, for causal LMs, the
forgetting probe). θ* is rebuilt as the run built it (freeze settings, LoRA, a new head, the
rounding to ``objective.anchor_dtype``) and must hash to the card's ``theta_star_sha256``: a
base that changed since is refused, since the line would not lead back to the run's θ*. The
curve is written as a table, CSV and PNG; the best α (the task's primary metric, in its
direction) is exported as a model folder, and ``--register`` logs it to MLflow and registers
it through the champion gate like any run.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.card import read_card

if TYPE_CHECKING:
    import torch

    from tether.config import JobSpec

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Curve:
    """θ(α)'s metrics for each α, and the best α by the task's primary metric."""

    alphas: list[float]
    metrics: list[dict[str, float]]
    primary: str
    mode: str

    @property
    def best(self) -> int:
        sign = 1.0 if self.mode == "max" else -1.0
        # ties go to the smaller α: as good on the task and closer to θ*
        return max(
            range(len(self.alphas)), key=lambda i: (sign * self.metrics[i][self.primary], -i)
        )

    def rows(self) -> list[dict[str, Any]]:
        return [{"alpha": a} | m for a, m in zip(self.alphas, self.metrics, strict=True)]


def source_folder(source: str, tracking_uri: str | None) -> tuple[Path, str | None]:
    """The model folder of a run folder, a model folder, or a registered model (downloaded)."""
    if source.startswith("models:/"):
        from tether.registry import fetch_model_dir

        return fetch_model_dir(source, tracking_uri), source
    path = Path(source)
    for folder in (path / "model", path):
        if (folder / "tether.json").is_file() and (folder / "job.yaml").is_file():
            return folder, None
    raise FileNotFoundError(f"{source}: no model folder (tether.json + job.yaml) in it")


def interpolation_pairs(
    tuned: torch.nn.Module, base: torch.nn.Module, new_param_names: set[str]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(parameter, θ*, θ) for every pretrained parameter: the base has it, with the same
    shape, and did not initialise it afresh (a head has no θ* to go back to)."""
    pretrained = {n: p for n, p in base.named_parameters() if n not in new_param_names}
    out = []
    for name, p in tuned.named_parameters():
        star = pretrained.get(name)
        if star is not None and star.shape == p.shape:
            out.append((p, star.detach().clone(), p.detach().clone()))
    return out


def set_alpha(pairs, alpha: float) -> None:
    """θ ← θ* + α(θ_tuned − θ*), in place."""
    import torch

    with torch.no_grad():
        for p, star, tuned in pairs:
            p.copy_(torch.lerp(star, tuned, alpha))


def theta_star(spec: JobSpec, task) -> tuple[torch.nn.Module, set[str], str]:
    """θ* as the run built it, with its identity hash: the base through ``build_model`` (its
    freeze settings, its LoRA adapter, a new head where the labels differ) and rounded to
    ``objective.anchor_dtype`` as the run's θ₀ was; a LoRA base merged back to a plain model
    (B = 0: exactly the base). Also returns the names of its new (head) parameters."""
    from tether.adapters import is_adapted
    from tether.models import resolve_model_source
    from tether.train.setup import build_model, build_objective, theta_star_identity

    source = resolve_model_source(spec.model.name, spec.storage.path)
    model, new_params = build_model(spec, task, source)
    identity = theta_star_identity(spec, model, new_params)  # before rounding, as set_up does
    # at λ = 0 no anchor is built, but θ₀ is rounded to anchor_dtype in place as in training
    unpulled = spec.model_copy(update={"objective": spec.objective.model_copy(update={"lam": 0.0})})
    build_objective(unpulled, model, new_params)
    if is_adapted(model):
        model = model.merge_and_unload()
    return model, new_params, identity


def check_theta_star(folder: Path, spec: JobSpec, identity: str) -> None:
    """Refuse a base that is not the run's θ*: the line would lead somewhere the run never
    started from. A card without a recorded hash is not checked."""
    from tether.errors import AnchorMismatch

    recorded = read_card(folder).get("objective", {}).get("theta_star_sha256")
    if recorded and recorded != identity:
        revision = spec.model.revision or "none pinned"
        raise AnchorMismatch(
            f"{folder} was trained against θ* {recorded}, but its base {spec.model.name} "
            f"(revision: {revision}) now gives {identity}: the base weights changed. Restore "
            "that base, or pin model.revision in the job to the revision the run used"
        )


def score_curve(spec: JobSpec, folder: Path, alphas: list[float]) -> tuple[Curve, Any, Any]:
    """Every α's metrics on the run's validation data; returns the curve, the model (at the
    last α) with its interpolation pairs, and the task with its tokenizer."""
    import torch

    from tether.run import prepare_run_data
    from tether.train.loop import evaluate, score_split
    from tether.train.strategy import DataParallel

    task, data = prepare_run_data(spec)
    base, new_params, identity = theta_star(spec, task)
    check_theta_star(folder, spec, identity)
    tuned = task.load_model(str(folder), None, False).model.eval()
    pairs = interpolation_pairs(tuned, base, new_params)
    del base
    tokenizer = task.load_tokenizer(str(folder), None, False)
    strategy = DataParallel(0, 1, torch.device("cpu"))

    def score(split, counts_fn, size):
        return score_split(tuned, split, counts_fn, size, data.pad_id, spec, strategy)

    results = []
    for alpha in alphas:
        set_alpha(pairs, alpha)
        metrics = evaluate(tuned, data.validation, task, data.pad_id, spec, strategy)
        metrics |= task.extra_metrics(tuned, tokenizer, data, score)
        results.append(metrics)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items())
        print(f"tether: α = {alpha:g}: {shown}", flush=True)
    curve = Curve(list(alphas), results, task.primary_metric, task.mode)
    return curve, (tuned, pairs, tokenizer), (task, data)


def write_curve(curve: Curve, out_dir: Path) -> list[Path]:
    """curve.json, curve.csv and curve.png (the primary metric, and forgetting if scored)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = curve.rows()
    (out_dir / "curve.json").write_text(json.dumps({"rows": rows, "best": curve.best}, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve.alphas, [m[curve.primary] for m in curve.metrics], "o-", label=curve.primary)
    if all("eval/forgetting" in m for m in curve.metrics):
        ax.plot(
            curve.alphas, [m["eval/forgetting"] for m in curve.metrics], "s--", label="forgetting"
        )
    ax.set_xlabel("α  (0 = θ*, 1 = the fine-tuned model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=110)
    plt.close(fig)
    return [out_dir / n for n in ("curve.json", "curve.csv", "curve.png")]


def pinned_source(card: dict, folder: Path) -> str:
    """The source as a name that does not move: ``models:/NAME/VERSION`` for a registered
    model (never its alias, which may point elsewhere tomorrow), else the folder's path."""
    registry = card.get("registry")
    if registry and registry.get("name") and registry.get("version"):
        return f"models:/{registry['name']}/{registry['version']}"
    return str(folder.resolve())


def export_alpha(folder: Path, model, tokenizer, alpha: float, metrics, out: Path) -> Path:
    """θ(α) as a model folder: the source's job and card, with the α and its metrics."""
    import yaml

    from tether.train.checkpoint import export_hf_model

    card = read_card(folder)
    # the source's registry identity describes the source, not this new model
    card["interpolation"] = {
        "alpha": alpha,
        "of": card.pop("registry", None) or str(folder.resolve()),
    }
    objective = card.get("objective") or {}
    if objective.get("adapter"):
        # the export is plain weights θ* + α·s·B·A, with no adapter/ beside them: a card that
        # named an adapter would have it served or registered as one
        card["interpolation"]["source_adapter"] = objective["adapter"]
        objective["adapter"] = None
    card["metrics"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    job = yaml.safe_load((folder / "job.yaml").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf_model(model, tokenizer, job, card, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def interpolate(
    source: str,
    alphas: list[float] | None = None,
    out_dir: Path | None = None,
    register: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Score θ(α) along the line to θ*, write the curve, export the best α (and register it)."""
    alphas = sorted(set(alphas or DEFAULT_ALPHAS))
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"--alphas: each α must be in [0, 1], got {alphas}")
    folder, model_uri = source_folder(source, tracking_uri)
    out_dir = out_dir or default_out_dir(source, folder, model_uri)
    try:
        spec, summary, (fingerprint, files) = interpolate_folder(
            folder, alphas, out_dir, tracking_uri
        )
    finally:
        if model_uri is not None:  # refused or done, the private download goes
            from tether.registry import discard_download

            discard_download(folder)
    summary = {"source": source, "source_uri": model_uri} | summary
    if register:
        summary["registry"] = register_interpolated(spec, summary, fingerprint, files)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def interpolate_folder(
    folder: Path, alphas: list[float], out_dir: Path, tracking_uri: str | None
) -> tuple[JobSpec, dict[str, Any], tuple[str, list[Path]]]:
    """The curve and the best α's model folder from a model folder; returns the run's spec
    (at the λ it trained with), the summary, and the data fingerprint and curve files."""
    import yaml

    from tether.config import validate_job

    spec = validate_job(yaml.safe_load((folder / "job.yaml").read_text()))
    if tracking_uri:
        spec.tracking.uri = tracking_uri
    curve, (model, pairs, tokenizer), (task, data) = score_curve(spec, folder, alphas)
    card = read_card(folder)
    spec = with_trained_lambda(spec, card, len(data.train))
    files = write_curve(curve, out_dir)
    best = curve.best
    set_alpha(pairs, curve.alphas[best])
    model_dir = export_alpha(
        folder, model, tokenizer, curve.alphas[best], curve.metrics[best], out_dir / "model"
    )
    summary = {
        "interpolation_of": pinned_source(card, folder),
        "alphas": curve.alphas,
        "curve": curve.rows(),
        "best_alpha": curve.alphas[best],
        "metrics": curve.metrics[best],
        "primary_metric": curve.primary,
        "mode": curve.mode,
        "model_dir": str(model_dir),
        "files": [str(f) for f in files],
        "task": task.name,
        "label_names": data.label_names,
        "theta_star_sha256": card.get("objective", {}).get("theta_star_sha256"),
        "run_dir": str(out_dir),
    }
    return spec, summary, (data.fingerprint, files)


def default_out_dir(source: str, folder: Path, model_uri: str | None) -> Path:
    """<run>/interpolation for a run folder; beside a model folder, never inside it (whatever
    copies or logs that folder would carry a second model); ./interpolation for a registry
    source."""
    if model_uri is not None:
        return Path("interpolation")
    if folder.resolve() != Path(source).resolve():  # a run folder: its model/ was found in it
        return Path(source) / "interpolation"
    resolved = folder.resolve()
    return resolved.with_name(f"{resolved.name}-interpolation")


def with_trained_lambda(spec: JobSpec, card: dict, num_train: int) -> JobSpec:
    """The spec at the λ the run trained with: the card's. A job given as κ
    (``objective.strength``) reloads with λ's default, as its λ is derived from the run's
    schedule; without a recorded λ it is derived again here."""
    lam = card.get("objective", {}).get("lambda")
    if lam is None:
        from tether.train.setup import resolve_strength

        return resolve_strength(spec, num_train)
    objective = spec.objective.model_copy(update={"lam": float(lam)})
    return spec.model_copy(update={"objective": objective})


def register_interpolated(spec: JobSpec, summary: dict, fingerprint: str, files: list[Path]):
    """An MLflow run for the interpolation (its curve as metrics by α·100 and files), the
    model logged from it, then registration through the champion gate."""
    from tether.config import resolve_tracking_uri
    from tether.registry import log_model, register_and_gate
    from tether.run import score_registered_model
    from tether.tracking import RunRecorder

    uri = resolve_tracking_uri(spec.tracking.uri)
    recorder = RunRecorder(uri, spec.tracking.experiment)
    run_id = recorder.start(
        f"{spec.name}-interpolation",
        {
            "tether.interpolation_of": summary["interpolation_of"],
            "tether.best_alpha": str(summary["best_alpha"]),
            "tether.task": summary["task"],
        },
    )
    if run_id is None:
        raise RuntimeError(f"MLflow at {uri} could not start a run: nothing registered")
    recorder.log_params({"alphas": ",".join(f"{a:g}" for a in summary["alphas"])})
    for row in summary["curve"]:
        recorder.log_metrics(
            {k: v for k, v in row.items() if k != "alpha"}, step=round(100 * row["alpha"])
        )
    for path in files:
        recorder.log_artifact(path)
    summary["mlflow_run_id"] = run_id
    summary["model_uri"] = log_model(uri, run_id, Path(summary["model_dir"]))
    recorder.finish("FINISHED")
    return register_and_gate(
        spec,
        summary,
        fingerprint,
        summary["primary_metric"],
        summary["mode"],
        lambda model_uri, tracking: score_registered_model(spec, model_uri, tracking),
    )


# --------------------------------------------------------------------------- command line


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "interpolate", help="score θ* + α(θ − θ*) along the line to the base; export the best α"
    )
    p.add_argument("source", help="a run folder, a model folder, or models:/NAME@ALIAS|/VERSION")
    p.add_argument(
        "--alphas",
        default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
        help="comma-separated α in [0, 1] (default %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where the curve and model go (default: RUN_DIR/interpolation, "
        "MODEL_DIR-interpolation beside a model folder, ./interpolation for models:/)",
    )
    p.add_argument("--register", action="store_true", help="register the best α (champion gate)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the job's)")
    p.set_defaults(handler=cmd_interpolate)


def cmd_interpolate(args) -> int:
    from tether.errors import AnchorMismatch, DataError, SpecError

    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
        summary = interpolate(args.source, alphas, args.out, args.register, args.tracking_uri)
    except (ValueError, FileNotFoundError, SpecError, DataError, AnchorMismatch) as e:
        print(f"tether: interpolate: {e}", file=sys.stderr)
        return 2
    best = summary["best_alpha"]
    primary = summary["primary_metric"]
    print(
        f"tether: best α = {best:g} ({primary} {summary['metrics'][primary]:.4f}); "
        f"curve and model in {Path(summary['model_dir']).parent}"
    )
    registry = summary.get("registry")
    if registry:
        print(f"tether: registry: {registry.get('decision', registry)}")
    return 0
