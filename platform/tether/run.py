"""Launch a training run on Ray Train: prepare data on the driver, fit, export, record.

    spec = load_job("jobs/demo.yaml", ["objective.lambda=0.1"])
    outcome = run_training(spec)        # → TrainOutcome(summary={...metrics, model_dir...})

A run folder (``storage.path/run_name``) belongs to one run: ``run.json`` records its identity
(the spec's semantic settings, the data's content fingerprint, the worker count). Reusing a
run name resumes that run only if the identity matches; otherwise the run is refused with
the keys that differ. A finished run is not trained again: its summary is returned and no
new MLflow run is opened.

``build_trainer`` is the seam the sweep (Ray Tune) uses to run each trial as a Train run.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.card import card_or_empty
from tether.cluster import caller_signal_handlers, ensure_ray
from tether.config import JobSpec
from tether.data import PreparedData, prepare_data
from tether.errors import DataError, RunIdentityError, first_line
from tether.models import resolve_model_source
from tether.tasks import Task, build_task
from tether.train.checkpoint import HF_MODEL_DIR, checkpoints
from tether.train.inputs import LoopHooks, WorkerInputs
from tether.train.setup import resolve_strength

RUN_RECORD = "run.json"
SUMMARY = "summary.json"
# spec keys that do not change what a run computes: a resumed run may differ in these
NOT_IDENTITY = (
    "name",
    "storage",
    "tracking",
    "tune",
    "scaling.address",
    "scaling.max_failures",
    "train.num_threads",
    "train.keep_checkpoints",
    "scaling.resources_per_worker",
)
# what `--allow-change` may accept on resume: the model stays valid (the worker count changes
# the batches after the resume point; a sharded checkpoint reshards onto the new count)
SAFE_CHANGES = ("train.epochs", "train.max_steps", "train.eval_interval", "scaling.num_workers")


@dataclass
class TrainOutcome:
    summary: dict[str, Any]
    result: Any  # ray.train.Result (None when the run had already finished)


def prepare_run_data(spec: JobSpec, use_cache: bool = True) -> tuple[Task, PreparedData]:
    """Build the task and encode the job's data on the driver, failing before any Ray work."""
    pin_registered_base(spec)
    task = build_task(spec)
    source = resolve_model_source(spec.model.name, spec.storage.path)
    tokenizer, config = load_tokenizer_and_config(task, spec, source)
    check_max_length(spec.data.max_length, spec.model.name, tokenizer, config)
    data = prepare_data(spec.data, task, tokenizer, spec.model.label_names, use_cache)
    task = task.with_labels(data.label_names)
    extras, constants = task.extra_splits(
        source, spec.model.revision, spec.model.trust_remote_code, tokenizer
    )
    data.extras.update(extras)
    data.stats.update(constants)
    check_cascade_labels(spec, source, data.label_names)
    if spec.model.num_labels is not None and spec.model.num_labels != len(data.label_names):
        raise DataError(
            f"model.num_labels: {spec.model.num_labels} but the data has "
            f"{len(data.label_names)} labels {data.label_names}"
        )
    return task, data


def load_tokenizer_and_config(task: Task, spec: JobSpec, source: str) -> tuple[Any, Any]:
    """The model's tokenizer and config, on the driver. A model that cannot be fetched (no
    such hub id, no network, no config) is a ModelSourceError naming model.name."""
    from transformers import AutoConfig

    from tether.errors import ModelSourceError

    m = spec.model
    try:
        tokenizer = task.load_tokenizer(source, m.revision, m.trust_remote_code)
        config = AutoConfig.from_pretrained(
            source, revision=m.revision, trust_remote_code=m.trust_remote_code
        )
    except (OSError, ValueError) as e:  # what transformers raises for each of those
        reason = first_line(e)
        raise ModelSourceError(
            f"model.name: cannot load {m.name!r} ({type(e).__name__}: {reason})"
        ) from e
    return tokenizer, config


NO_LIMIT = 10**12  # tokenizers without a limit report int(1e30)


def absolute_positions(config) -> bool:
    """Whether the model looks positions up in a learned table (BERT, GPT-2), which ends at
    max_position_embeddings. Rotary (Llama: rope_theta) and relative ones (DeBERTa:
    position_biased_input false) have no such end."""
    if getattr(config, "rope_theta", None) is not None or getattr(config, "rope_scaling", None):
        return False
    if getattr(config, "position_biased_input", True) is False:
        return False
    return str(getattr(config, "position_embedding_type", "absolute")).startswith("absolute")


def check_max_length(max_length: int, model_name: str, tokenizer, config) -> None:
    """data.max_length must fit the model's positions. A tokenizer honours an explicit
    max_length above its own limit, so an over-long spec would only fail in the workers'
    forward pass, after the cluster started."""
    from tether.errors import SpecError

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not absolute_positions(text):
        return  # rotary or relative positions: longer inputs run (however well they do)
    limits = {}
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(text, key, None), int):
            limits[f"its config's {key}"] = getattr(text, key)
            break
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < NO_LIMIT:
        limits["its tokenizer's model_max_length"] = model_max  # RoBERTa: 512 of 514 positions
    if not limits:
        return
    what, limit = min(limits.items(), key=lambda item: item[1])
    if max_length > limit:
        raise SpecError(
            [
                f"data.max_length: {max_length} is longer than {model_name} takes ({what} is "
                f"{limit}); set data.max_length to {limit} or less"
            ]
        )


def pin_registered_base(spec: JobSpec) -> None:
    """Cascaded fine-tuning: ``model.name: models:/NAME@ALIAS`` (or ``/VERSION``) starts from a
    registered model, so θ* is *its* weights. The alias is pinned to the version it points at
    now (``spec.model.name`` becomes ``models:/NAME/VERSION``: the run's identity and lineage,
    and what every worker loads, even if the alias moves mid-run), and that version is
    downloaded once to ``<storage.path>/bases/``, where every node finds it."""
    from tether.errors import ModelSourceError
    from tether.models import registered_base_dir
    from tether.sources import REGISTRY_PREFIX

    name = spec.model.name
    if not name.startswith(REGISTRY_PREFIX):
        return
    from mlflow.exceptions import MlflowException

    from tether.config import resolve_tracking_uri
    from tether.registry import resolve_version

    uri = resolve_tracking_uri(spec.tracking.uri)
    try:
        identity = resolve_version(uri, name)
    except (MlflowException, ValueError) as e:
        raise ModelSourceError(f"model.name: {name} is not in the registry at {uri} ({e})") from e
    pinned = f"{REGISTRY_PREFIX}{identity['name']}/{identity['version']}"
    target = Path(spec.storage.path) / "bases" / f"{identity['name']}-v{identity['version']}"
    if not holds_version(target, identity["run_id"]):
        # absent, or another store's (or a re-created model's) version of the same name
        download_base(pinned, uri, target, identity["run_id"])
    if pinned != name:
        print(f"tether: model.name {name} is {pinned}", flush=True)
    spec.model.name = pinned
    registered_base_dir(pinned, spec.storage.path)  # fails here, naming it, if it is not there


def holds_version(folder: Path, run_id: str) -> bool:
    """Whether ``folder`` is a downloaded copy of the registered version made by ``run_id``."""
    card = card_or_empty(folder if (folder / "tether.json").is_file() else None)
    return card.get("registry", {}).get("run_id") == run_id


def download_base(model_uri: str, tracking_uri: str, target: Path, run_id: str) -> None:
    """The registered model's folder at ``target``, replaced whole: copied into a private
    folder beside it, then renamed (two drivers pinning the same base never mix copies). A
    copy of the same version that another driver put there meanwhile is kept, not replaced:
    its runs may be loading it."""
    import tempfile

    from tether.registry import discard_download, fetch_model_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    folder = fetch_model_dir(model_uri, tracking_uri)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        shutil.copytree(folder, staging / "model")
        if holds_version(target, run_id):
            return  # another driver finished first: the same weights are there
        if target.exists():
            target.rename(staging / "old")  # a stale version (on the same filesystem: atomic)
        try:
            (staging / "model").rename(target)
        except OSError:  # another driver renamed its copy in between
            if not holds_version(target, run_id):
                raise
    finally:
        discard_download(folder)
        shutil.rmtree(staging, ignore_errors=True)


def check_cascade_labels(spec: JobSpec, source: str, labels: list[str]) -> None:
    """A registered base's head is reused when it has this data's labels in the same order; a
    head of another size is made anew (said here); the same size with other names is refused
    (its rows would silently mean other classes)."""
    from tether.sources import REGISTRY_PREFIX

    if not spec.model.name.startswith(REGISTRY_PREFIX):
        return
    theirs = card_or_empty(Path(source)).get("label_names") or []
    if not theirs or list(theirs) == list(labels):
        return
    if len(theirs) != len(labels):
        print(
            f"tether: {spec.model.name} has labels {theirs}, this data {labels}: a new head "
            "is trained (no θ* for it)",
            flush=True,
        )
        return
    raise DataError(
        f"model.label_names: {spec.model.name} was trained on labels {theirs} and this data "
        f"has {labels}: set model.label_names to the registered order to reuse its head"
    )


def default_run_name(spec: JobSpec) -> str:
    """The spec's run name, else '<job>-<time>-<random>': unique even within one second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return spec.storage.run_name or f"{spec.name}-{stamp}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- run identity


def run_identity(spec: JobSpec, data: PreparedData) -> dict[str, Any]:
    """The settings that make a run this run, as dotted keys (plus the data's content)."""
    flat = _flatten(spec.to_dict())
    identity = {
        k: v
        for k, v in flat.items()
        if not any(k == n or k.startswith(n + ".") for n in NOT_IDENTITY)
    }
    identity["data.fingerprint"] = data.fingerprint
    return identity


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def claim_run_dir(
    run_dir: Path, identity: dict[str, Any], allow_changes: tuple[str, ...] = ()
) -> str:
    """'new', 'resume' or 'finished', after checking the folder holds this same run.

    Raises RunIdentityError naming every differing key (``allow_changes`` may accept keys
    from SAFE_CHANGES, e.g. more epochs for a finished run).
    """
    unsafe = [k for k in allow_changes if k not in SAFE_CHANGES]
    if unsafe:
        raise RunIdentityError(
            f"--allow-change: {unsafe} cannot change on resume (only {SAFE_CHANGES})"
        )
    record = run_dir / RUN_RECORD
    if not record.is_file():
        if checkpoints(run_dir) or (run_dir / SUMMARY).is_file():
            raise RunIdentityError(
                f"{run_dir} holds a run without a {RUN_RECORD} (an older tether?): its settings "
                "cannot be checked; choose another storage.run_name"
            )
        _write_record(record, identity)
        return "new"
    saved = json.loads(record.read_text())["identity"]
    changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if "scaling.num_workers" in changed and identity.get("train.max_steps") is None:
        # with epochs, the run's length in steps (its schedule, a κ's λ) follows the workers
        raise RunIdentityError(
            f"run {run_dir.name}: the worker count can change on resume only when the run's "
            "length is set in steps (train.max_steps); with train.epochs the schedule would "
            "be recomputed mid-run"
        )
    refused = [k for k in changed if k not in allow_changes]
    if refused:
        lines = "; ".join(f"{k}: {saved.get(k)!r} → {identity.get(k)!r}" for k in refused[:8])
        raise RunIdentityError(
            f"run {run_dir.name} was started with other settings ({lines}). Resuming would "
            "record a run that did not happen: choose a new storage.run_name"
            + (
                f", or pass --allow-change for {', '.join(SAFE_CHANGES)}"
                if set(refused) <= set(SAFE_CHANGES)
                else ""
            )
        )
    if changed:  # accepted: the record now holds the settings the run continues under
        _write_record(record, identity)
    if (run_dir / SUMMARY).is_file() and not changed:
        return "finished"
    return "resume" if checkpoints(run_dir) else "new"


def recorder_uri(spec: JobSpec) -> str | None:
    from tether.config import resolve_tracking_uri

    return resolve_tracking_uri(spec.tracking.uri) if spec.tracking.enabled else None


def note_mlflow_run(run_dir: Path, tracking_uri: str, run_id: str) -> None:
    """Remember the run's MLflow run in its record, so a resumed attempt logs into it."""
    path = run_dir / RUN_RECORD
    record = json.loads(path.read_text())
    record["mlflow"] = {"tracking_uri": tracking_uri, "run_id": run_id}
    path.write_text(json.dumps(record, indent=2, default=str))


def mlflow_run_of(run_dir: Path, tracking_uri: str | None) -> str | None:
    """The MLflow run an earlier attempt opened in the same tracking store, if any."""
    mlflow = json.loads((run_dir / RUN_RECORD).read_text()).get("mlflow") or {}
    return (
        mlflow.get("run_id")
        if tracking_uri and mlflow.get("tracking_uri") == tracking_uri
        else None
    )


def _write_record(path: Path, identity: dict[str, Any]) -> None:
    """The run's identity, rewritten (an accepted --allow-change) without losing the rest of
    the record (the MLflow run a resumed attempt logs into)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record |= {"identity": identity, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(record, indent=2, default=str))


# --------------------------------------------------------------------------- Ray Train


def build_trainer(
    spec: JobSpec,
    inputs: WorkerInputs,
    storage_path: str,
    *,
    score_metric: str,
    score_mode: str,
    callbacks: list | None = None,
):
    """A TorchTrainer running ``train_loop_per_worker`` under the spec's scaling/storage.

    Checkpoints are ranked by ``score_metric`` in ``score_mode`` (the task's primary metric,
    or a sweep's metric), so the kept ones are the best by the number that selects models.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tether.train.loop import train_loop_per_worker

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=None if inputs.local else resources,
        ),
        run_config=RunConfig(
            name=inputs.run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.train.keep_checkpoints,
                checkpoint_score_attribute=score_metric,
                checkpoint_score_order=score_mode,
            ),
            callbacks=callbacks or [],
            # Train logs every report at INFO; our one progress line per evaluation says it
            logging_config=LoggingConfig(log_level="INFO" if inputs.verbose else "WARNING"),
        ),
    )


def worker_inputs(
    spec: JobSpec,
    data: Any,
    run_name: str,
    run_dir: Path,
    *,
    tracking: dict | None = None,
    hooks: LoopHooks | None = None,
    verbose: bool = False,
    score: tuple[str, str] | None = None,
) -> WorkerInputs:
    local = spec.scaling.num_workers == 0
    latest = checkpoints(run_dir)[-1] if local and checkpoints(run_dir) else None
    return WorkerInputs(
        job=spec.to_dict(),
        data=data,
        run_name=run_name,
        run_dir=str(run_dir),
        local=local,
        verbose=verbose,
        tracking=tracking,
        score_metric=score[0] if score else None,
        score_mode=score[1] if score else None,
        resume_from=str(latest) if latest else None,
        hooks=hooks,
    )


def run_training(
    spec: JobSpec,
    *,
    prepared: tuple[Task, PreparedData] | None = None,
    hooks: LoopHooks | None = None,
    callbacks: list | None = None,
    verbose: bool = False,
    parent_run_id: str | None = None,
    register: bool = False,
    allow_changes: tuple[str, ...] = (),
    inputs_override: dict[str, Any] | None = None,
) -> TrainOutcome:
    """Prepare data, fit on Ray Train, copy the final model out, record it in MLflow.

    Returns the run summary (also written to <run_dir>/summary.json). With ``register``, the
    model becomes a new registry version (alias `challenger`) and takes `champion` only if it
    beats the current champion on the same validation data. A run that already finished is
    not trained again (``summary["already_finished"]``). ``inputs_override`` replaces
    WorkerInputs fields (tests: a tracking store that is down).
    """
    from tether.tracking import close_run, open_run, worker_tracking

    if register:  # refuse an unnamed registry entry before any work
        from tether.registry import registered_name

        registered_name(spec)
    task, data = prepared if prepared is not None else prepare_run_data(spec)
    spec = resolve_strength(spec, len(data.train))  # λ from κ and this run's schedule
    run_name = default_run_name(spec)
    run_dir = Path(spec.storage.path) / run_name
    state = claim_run_dir(run_dir, run_identity(spec, data), allow_changes)
    if state == "finished":
        return finished_run(spec, run_dir, data, register)
    local = spec.scaling.num_workers == 0
    if not local:
        ensure_ray(spec.scaling.address)
    import ray

    earlier = mlflow_run_of(run_dir, recorder_uri(spec)) if state == "resume" else None
    recorder = open_run(spec, run_name, data, parent_run_id, task=task, continue_run_id=earlier)
    if recorder is not None and recorder.run_id is not None and recorder.run_id != earlier:
        note_mlflow_run(run_dir, recorder.uri, recorder.run_id)
    inputs = worker_inputs(
        spec,
        data if local else ray.put(data),  # shipped once to the object store
        run_name,
        run_dir,
        tracking=worker_tracking(recorder),
        hooks=hooks,
        verbose=verbose,
    )
    if inputs_override:
        inputs = dataclasses.replace(inputs, **inputs_override)
    trainer = build_trainer(
        spec,
        inputs,
        spec.storage.path,
        score_metric=task.primary_metric,
        score_mode=task.mode,
        callbacks=callbacks,
    )
    try:
        with caller_signal_handlers():
            result = trainer.fit()
    except BaseException:
        close_run(recorder, {"metrics": {}}, status="FAILED")
        raise
    summary = summarize(spec, task, result, run_name, run_dir, data)
    close_run(recorder, summary, model_uri=log_run_model(recorder, summary))
    if register:
        summary["registry"] = register_model(spec, task, summary, data)
    write_summary(run_dir, summary)
    return TrainOutcome(summary=summary, result=result)


def finished_run(spec: JobSpec, run_dir: Path, data: PreparedData, register: bool) -> TrainOutcome:
    """The summary of a run that already finished; optionally register its original model."""
    summary = json.loads((run_dir / SUMMARY).read_text())
    summary["already_finished"] = True
    print(
        f"tether: run {run_dir.name} already finished at step {summary.get('step')}; nothing "
        f"to train (MLflow run {summary.get('mlflow_run_id')}). Use a new storage.run_name for "
        "a new run.",
        flush=True,
    )
    if register and not (summary.get("registry") or {}).get("version"):
        task = build_task(spec, data.label_names)
        summary["registry"] = register_model(spec, task, summary, data)
        write_summary(run_dir, summary)
    return TrainOutcome(summary=summary, result=None)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(run_dir / SUMMARY)


def log_run_model(recorder, summary: dict[str, Any]) -> str | None:
    """Log the exported model to the run (a pyfunc over the HF folder); None if impossible."""
    if recorder is None or recorder.run_id is None or not summary.get("model_dir"):
        return None
    from tether.registry import log_model

    return recorder._call(
        "log model", log_model, recorder.uri, recorder.run_id, Path(summary["model_dir"])
    )


def register_model(
    spec: JobSpec,
    task: Task,
    summary: dict[str, Any],
    data: PreparedData,
    metric: str | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """Register and gate; a failure is reported in the summary, never as a failed run."""
    from tether.registry import register_and_gate

    if not summary.get("model_uri"):
        reason = "tracking is off" if summary.get("tracking") == "off" else "no model was logged"
        return {"error": f"not registered: {reason}"}
    try:
        return register_and_gate(
            spec,
            summary,
            data.fingerprint,
            metric or task.primary_metric,
            mode or task.mode,
            evaluate_champion=lambda uri, tracking_uri: score_registered_model(
                spec, uri, tracking_uri
            ),
        )
    except Exception as e:  # the run is finished and on disk: say what the gate could not do
        print(f"tether: registry: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}


def score_registered_model(spec: JobSpec, model_uri: str, tracking_uri: str) -> dict[str, float]:
    """A registered model's metrics on this job's validation data (its own tokenizer and
    max_length; its own task rebuilt from its card)."""
    import torch

    from tether.card import read_card
    from tether.registry import discard_download, fetch_model_dir
    from tether.tasks import task_for_card
    from tether.train.loop import evaluate
    from tether.train.strategy import DataParallel

    folder = fetch_model_dir(model_uri, tracking_uri)
    try:
        card = read_card(folder)
        # this job's columns (where its data is), the registered model's own max_length and
        # labels (how it was trained to read them)
        card_task = task_for_card(card)
        data_spec = spec.data.model_copy(update={"max_length": card_task.max_length})
        own = build_task(spec.model_copy(update={"data": data_spec}), list(card_task.labels))
        tokenizer = own.load_tokenizer(str(folder), None, False)
        data = prepare_data(data_spec, own, tokenizer, list(own.labels))
        model = own.load_model(str(folder), None, False).model
        strategy = DataParallel(0, 1, torch.device("cpu"))
        return evaluate(
            model, data.validation, own.with_labels(data.label_names), data.pad_id, spec, strategy
        )
    finally:
        discard_download(folder)


def export_checkpoint(spec: JobSpec, task: Task, checkpoint: Path, out_dir: Path) -> Path:
    """An HF model folder (with its card) from a training checkpoint's weights.

    For a sweep's best trial whose best evaluation is not its final one: the final
    checkpoint is the only one a run exports itself.
    """
    from tether.train.checkpoint import (
        export_hf_model,
        load_trained_weights,
        model_card,
        read_state,
    )
    from tether.train.setup import build_model

    source = resolve_model_source(spec.model.name, spec.storage.path)
    model, _ = build_model(spec, task, source)  # with its adapter, so the checkpoint fits
    missing = load_trained_weights(model, checkpoint)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if [k for k in missing if k in trained]:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not fit the job's model "
            f"(missing {[k for k in missing if k in trained][:3]})"
        )
    tokenizer = task.load_tokenizer(source, spec.model.revision, spec.model.trust_remote_code)
    state = read_state(checkpoint)
    card = model_card(spec.name, task.card(), task, state["anchor"], state["metrics"])
    card["exported_from"] = checkpoint.name
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf_model(model, tokenizer, spec.to_dict(), card, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def summarize(
    spec: JobSpec, task: Task, result, run_name: str, run_dir: Path, data: PreparedData
) -> dict[str, Any]:
    """Final metrics, where the model and checkpoints are, and the data lineage."""
    model_dir = run_dir / "model"
    checkpoint = result.checkpoint
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            exported = Path(ckpt) / HF_MODEL_DIR
            if exported.is_dir():
                shutil.copytree(exported, model_dir, dirs_exist_ok=True)
    metrics = dict(result.metrics or {})
    best = [
        {"path": c.path, "metrics": {k: m[k] for k in m if k.startswith("eval/")}}
        for c, m in (result.best_checkpoints or [])
    ]
    card = card_or_empty(model_dir if model_dir.is_dir() else None)
    return {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "task": task.name,
        "primary_metric": task.primary_metric,
        "mode": task.mode,
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("eval/", "train/"))},
        "step": metrics.get("step"),
        "finished": metrics.get("step") == metrics.get("total_steps"),
        "model_dir": str(model_dir) if model_dir.is_dir() else None,
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "best_checkpoints": best,
        "objective": {
            "lambda": spec.objective.lam,
            "mode": spec.objective.mode,
            "strength": spec.objective.strength,
        },
        "control": control_arm_note(spec),
        "theta_star_sha256": card.get("objective", {}).get("theta_star_sha256"),
        "adapter": card.get("objective", {}).get("adapter"),
        "data": data.lineage,
        "data_stats": data.stats,
        "label_names": data.label_names,
        "tracking_errors": int(metrics.get("tracking_errors", 0) or 0),
    }


def control_arm_note(spec: JobSpec) -> str:
    """What differs between this run and its λ = 0 control: only λ, by default."""
    decay = "on" if spec.optim.decay_anchored else "off"
    return (
        f"weight decay on pretrained parameters: {decay} at every λ (optim.decay_anchored), so a "
        "λ = 0 run of this spec differs only in λ"
    )
