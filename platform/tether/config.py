"""Job specs: one validated schema at the edge, YAML plus ``key=value`` overrides.

Every problem in a spec is reported at once, each naming its key and the bad value, before
any cluster work starts. Inside the library, functions take plain values from these models.

Sections: tunable hyperparameters (``objective``, ``optim``, most of ``train``) are kept apart
from infrastructure (``scaling``, ``storage``), so a search space only ever touches the former.
Relative paths in a spec resolve against the current working directory and are stored absolute
(Ray workers run in another directory).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tether.errors import SpecError
from tether.sources import (
    DATA_FILE_SUFFIXES,
    PACKAGED_MODELS,
    PACKAGED_PREFIX,
    REGISTRY_PREFIX,
    SYNTHETIC_DATASETS,
    SYNTHETIC_PREFIX,
    is_conll,
    is_local_path,
    read_columns,
)

__all__ = ["JobSpec", "SpecError", "load_job", "validate_job", "parse_overrides", "deep_merge"]

TaskName = Literal[
    "sequence-classification", "token-classification", "question-answering", "causal-lm"
]
TASK_NAMES: tuple[str, ...] = TaskName.__args__
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # also a folder name: no '/', no leading '.'
# MLflow refuses '/' and ':' in a registered name; '@' splits models:/NAME@ALIAS, whitespace
# is not matched by a models:/ reference and a quote breaks the registry's name='...' filter
REGISTERED_NAME_FORBIDS = re.compile(r"[/:@'\"\s]")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class AdapterSection(_Section):
    type: Literal["lora"] = "lora"
    """Low-rank adapters (peft LoRA): W = W₀ + (alpha/r)·B·A on the target modules, the base
    frozen; the anchor is λ‖(alpha/r)·B·A‖² in closed form (README, "LoRA")."""
    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module-name suffixes to adapt (e.g. [q_proj, v_proj]), or every Linear but the head."""
    modules_to_save: list[str] = []
    """Pretrained modules to train in full besides the task's new head (always trained)."""


class ModelSection(_Section):
    name: str = "packaged:all-MiniLM-L6-v2"
    """Base model: 'packaged:all-MiniLM-L6-v2', 'packaged:SmolLM2-135M-Instruct', a local
    directory, or a hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    task: TaskName = "sequence-classification"
    """What the model learns: sequence-classification, token-classification (NER),
    question-answering (extractive, SQuAD), causal-lm."""
    num_labels: int | None = Field(None, ge=2)
    """Number of classes; derived from `label_names` or the data when omitted."""
    label_names: list[str] | None = None
    """Class (or tag) names in label-id order; string labels in the data map onto these."""
    freeze: list[str] = []
    """Regular expressions: parameters whose name matches one are frozen."""
    freeze_embeddings: bool = False
    """Freeze the embedding layer."""
    freeze_layers: int = Field(0, ge=0)
    """Freeze the first N transformer layers."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype at load. Trained weights must be float32 (see train.precision)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the source."""
    adapter: AdapterSection | None = None
    """Train a LoRA adapter instead of every weight (null: full fine-tuning)."""

    @field_validator("label_names")
    @classmethod
    def _label_names_are_distinct(cls, names: list[str] | None) -> list[str] | None:
        # two ids with one name: a string label in the data could not say which it means
        repeated = sorted({n for n in names or [] if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each name must be distinct; repeated: {repeated}")
        return names


class DataSection(_Section):
    train: str = "synthetic:sentiment"
    """Training data: a .csv/.tsv/.json/.jsonl/.parquet file, a CoNLL .txt/.conll file, a hub
    dataset id, or synthetic:sentiment|entities|chat."""
    validation: str | None = None
    """Validation file; when omitted, the hub's `validation_split` or a fraction of train."""
    hub_subset: str | None = None
    """Hub dataset configuration name (e.g. 'sst2' for 'nyu-mll/glue')."""
    hub_revision: str | None = None
    """Hub dataset revision (commit); part of the encoded-data cache key."""
    train_split: str = "train"
    validation_split: str = "validation"
    text_column: str = "text"
    """sequence-classification: the text; causal-lm: plain text (continued pre-training)."""
    text_pair_column: str | None = None
    label_column: str = "label"
    tokens_column: str = "tokens"
    """token-classification: the words of a sentence (a list of strings)."""
    tags_column: str = "ner_tags"
    """token-classification: one tag per word (IOB1, IOB2/BIO or IOBES; names or ids)."""
    question_column: str = "question"
    """question-answering: the question."""
    context_column: str = "context"
    """question-answering: the passage the answer is a span of."""
    answers_column: str = "answers"
    """question-answering: {text: [...], answer_start: [...]} (character offsets into the
    context; SQuAD v1.1/v2.0 JSON files are read into this layout)."""
    id_column: str = "id"
    """question-answering: the example id that errors name (else the file and line)."""
    doc_stride: int | None = Field(None, ge=1)
    """question-answering: tokens shared by consecutive windows of a long context (default:
    a quarter of max_length)."""
    max_question_length: int | None = Field(None, ge=1)
    """question-answering: questions are cut to this many tokens, the rest of max_length
    reads the context (default: a quarter of max_length)."""
    unanswerable: bool = False
    """question-answering: questions may have no answer in the context (SQuAD v2.0); the
    model may then answer nothing (eval.null_score_threshold)."""
    skip_bad: bool = False
    """question-answering: count and skip examples whose answer is not at its offset in the
    context, instead of failing on the first one."""
    messages_column: str = "messages"
    """causal-lm: chat turns [{role, content}, ...], rendered with the model's chat template."""
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    """causal-lm: prompt + completion pairs (the loss covers the completion)."""
    rename_columns: dict[str, str] = {}
    """Renames applied to every split before use, e.g. {content: sentence}."""
    max_train_samples: int | None = Field(None, gt=0)
    """Low-data runs: keep this many training examples, sampled with `sample_seed`."""
    max_validation_samples: int | None = Field(None, gt=0)
    sample_seed: int = 0
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the (sampled) training data held out when there is no validation source."""
    max_length: int = Field(128, ge=8, le=32768)
    """Tokens per example; longer examples are truncated (counted in the summary)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding, same epoch)."""
    packing: bool = False
    """causal-lm: pack several short examples into rows of up to max_length tokens (less
    padding). Attention then crosses example boundaries within a row; each example's loss
    still covers only its own targets."""


class ObjectiveSection(_Section):
    lam: float = Field(0.01, alias="lambda", ge=0)
    """λ in L_fine(θ) + λ‖θ − θ*‖²; 0 is plain fine-tuning."""
    mode: Literal["coupled", "decoupled"] = "coupled"
    """coupled: grad += 2λ(θ−θ*); decoupled: θ ← θ − lr·λ(θ−θ*) after each step (the gradient
    of (λ/2)‖θ−θ*‖², so a decoupled λ is not a coupled λ)."""
    anchor_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of θ*. bfloat16/float16 halve its memory and also round the starting
    weights to that dtype, so θ starts exactly at the stored θ*."""
    strength: float | None = Field(None, ge=0)
    """κ = λ·Σ_t lr_t, the decoupled pull's total strength (dimensionless), instead of λ: λ is
    derived from the run's own schedule before step 0, so one κ means the same at any data
    size or run length. A displacement the data stops pushing shrinks by ≈e^(−κ) over the
    run: κ ≪ 1 does little, κ ≫ 1 pins θ to θ*. Decoupled mode only; exclusive with `lambda`."""
    clip: Literal["total", "fine_only"] = "total"
    """Gradient clipping (optim.max_grad_norm) of the fine-tuning gradient plus the coupled
    anchor term (total), or of the fine-tuning gradient alone, the anchor term added after
    (fine_only: a large anchor term no longer shrinks the data's gradient)."""

    @model_validator(mode="after")
    def _strength_is_decoupled_and_alone(self) -> ObjectiveSection:
        if self.strength is None:
            return self
        if "lam" in self.model_fields_set:
            raise ValueError(
                "objective.strength and objective.lambda are exclusive: strength derives λ "
                "from the run's schedule (λ = strength / Σ lr_t)"
            )
        if self.mode != "decoupled":
            raise ValueError(
                "objective.strength needs mode: decoupled (a coupled anchor's gradient is "
                "rescaled per coordinate by AdamW, so λ·Σ lr_t does not measure its pull)"
            )
        return self


Beta = Annotated[float, Field(ge=0, lt=1)]  # AdamW refuses a beta outside [0, 1)


class OptimSection(_Section):
    lr: float = Field(5e-5, gt=0)
    """Peak AdamW learning rate."""
    new_param_lr_scale: float = Field(1.0, gt=0)
    """Multiplier on lr for newly initialised parameters (the head): they start from scratch."""
    weight_decay: float = Field(0.01, ge=0)
    """Decay toward zero for new parameters (the head)."""
    decay_anchored: bool = False
    """Also decay pretrained (anchorable) parameters toward zero, at every λ including 0. Off:
    it would fight the anchor, and the λ = 0 control arm must differ only in λ."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW's moment decay rates (β₁, β₂), each in [0, 1)."""
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
    """Keep the best N checkpoints by the task's primary metric (a sweep's: its tune.metric),
    plus the latest (always resumable)."""
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU. Weights stay fp32 in every mode."""
    num_threads: int | None = Field(None, ge=1)
    """torch threads per worker; default: the worker's CPUs."""
    head_warmup_steps: int = Field(0, ge=0)
    """LP-FT: train only the new head (a linear probe) for this many optimizer steps, then
    everything, anchored. The backbone stays exactly θ* meanwhile (its gradients are dropped:
    the probe steps cost as much compute as full steps)."""
    gradient_checkpointing: bool = False
    """Recompute activations during backward: less memory, about a third more compute."""


class EvalSection(_Section):
    """What a task measures at each evaluation besides its counts: generation and forgetting
    (causal-lm), span decoding (question-answering)."""

    generate_examples: int = Field(32, ge=0)
    """Validation examples answered greedily for eval/exact_match (0: off)."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Tokens generated per answer (exact match, samples)."""
    samples: int = Field(4, ge=0)
    """Generated answers logged to MLflow as a table (prompt, reference, answer, step)."""
    forgetting_probe: str = "builtin"
    """'builtin' (tether's general prompts), 'none', or a JSONL file with a `prompt` field:
    eval/forgetting = NLL of θ*'s own greedy answers now, minus θ*'s."""
    probe_max_new_tokens: int = Field(48, ge=1, le=1024)
    """Tokens of θ*'s greedy answer to each probe prompt."""
    max_answer_length: int = Field(30, ge=1)
    """question-answering: the longest answer span considered, in tokens."""
    null_score_threshold: float = 0.0
    """question-answering with data.unanswerable: answer nothing when the no-answer score
    beats the best span's by more than this (raise it to answer less often)."""


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=0)
    """Data-parallel workers. 0 runs the loop in this process (debugging)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every worker holds the whole model, θ* and Adam state. fsdp: PyTorch FSDP2, each
    worker holds 1/num_workers of them (θ* too): for models that do not fit one device."""
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
    run_name: str | None = Field(None, pattern=NAME_PATTERN)
    """Default: '<job name>-<timestamp>-<random>'. Reusing a name resumes that run, if it is
    the same run (same spec, data and workers); a finished run is not trained again."""


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


# where the anchor acts (measured: benchmarks/anchoring_quality.py and docs/benchmarks.md):
# coupled λ multiplies a gradient, decoupled λ·lr is a per-step pull, so their scales differ
DEFAULT_LAMBDA_RANGE = {"coupled": (1e-4, 1e-1), "decoupled": (1.0, 3e3)}  # 3e3 × the top lr < 1
DEFAULT_LR_RANGE = (1e-5, 3e-4)


class TuneSection(_Section):
    """`tether tune`: which keys to search and how. The space may only touch tunables
    (objective, optim, train); the rest of this section is search infrastructure."""

    name: str | None = Field(None, pattern=NAME_PATTERN)
    """Sweep name (folder under storage.path); default '<job name>-sweep-<timestamp>'."""
    space: dict[str, SearchDimension] | None = None
    """Dotted spec key → dimension, e.g. {objective.lambda: {low: 1.0e-4, high: 0.1}}.
    Default: λ log-uniform over 1e-4..0.1 (coupled) or 1..3e3 (decoupled) and lr over
    1e-5..3e-4."""
    num_samples: int | None = Field(None, ge=1)
    """Anchored trials for random/optuna search (default 8); grid runs every combination."""
    metric: str | None = None
    """Validation metric that ranks trials (each trial by its best evaluation); default the
    task's primary metric (eval/accuracy, eval/entity_f1, eval/loss)."""
    mode: Literal["max", "min"] | None = None
    """Default: the metric's direction (min for losses)."""
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

    def resolved_space(self, mode: str) -> dict[str, SearchDimension]:
        """The space to search: the given one, or the default for the objective's mode."""
        if self.space is not None:
            return self.space
        low, high = DEFAULT_LAMBDA_RANGE[mode]
        return {
            "objective.lambda": SearchDimension(low=low, high=high),
            "optim.lr": SearchDimension(low=DEFAULT_LR_RANGE[0], high=DEFAULT_LR_RANGE[1]),
        }


class TrackingSection(_Section):
    enabled: bool = True
    """Record the run in MLflow."""
    uri: str | None = None
    """Tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    experiment: str = "tether"
    """MLflow experiment name (not empty)."""
    registered_model: str | None = None
    """Registry name for this job's models; default: the job name. No '/', ':', '@', quotes
    or whitespace (MLflow refuses some, the others break `models:/NAME@ALIAS`)."""

    @field_validator("experiment")
    @classmethod
    def _experiment_is_named(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("an MLflow experiment needs a name")
        return name

    @field_validator("registered_model")
    @classmethod
    def _registered_name_fits_a_uri(cls, name: str | None) -> str | None:
        if name is None:
            return None
        if name in ("", ".", ".."):
            raise ValueError("a registered model needs a name other than '', '.' or '..'")
        bad = sorted(set(REGISTERED_NAME_FORBIDS.findall(name)))
        if bad:
            raise ValueError(
                f"{bad} cannot be in a registered model name: MLflow refuses '/' and ':', and "
                "'@', quotes or whitespace break models:/NAME@ALIAS references"
            )
        return name


class JobSpec(_Section):
    name: str = Field("job", pattern=NAME_PATTERN)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    objective: ObjectiveSection = ObjectiveSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    storage: StorageSection = StorageSection()
    eval: EvalSection = EvalSection()
    """Generation and forgetting (causal-lm), span decoding (question-answering)."""
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

    @model_validator(mode="after")
    def _head_warmup_needs_a_head(self) -> JobSpec:
        if self.train.head_warmup_steps and self.model.task == "causal-lm":
            raise ValueError(
                "train.head_warmup_steps: a causal LM has no new head to warm up (set it to 0)"
            )
        return self

    @model_validator(mode="after")
    def _windows_fit(self) -> JobSpec:
        if self.model.task == "question-answering":
            d = self.data
            check_windows(d.max_length, qa_stride(d), qa_question_length(d), 3)
        return self

    @model_validator(mode="after")
    def _trained_weights_are_fp32(self) -> JobSpec:
        if self.model.dtype != "float32":
            # measured: at lr 5e-5 only ~28% of an AdamW step survives bf16 rounding, and the
            # anchor term is as small as the rounding error; autocast keeps fp32 master weights
            raise ValueError(
                f"model.dtype: trained weights must be float32 (got {self.model.dtype!r}): "
                "half-precision weights lose most of each update to rounding. For bf16/fp16 "
                "compute with fp32 weights set train.precision: bf16-mixed (or fp16-mixed)"
            )
        return self

    @model_validator(mode="after")
    def _adapters_freeze_the_base_themselves(self) -> JobSpec:
        m = self.model
        if m.adapter is not None and (m.freeze or m.freeze_layers or m.freeze_embeddings):
            # peft freezes the whole base and adapts whatever target_modules names, frozen or
            # not: a freeze setting would silently do nothing
            raise ValueError(
                "model.freeze/freeze_layers/freeze_embeddings: not with model.adapter, whose "
                "base is frozen already; choose what adapts with model.adapter.target_modules"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_is_supported_here(self) -> JobSpec:
        if self.scaling.strategy != "fsdp":
            return self
        if self.scaling.num_workers == 0:
            raise ValueError(
                "scaling.strategy: fsdp shards the model over Ray Train workers; set "
                "scaling.num_workers >= 1 (0 runs in this process, unsharded)"
            )
        if self.model.adapter is not None:
            raise ValueError(
                "scaling.strategy: fsdp is not supported with model.adapter (LoRA trains a few "
                "million parameters beside a frozen base: use ddp)"
            )
        if self.train.precision == "fp16-mixed":
            raise ValueError(
                "train.precision: fp16-mixed needs a sharded loss scaler under FSDP; use "
                "bf16-mixed (or auto) with scaling.strategy: fsdp"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with YAML keys (``lambda``, not ``lam``): the job as written, so with
        ``objective.strength`` the λ derived from it is left out (it is recorded apart)."""
        out = self.model_dump(mode="json", by_alias=True)
        if self.objective.strength is not None:
            out["objective"].pop("lambda", None)
        return out


def qa_stride(data: DataSection) -> int:
    return data.doc_stride or data.max_length // 4


def qa_question_length(data: DataSection) -> int:
    return data.max_question_length or data.max_length // 4


def check_windows(max_length: int, doc_stride: int, max_question: int, specials: int) -> None:
    """Every window holds the question, the special tokens and the stride's overlap, and must
    still move forward through the context."""
    if max_question + doc_stride + specials >= max_length:
        raise ValueError(
            f"data.doc_stride: a window of data.max_length {max_length} tokens must hold the "
            f"question (data.max_question_length {max_question}), {specials} special tokens "
            f"and the overlap (data.doc_stride {doc_stride}) and still advance; lower "
            "doc_stride or max_question_length, or raise max_length"
        )


# --------------------------------------------------------------------------- overrides


def apply_updates(job: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """``job`` with nested ``updates`` merged in. λ and its strength κ replace each other:
    setting one drops the other from the job (a dumped spec carries λ's default)."""
    objective = updates.get("objective") or {}
    drop = {"strength": "lambda", "lambda": "strength"}
    if any(key in objective for key in drop) and isinstance(job.get("objective"), dict):
        gone = {drop[key] for key in objective if key in drop}
        job = {**job, "objective": {k: v for k, v in job["objective"].items() if k not in gone}}
    return deep_merge(job, updates)


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
        raw = apply_updates(raw, updates)
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
    """Schema validation plus source checks; raises SpecError listing every problem.

    ``check_files=False`` (`tether submit`: the files are read where the job runs) still checks
    the references that need no local file: packaged and registered model names, synthetic
    datasets and their task."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        problems = [_format_error(err) for err in e.errors()]
        # still report bad references in the sections that did parse
        problems += check_sources(*_parseable_sections(raw), check_files=check_files)
        raise SpecError(problems, source) from None
    spec = _absolutize_paths(spec)
    problems = check_sources(spec.model, spec.data, check_files=check_files)
    probe = spec.eval.forgetting_probe
    if check_files and probe not in ("builtin", "none") and not Path(probe).is_file():
        problems.append(f"eval.forgetting_probe: file not found (got {probe!r})")
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
    msg = err["msg"].removeprefix("Value error, ")  # our validators' own words
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    value = err.get("input")
    if err["type"] == "value_error" and not err["loc"]:
        return msg  # our own validators name their key
    if isinstance(value, dict) and err["type"] != "model_type":
        return f"{key}: {msg}"
    return f"{key}: {msg} (got {value!r})"


def _absolutize(ref: str | None) -> str | None:
    if (
        ref is None
        or ref.startswith((PACKAGED_PREFIX, SYNTHETIC_PREFIX, REGISTRY_PREFIX))
        or not is_local_path(ref)
    ):
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
    if spec.eval.forgetting_probe not in ("builtin", "none"):
        spec.eval.forgetting_probe = str(Path(spec.eval.forgetting_probe).expanduser().resolve())
    spec.model.name = _absolutize(spec.model.name)
    spec.data.train = _absolutize(spec.data.train)
    spec.data.validation = _absolutize(spec.data.validation)
    spec.storage.path = str(Path(spec.storage.path).expanduser().resolve())
    return spec


# --------------------------------------------------------------------------- source checks


def task_columns(task: str, data: DataSection) -> list[dict[str, str]]:
    """The column sets a task can read, as {spec key: column}; the data needs one of them."""
    if task == "sequence-classification":
        needed = {"data.text_column": data.text_column, "data.label_column": data.label_column}
        if data.text_pair_column:
            needed["data.text_pair_column"] = data.text_pair_column
        return [needed]
    if task == "token-classification":
        return [{"data.tokens_column": data.tokens_column, "data.tags_column": data.tags_column}]
    if task == "question-answering":
        return [
            {
                "data.question_column": data.question_column,
                "data.context_column": data.context_column,
                "data.answers_column": data.answers_column,
            }
        ]
    return [  # causal-lm: chat, prompt/completion pairs, or plain text
        {"data.messages_column": data.messages_column},
        {
            "data.prompt_column": data.prompt_column,
            "data.completion_column": data.completion_column,
        },
        {"data.text_column": data.text_column},
    ]


def check_sources(
    model_section: ModelSection | None, data: DataSection | None, check_files: bool = True
) -> list[str]:
    """Problems with the model and data references that can be seen without loading them;
    local files and folders only with ``check_files``."""
    name = model_section.name if model_section is not None else ""
    problems = _model_problems(name, check_files)
    if data is None:
        return problems
    task = model_section.task if model_section is not None else "sequence-classification"
    alternatives = task_columns(task, data)
    for key in ("train", "validation"):
        ref = getattr(data, key)
        if ref is None:
            continue
        if ref.startswith(SYNTHETIC_PREFIX):
            problems += _check_synthetic(f"data.{key}", ref, task, alternatives)
        elif check_files and is_local_path(ref):
            problems += _check_file(f"data.{key}", ref, alternatives, data.rename_columns)
    return problems


REGISTERED_MODEL = re.compile(r"^models:/[^/@\s]+(?:@[^/@\s]+|/\d+)$")


def _model_problems(model: str, check_files: bool = True) -> list[str]:
    if model.startswith(REGISTRY_PREFIX) and not REGISTERED_MODEL.match(model):
        return [
            f"model.name: a registered model is models:/NAME@ALIAS or models:/NAME/VERSION "
            f"(got {model!r})"
        ]
    if model.startswith(PACKAGED_PREFIX) and model[len(PACKAGED_PREFIX) :] not in PACKAGED_MODELS:
        known = ", ".join(PACKAGED_PREFIX + k for k in PACKAGED_MODELS)
        return [f"model.name: unknown packaged model {model!r} (known: {known})"]
    if check_files and model and not model.startswith((PACKAGED_PREFIX, REGISTRY_PREFIX)):
        if is_local_path(model) and not Path(model).is_dir():
            return [f"model.name: no such model directory (got {model!r})"]
    return []


def _check_synthetic(key: str, ref: str, task: str, alternatives) -> list[str]:
    name = ref[len(SYNTHETIC_PREFIX) :]
    if name not in SYNTHETIC_DATASETS:
        known = ", ".join(SYNTHETIC_PREFIX + k for k in SYNTHETIC_DATASETS)
        return [f"{key}: unknown synthetic dataset {ref!r} (known: {known})"]
    dataset = SYNTHETIC_DATASETS[name]
    if dataset.task != task:
        return [f"{key}: {ref} is {dataset.task} data, but model.task is {task!r}"]
    return _missing_columns(key, ref, set(dataset.columns), alternatives)


def _check_file(key: str, ref: str, alternatives, renames: dict[str, str]) -> list[str]:
    path = Path(ref)
    if not path.is_file():
        return [f"{key}: file not found (got {ref!r})"]
    if path.suffix.lower() not in DATA_FILE_SUFFIXES:
        return [f"{key}: unsupported file type {path.suffix!r} (use one of {DATA_FILE_SUFFIXES})"]
    try:
        columns = {renames.get(c, c) for c in read_columns(path)}
    except Exception as e:  # unreadable file: say which and why
        return [f"{key}: cannot read {ref!r}: {type(e).__name__}: {e}"]
    if is_conll(path):
        return []  # the reader builds the token-classification columns itself
    return _missing_columns(key, path.name, columns, alternatives)


def _missing_columns(key: str, where: str, columns: set[str], alternatives) -> list[str]:
    if any(set(option.values()) <= columns for option in alternatives):
        return []
    wanted = " or ".join(
        "+".join(f"{col!r} ({k})" for k, col in option.items()) for option in alternatives
    )
    return [
        f"{key}: {where} lacks the columns the task reads: {wanted} (has {sorted(columns)}); "
        "set the data.*_column keys or data.rename_columns"
    ]
