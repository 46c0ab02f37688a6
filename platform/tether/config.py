"""Job specs: one validated schema at the edge, YAML plus ``key=value`` overrides.

Every problem in a spec is reported at once, each naming its key and the bad value, before
any cluster work starts. Inside the library, functions take plain values from these models.

Sections: tunable hyperparameters (``objective``, ``optim``, most of ``train``) are kept apart
from infrastructure (``scaling``, ``storage``), so a search space only ever touches the former.
Relative paths in a spec resolve against the current working directory and are stored absolute
(Ray workers run in another directory).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGED_PREFIX = "packaged:"
SYNTHETIC_PREFIX = "synthetic:"
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
TASKS = ("sequence-classification",)
DTYPES = ("float32", "bfloat16", "float16")


class SpecError(ValueError):
    """A job spec is invalid; ``problems`` lists every 'key: message (got value)'."""

    def __init__(self, problems: list[str], source: str = "job spec"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class ModelSection(_Section):
    name: str = "packaged:all-MiniLM-L6-v2"
    """Base model: 'packaged:all-MiniLM-L6-v2', a local directory, or a hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    task: Literal["sequence-classification"] = "sequence-classification"
    """What the head predicts. Token classification, QA and causal LM plug in as new tasks."""
    num_labels: int | None = Field(None, ge=2)
    """Number of classes; derived from `label_names` or the data when omitted."""
    label_names: list[str] | None = None
    """Class names in label-id order; string labels in the data map onto these."""
    freeze: list[str] = []
    """Regular expressions: parameters whose name matches one are frozen."""
    freeze_embeddings: bool = False
    """Freeze the embedding layer."""
    freeze_layers: int = Field(0, ge=0)
    """Freeze the first N transformer layers."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype at load (mixed precision is `train.precision`)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the source."""


class DataSection(_Section):
    train: str = "synthetic:sentiment"
    """Training data: a .csv/.tsv/.json/.jsonl/.parquet file, a hub dataset id, or synthetic:sentiment."""
    validation: str | None = None
    """Validation file; when omitted, the hub's `validation_split` or a fraction of train."""
    hub_subset: str | None = None
    """Hub dataset configuration name (e.g. 'sst2' for 'nyu-mll/glue')."""
    train_split: str = "train"
    validation_split: str = "validation"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    rename_columns: dict[str, str] = {}
    """Renames applied to every split before use, e.g. {content: sentence}."""
    max_train_samples: int | None = Field(None, gt=0)
    """Low-data runs: keep this many training examples, sampled with `sample_seed`."""
    max_validation_samples: int | None = Field(None, gt=0)
    sample_seed: int = 0
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the (sampled) training data held out when there is no validation source."""
    max_length: int = Field(128, ge=8, le=8192)
    """Tokens per example; longer texts are truncated. Batches pad to their longest example."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding, same epoch)."""


class ObjectiveSection(_Section):
    lam: float = Field(0.01, alias="lambda", ge=0)
    """λ in L_fine(θ) + λ‖θ − θ*‖²; 0 is plain fine-tuning."""
    mode: Literal["coupled", "decoupled"] = "coupled"
    """coupled: grad += 2λ(θ−θ*); decoupled: θ ← θ − lr·λ(θ−θ*) after each step."""
    anchor_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of θ* (bf16 halves its memory)."""


class OptimSection(_Section):
    lr: float = Field(5e-5, gt=0)
    """Peak AdamW learning rate."""
    new_param_lr_scale: float = Field(1.0, gt=0)
    """Multiplier on lr for newly initialised parameters (the head): they start from scratch."""
    weight_decay: float = Field(0.01, ge=0)
    """Decay toward zero for unanchored parameters (the head; everything when λ = 0)."""
    decay_anchored: bool = False
    """Also decay anchored parameters toward zero when λ > 0 (it fights the anchor)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    """Linear warm-up over this share of the optimizer steps."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm (anchor term included); null disables."""


class TrainSection(_Section):
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides `epochs` when set."""
    batch_size: int = Field(32, ge=1)
    """Examples per worker per micro-batch."""
    grad_accum_steps: int = Field(1, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    eval_interval: int | None = Field(None, ge=1)
    """Evaluate and checkpoint every N optimizer steps; default once per epoch."""
    keep_checkpoints: int = Field(2, ge=1)
    """Keep the best N checkpoints by validation accuracy (the latest is always resumable)."""
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    num_threads: int | None = Field(None, ge=1)
    """torch threads per worker; default: the worker's CPUs."""


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=0)
    """Data-parallel workers (DDP). 0 runs the loop in this process (debugging)."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | None = Field(None, gt=0)
    resources_per_worker: dict[str, float] = {}
    """Extra custom resources per worker, e.g. {accelerator_type:H100: 0.001}."""
    max_failures: int = Field(2, ge=-1)
    """Worker-failure restarts from the last checkpoint (-1: unlimited)."""
    address: str | None = None
    """Ray cluster address; default RAY_ADDRESS, else a local cluster."""


class StorageSection(_Section):
    path: str = "runs"
    """Where runs live (checkpoints, model, summary). Shared (NFS) for multi-node clusters."""
    run_name: str | None = None
    """Default: '<job name>-<timestamp>'. Reusing a name resumes that run."""


class SearchDimension(_Section):
    """One searched spec key: a range `low`..`high` on a `scale`, or explicit `values`."""

    low: float | None = None
    high: float | None = None
    scale: Literal["log", "linear"] = "log"
    """log: uniform in log space (λ, lr); linear: uniform. Integer keys sample integers."""
    values: list[bool | int | float | str | None] | None = None
    """Explicit choices instead of a range (required by `search: grid`)."""


class AshaSection(_Section):
    """Asynchronous successive halving. Times are in epochs (fractions allowed)."""

    grace_period: float | None = Field(None, gt=0)
    """Epochs every trial runs before it can be stopped; default max_t / reduction_factor.
    High-λ trials can start slower and finish better: keep this generous."""
    reduction_factor: float = Field(3.0, gt=1)
    """At each rung only the best 1/reduction_factor of trials continue."""
    max_t: float | None = Field(None, gt=0)
    """Epochs at which a trial ends; default the job's length (train.epochs or max_steps)."""


class TuneSection(_Section):
    """`tether tune`: which keys to search and how. The space may only touch tunables
    (objective, optim, train); the rest of this section is search infrastructure."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Sweep name (folder under storage.path); default '<job name>-sweep-<timestamp>'."""
    space: dict[str, SearchDimension] = {
        "objective.lambda": SearchDimension(low=1e-4, high=1e-1),
        "optim.lr": SearchDimension(low=1e-5, high=3e-4),
    }
    """Dotted spec key → dimension, e.g. {objective.lambda: {low: 1.0e-4, high: 0.1}}."""
    num_samples: int | None = Field(None, ge=1)
    """Anchored trials for random/optuna search (default 8); grid runs every combination."""
    metric: str = "eval/accuracy"
    """Validation metric that ranks trials (the last value each trial reports)."""
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "asha"
    asha: AshaSection = AshaSection()
    search: Literal["random", "optuna", "grid"] = "random"
    """random sampling, Optuna TPE, or every combination of `values`."""
    seed: int = 0
    """Seeds the search algorithm (which configs are tried), not training."""
    include_baseline: bool = True
    """Also run λ = 0 (plain fine-tuning) trials over the same lr range: the control arm."""
    baseline_samples: int | None = Field(None, ge=1)
    """λ = 0 trials, lr spread evenly over its range; default max(2, num_samples / 3).
    With grid search: one per combination of the other keys' values."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once; default as many as the cluster's CPUs/GPUs hold."""
    driver_resources: dict[str, float] = {}
    """Resources of each trial's driver (it only launches the Train run; its workers request
    `scaling`). Empty: none. Use a custom resource to pin drivers to safe nodes."""
    max_failures: int = Field(1, ge=0)
    """Restarts of a trial whose driver failed; its Train run resumes from its checkpoint."""
    keep_checkpoints: Literal["best", "all"] = "best"
    """After the sweep, `best` deletes the checkpoints of finished (completed or stopped)
    trials other than the best, best anchored and best λ = 0 trials: ~270 MB each for MiniLM.
    Their metrics, curves and exported models stay. `all` keeps every checkpoint."""


class TrackingSection(_Section):
    enabled: bool = True
    """Record the run in MLflow."""
    uri: str | None = None
    """Tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    experiment: str = "tether"
    registered_model: str | None = None
    """Registry name for this job's models; default: the job name."""


class JobSpec(_Section):
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    objective: ObjectiveSection = ObjectiveSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    storage: StorageSection = StorageSection()
    tune: TuneSection | None = None
    """Hyperparameter search settings; used by `tether tune` only."""
    tracking: TrackingSection = TrackingSection()
    """MLflow tracking and registry."""

    @model_validator(mode="after")
    def _labels_agree(self) -> JobSpec:
        names, n = self.model.label_names, self.model.num_labels
        if names is not None and n is not None and len(names) != n:
            raise ValueError(
                f"model.label_names has {len(names)} names but model.num_labels is {n}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with YAML keys (``lambda``, not ``lam``)."""
        return self.model_dump(mode="json", by_alias=True)


# --------------------------------------------------------------------------- overrides


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['objective.lambda=0.1', 'model.freeze=[embeddings]'] → nested dict (YAML values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise SpecError([f"override {item!r}: expected key=value, e.g. objective.lambda=0.1"])
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise SpecError([f"{key}: cannot parse value {raw!r} ({e.__class__.__name__})"]) from e
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError([f"{key}: conflicts with another override"])
        node[leaf] = value
    return out


def deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``updates`` into a copy of ``base`` (dicts merge, values replace)."""
    merged = dict(base)
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


# --------------------------------------------------------------------------- loading


def load_job(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    check_files: bool = True,
) -> JobSpec:
    """Read a YAML job spec, apply overrides, validate everything, return the resolved spec."""
    raw: dict[str, Any] = {}
    source = "job spec"
    if path is not None:
        source = str(path)
        raw = read_yaml(Path(path))
    if overrides:
        updates = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        raw = deep_merge(raw, updates)
    return validate_job(raw, source=source, check_files=check_files)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError([f"job spec file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError([f"{path}: not valid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: top level must be a mapping, got {type(raw).__name__}"])
    return raw


def validate_job(
    raw: dict[str, Any], source: str = "job spec", check_files: bool = True
) -> JobSpec:
    """Schema validation plus path/column checks; raises SpecError listing every problem."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        problems = [_format_error(err) for err in e.errors()]
        if check_files:  # still report bad paths/columns in the sections that did parse
            problems += check_sources(*_parseable_sections(raw))
        raise SpecError(problems, source) from None
    spec = _absolutize_paths(spec)
    problems = check_sources(spec.model, spec.data) if check_files else []
    if problems:
        raise SpecError(problems, source)
    return spec


def _parseable_sections(raw: dict[str, Any]) -> tuple[ModelSection | None, DataSection | None]:
    def parse(cls, key):
        try:
            return cls.model_validate(raw.get(key) or {})
        except ValidationError:
            return None

    model, data = parse(ModelSection, "model"), parse(DataSection, "data")
    if model is not None:
        model.name = _absolutize(model.name)
    if data is not None:
        data.train, data.validation = _absolutize(data.train), _absolutize(data.validation)
    return model, data


def _format_error(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    value = err.get("input")
    if isinstance(value, dict) and err["type"] != "model_type":
        return f"{key}: {msg}"
    return f"{key}: {msg} (got {value!r})"


def is_local_path(ref: str) -> bool:
    """A data/model reference that names a local file or folder rather than a hub id."""
    return (
        ref.startswith(("/", "./", "../", "~"))
        or ref.lower().endswith(DATA_FILE_SUFFIXES)
        or Path(ref).exists()
    )


def _absolutize(ref: str | None) -> str | None:
    if ref is None or ref.startswith((PACKAGED_PREFIX, SYNTHETIC_PREFIX)) or not is_local_path(ref):
        return ref
    return str(Path(ref).expanduser().resolve())


def resolve_tracking_uri(spec_uri: str | None) -> str:
    """Spec value, then MLFLOW_TRACKING_URI, then a SQLite file in the working directory.

    Resolved once, on the driver: trial actors and workers run in other directories.
    """
    import os

    uri = (
        spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"  # relative file → absolute
    return uri


def _absolutize_paths(spec: JobSpec) -> JobSpec:
    spec.tracking.uri = resolve_tracking_uri(spec.tracking.uri)
    spec.model.name = _absolutize(spec.model.name)
    spec.data.train = _absolutize(spec.data.train)
    spec.data.validation = _absolutize(spec.data.validation)
    spec.storage.path = str(Path(spec.storage.path).expanduser().resolve())
    return spec


# --------------------------------------------------------------------------- source checks


def check_sources(model_section: ModelSection | None, data: DataSection | None) -> list[str]:
    """Problems with the model and data references that can be seen without loading them."""
    problems = []
    model = model_section.name if model_section is not None else ""
    if not model:
        pass
    elif model.startswith(PACKAGED_PREFIX):
        from tether.models import PACKAGED_MODELS

        if model[len(PACKAGED_PREFIX) :] not in PACKAGED_MODELS:
            problems.append(
                f"model.name: unknown packaged model {model!r} (known: "
                + ", ".join(PACKAGED_PREFIX + k for k in PACKAGED_MODELS)
                + ")"
            )
    elif is_local_path(model) and not Path(model).is_dir():
        problems.append(f"model.name: no such model directory (got {model!r})")

    if data is None:
        return problems
    needed = [data.text_column, data.label_column] + (
        [data.text_pair_column] if data.text_pair_column else []
    )
    for key in ("train", "validation"):
        ref = getattr(data, key)
        if ref is None:
            continue
        if ref.startswith(SYNTHETIC_PREFIX):
            problems += _check_synthetic(key, ref, data)
        elif is_local_path(ref):
            problems += _check_file(f"data.{key}", ref, needed, data.rename_columns)
    return problems


def _check_synthetic(key: str, ref: str, data: DataSection) -> list[str]:
    from tether.data import SYNTHETIC_SOURCES

    name = ref[len(SYNTHETIC_PREFIX) :]
    if name not in SYNTHETIC_SOURCES:
        return [f"data.{key}: unknown synthetic dataset {ref!r} (known: synthetic:sentiment)"]
    problems = []
    for col_key in ("text_column", "label_column"):
        if getattr(data, col_key) not in ("text", "label"):
            problems.append(
                f"data.{col_key}: synthetic data has columns text and label "
                f"(got {getattr(data, col_key)!r})"
            )
    if data.text_pair_column:
        problems.append("data.text_pair_column: synthetic data has no text pairs")
    return problems


def _check_file(key: str, ref: str, needed: list[str], renames: dict[str, str]) -> list[str]:
    path = Path(ref)
    if not path.is_file():
        return [f"{key}: file not found (got {ref!r})"]
    if path.suffix.lower() not in DATA_FILE_SUFFIXES:
        return [f"{key}: unsupported file type {path.suffix!r} (use one of {DATA_FILE_SUFFIXES})"]
    try:
        columns = {renames.get(c, c) for c in read_columns(path)}
    except Exception as e:  # unreadable file: say which and why
        return [f"{key}: cannot read {ref!r}: {e}"]
    missing = [c for c in needed if c not in columns]
    if missing:
        return [
            f"{key}: column(s) {missing} not in {path.name} (has {sorted(columns)}); "
            "set data.text_column / data.label_column or data.rename_columns"
        ]
    return []


def read_columns(path: Path) -> list[str]:
    """Column names of a data file, reading only its head."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return list(json.loads(f.readline()).keys())
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, dict):  # column-oriented {"text": [...], "label": [...]}
            return list(rows.keys())
        return list(rows[0].keys()) if rows else []
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)
