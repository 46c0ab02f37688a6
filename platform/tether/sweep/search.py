"""What a sweep searches: validation of `tune.space`, Tune domains, the λ = 0 control arm.

    validate_sweep(spec)                  # SpecError listing every problem, before any Ray work
    plan = plan_search(spec, data)        # searcher (control arm interleaved) + scheduler

Keys are the spec's dotted keys (``objective.lambda``, ``optim.lr``); only tunables
(objective, optim, train, model.freeze_*) may be searched. The control arm is a fixed list of
λ = 0 configs interleaved with the searcher's suggestions by ``WithControlArm``; the inner
searcher (Optuna TPE or random, or a fixed grid) never sees those trials.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import numpy as np
from pydantic import ValidationError
from ray.tune.search import Searcher

from tether.config import JobSpec, SpecError, TuneSection, apply_updates
from tether.data import PreparedData, steps_per_epoch
from tether.sweep.trial import ARM, trial_spec
from tether.tasks import build_task, metric_names

LAMBDA, LR, STRENGTH = "objective.lambda", "optim.lr", "objective.strength"
TUNABLE_SECTIONS = ("objective", "optim", "train")
TUNABLE_KEYS = ("model.freeze_embeddings", "model.freeze_layers")
NOT_TUNABLE = (
    "train.eval_interval",
    "train.eval_batch_size",
    "train.keep_checkpoints",
    "train.num_threads",
)  # reporting cadence and infrastructure
RUN_LENGTH_KEYS = ("train.epochs", "train.max_steps")  # + batch keys when max_steps is set
# metrics where lower is better; everything else a task reports is better higher
LOWER_IS_BETTER = ("eval/loss", "eval/perplexity", "eval/forgetting")
DEFAULT_NUM_SAMPLES = 8


def metric_direction(metric: str) -> str:
    return "min" if metric in LOWER_IS_BETTER else "max"


def known_direction(metric: str) -> str | None:
    """The direction a metric must be optimised in, where it is not a matter of choice."""
    if metric in LOWER_IS_BETTER:
        return "min"
    if metric.endswith(("accuracy", "f1", "precision", "recall")):
        return "max"
    return None


def sweep_metric(spec: JobSpec) -> tuple[str, str]:
    """(metric, mode) that rank trials: tune.metric or the task's primary, and its direction."""
    t = spec.tune or TuneSection()
    task = build_task(spec)
    metric = t.metric or task.primary_metric
    default_mode = task.mode if metric == task.primary_metric else metric_direction(metric)
    return metric, t.mode or default_mode


def sweep_space(spec: JobSpec):
    return (spec.tune or TuneSection()).resolved_space(spec.objective.mode)


# --------------------------------------------------------------------------- validation


def validate_sweep(spec: JobSpec) -> None:
    """Raise SpecError listing every problem with the spec's `tune` section."""
    problems = sweep_problems(spec)
    if problems:
        raise SpecError(problems, "sweep spec")


def sweep_problems(spec: JobSpec) -> list[str]:
    """Every problem visible before a trial starts: space, metric, scheduler, scaling."""
    t = spec.tune or TuneSection()
    base = spec.to_dict()
    problems = []
    space = sweep_space(spec)
    if not space:
        problems.append("tune.space: empty (search at least objective.lambda or optim.lr)")
    if LAMBDA in space and STRENGTH in space:
        problems.append(
            "tune.space: objective.lambda and objective.strength are exclusive (search one)"
        )
    for key, dim in space.items():
        problems += dimension_problems(key, dim, base, t.search)
    metric, mode = sweep_metric(spec)
    produced = reported_metrics(spec)
    if metric not in produced:
        problems.append(
            f"tune.metric: {metric!r} is not reported by the {spec.model.task} task "
            f"(validation metrics: {', '.join(sorted(produced))})"
        )
    elif t.mode is not None and known_direction(metric) not in (None, t.mode):
        problems.append(
            f"tune.mode: {metric} is better when {metric_direction(metric)}imised (got {t.mode!r})"
        )
    if t.search == "grid" and t.num_samples is not None:
        problems.append("tune.num_samples: not used by search: grid (it runs every combination)")
    a = t.asha
    if a.grace_period is not None and a.max_t is not None and a.grace_period > a.max_t:
        problems.append(f"tune.asha.grace_period: {a.grace_period} exceeds max_t {a.max_t}")
    length_keys = RUN_LENGTH_KEYS + (
        ("train.batch_size", "train.grad_accum_steps") if spec.train.max_steps else ()
    )
    searched_length = [k for k in space if k in length_keys]
    if t.scheduler == "asha" and searched_length and a.max_t is None:
        problems.append(
            f"tune.asha.max_t: set it when the space searches the run length "
            f"({', '.join(searched_length)})"
        )
    if spec.scaling.num_workers < 1:
        problems.append(
            "scaling.num_workers: a trial is a Ray Train run and needs >= 1 worker "
            f"(got {spec.scaling.num_workers})"
        )
    return problems


def strongest_pulls(spec: JobSpec, most: int = 64) -> list[dict[str, Any]]:
    """The points of a decoupled sweep's space whose pull per step is strongest: the largest
    λ or κ and lr, at every end of each other searched key (epochs, batch size, warm-up ...
    change the schedule). A trial anywhere in the space pulls no harder than one of these."""
    space = sweep_space(spec)
    if spec.objective.mode != "decoupled":
        return []
    top = {k: _ends(space[k])[-1] for k in (LAMBDA, STRENGTH, LR) if k in space}
    others = {k: _ends(d) for k, d in space.items() if k not in top}
    corners = [dict(zip(others, c, strict=True)) for c in product(*others.values())]
    return [{**c, **top} for c in corners[:most]]


def _ends(dim) -> list[Any]:
    """A dimension's values, or its two bounds (ascending)."""
    return sorted(dim.values) if dim.values is not None else [dim.low, dim.high]


def pull_problems(spec: JobSpec, num_examples: int) -> list[str]:
    """A decoupled sweep whose space holds trials that would pull θ past θ* in one step:
    found on the driver (it knows the data size), before any trial starts."""
    from tether.train.setup import resolve_strength

    for point in strongest_pulls(spec):
        try:
            resolve_strength(trial_spec(spec.to_dict(), point), num_examples)
        except SpecError as e:
            where = ", ".join(
                f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()
            )
            return [f"tune.space: at {where}, {p}" for p in e.problems]
    return []


def dimension_problems(key: str, dim, base: dict[str, Any], search: str) -> list[str]:
    """Problems with one searched key: unknown, not tunable, bad range, or invalid values."""
    where = f"tune.space.{key}"
    section, _, name = key.partition(".")
    if not isinstance(base.get(section), dict) or name not in base[section]:
        return [
            f"{where}: unknown key (searchable: {', '.join(s + '.*' for s in TUNABLE_SECTIONS)}, "
            f"{', '.join(TUNABLE_KEYS)})"
        ]
    if (section not in TUNABLE_SECTIONS and key not in TUNABLE_KEYS) or key in NOT_TUNABLE:
        return [
            f"{where}: not a hyperparameter (data, model, scaling and storage settings and "
            "the evaluation cadence stay fixed across a sweep)"
        ]
    if dim.values is not None:
        if dim.low is not None or dim.high is not None:
            return [f"{where}: give either values or low/high, not both"]
        if not dim.values:
            return [f"{where}: values is empty"]
        candidates = list(dim.values)
    else:
        if search == "grid":
            return [f"{where}: search: grid needs explicit values (got a range)"]
        if dim.low is None or dim.high is None:
            return [f"{where}: needs low and high, or values"]
        if dim.low >= dim.high:
            kind = "empty" if dim.low == dim.high else "inverted"
            return [f"{where}: {kind} range (got low={dim.low}, high={dim.high})"]
        if dim.scale == "log" and dim.low <= 0:
            return [f"{where}: a log scale needs low > 0 (got low={dim.low}); use scale: linear"]
        if is_integer_key(key) and not (
            float(dim.low).is_integer() and float(dim.high).is_integer()
        ):
            return [
                f"{where}: {key} is an integer: low and high must be integers "
                f"(got {dim.low}, {dim.high})"
            ]
        candidates = [dim.low, dim.high]
    problems = []
    for value in candidates:
        try:
            JobSpec.model_validate(apply_updates(base, {section: {name: value}}))
        except ValidationError as e:  # say which value and why
            problems.append(f"{where}: {value!r} is not a valid {key}: {e.errors()[0]['msg']}")
    return problems


def reported_metrics(spec: JobSpec) -> set[str]:
    """Validation metrics the training loop reports for the spec's task (what a sweep can
    rank on). Per-type keys (eval/f1/PER) depend on the data and are not listed."""
    task = build_task(spec)
    return metric_names(task.with_labels(list(task.example_labels)))


def is_integer_key(key: str) -> bool:
    section, _, name = key.partition(".")
    model = JobSpec.model_fields[section].annotation
    for fname, info in model.model_fields.items():
        if name in (fname, info.alias):
            ann = info.annotation
            args = get_args(ann) if get_origin(ann) in (Union, type(int | None)) else (ann,)
            return int in args and float not in args
    return False


# --------------------------------------------------------------------------- search plan


@dataclass
class SearchPlan:
    """What Tune runs: the searcher (control arm included), scheduler and trial count."""

    searcher: Any  # ray.tune.search.Searcher
    scheduler: Any  # ray.tune.schedulers.TrialScheduler
    num_trials: int
    num_baseline: int
    max_t_epochs: float


def plan_search(spec: JobSpec, data: PreparedData) -> SearchPlan:
    """Searcher over `tune.space` wrapped with the λ = 0 arm, and ASHA (or FIFO)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = spec.tune or TuneSection()
    space = sweep_space(spec)
    metric, mode = sweep_metric(spec)
    if t.search == "grid":
        anchored = grid_configs(space)
        inner = FixedConfigs(anchored, metric, mode)
        num_anchored = len(anchored)
    else:
        num_anchored = t.num_samples or DEFAULT_NUM_SAMPLES
        inner = optuna_searcher(space, metric, mode, t.search, t.seed, num_anchored)
    baseline = baseline_configs(spec, num_anchored) if t.include_baseline else []
    searcher = WithControlArm(inner, baseline, num_anchored + len(baseline))

    max_t = t.asha.max_t or job_epochs(spec, data)
    if t.scheduler == "asha":
        grace = min(t.asha.grace_period or max_t / t.asha.reduction_factor, max_t)
        # "epoch" (not training_iteration) keeps rungs right when a restarted trial's Train
        # run resumes mid-way: Tune's iteration count starts again, the epoch does not
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=max_t,
            grace_period=grace,
            reduction_factor=t.asha.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return SearchPlan(searcher, scheduler, num_anchored + len(baseline), len(baseline), max_t)


def tune_domain(key: str, dim):
    """A Ray Tune domain for one dimension (integers sample integers, bounds inclusive)."""
    from ray import tune

    if dim.values is not None:
        return tune.choice(list(dim.values))
    if is_integer_key(key):
        sample = tune.lograndint if dim.scale == "log" else tune.randint
        return sample(int(dim.low), int(dim.high) + 1)
    return (tune.loguniform if dim.scale == "log" else tune.uniform)(dim.low, dim.high)


def optuna_searcher(space, metric: str, mode: str, search: str, seed: int, num_samples: int):
    """Optuna's TPE, or its random sampler (same searcher interface, so one code path)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if search == "optuna":
        # TPE models only after its startup trials; the default (10) makes small sweeps random
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, num_samples // 3))
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    distributions = OptunaSearch.convert_search_space(
        {key: tune_domain(key, dim) for key, dim in space.items()}
    )
    return OptunaSearch(space=distributions, metric=metric, mode=mode, sampler=sampler)


def grid_configs(space) -> list[dict[str, Any]]:
    """Every combination of the dimensions' values, first key slowest."""
    keys = list(space)
    return [
        dict(zip(keys, combo, strict=True)) for combo in product(*(space[k].values for k in keys))
    ]


def baseline_configs(spec: JobSpec, num_anchored: int) -> list[dict[str, Any]]:
    """The λ = 0 arm: lr spread evenly over its range (or its values); other keys drawn.

    With grid search it is the grid of the other keys at λ = 0.
    """
    t = spec.tune or TuneSection()
    others = {k: d for k, d in sweep_space(spec).items() if k not in (LAMBDA, STRENGTH)}
    if t.search == "grid":
        return [{**c, LAMBDA: 0.0} for c in grid_configs(others)]
    n = t.baseline_samples or max(2, math.ceil(num_anchored / 3))
    rng = np.random.default_rng([t.seed, 1])
    configs = []
    for i in range(n):
        config = {k: draw(k, d, rng) for k, d in others.items() if k != LR}
        if LR in others:
            config[LR] = spread(others[LR], i, n)
        configs.append({**config, LAMBDA: 0.0})
    return configs


def spread(dim, i: int, n: int):
    """The i-th of n values covering a dimension evenly (midpoints of n equal strata)."""
    if dim.values is not None:
        return dim.values[i % len(dim.values)]
    u = (i + 0.5) / n
    if dim.scale == "log":
        return float(math.exp(math.log(dim.low) + u * (math.log(dim.high) - math.log(dim.low))))
    return float(dim.low + u * (dim.high - dim.low))


def draw(key: str, dim, rng: np.random.Generator):
    """One random value of a dimension (log-uniform, uniform or a choice)."""
    if dim.values is not None:
        return dim.values[int(rng.integers(len(dim.values)))]
    lo, hi = (math.log(dim.low), math.log(dim.high)) if dim.scale == "log" else (dim.low, dim.high)
    x = rng.uniform(lo, hi)
    x = math.exp(x) if dim.scale == "log" else x
    return round(x) if is_integer_key(key) else float(x)


def job_epochs(spec: JobSpec, data: PreparedData) -> float:
    """The job's length in epochs, counted the way the training loop counts steps."""
    if spec.train.max_steps is None:
        return float(spec.train.epochs)
    world = max(1, spec.scaling.num_workers)
    per_epoch = steps_per_epoch(
        len(data.train), spec.train.batch_size, spec.train.grad_accum_steps, world
    )
    return spec.train.max_steps / per_epoch


# --------------------------------------------------------------------------- searchers


class FixedConfigs(Searcher):
    """Suggests a fixed list of configs in order (a grid), then FINISHED."""

    def __init__(self, configs: list[dict[str, Any]], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.configs = configs
        self.next = 0

    def suggest(self, trial_id: str):
        if self.next >= len(self.configs):
            return self.FINISHED
        self.next += 1
        return dict(self.configs[self.next - 1])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"configs": self.configs, "next": self.next}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.configs, self.next = state["configs"], state["next"]


class WithControlArm(Searcher):
    """Interleaves fixed λ = 0 configs with an inner searcher's; the inner one never sees them.

    Tune saves and restores wrappers through ``searcher`` / get_state, like ConcurrencyLimiter.
    """

    def __init__(self, searcher, control: list[dict[str, Any]], total: int):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.control = control
        self.total = total
        # spread the control trials through the sweep, so they meet the same ASHA rungs
        self.positions = sorted(
            {int((i + 0.5) * total / len(control)) for i in range(len(control))}
        )
        self.suggested = 0
        self.control_trials: list[str] = []

    def suggest(self, trial_id: str):
        if self.suggested >= self.total:
            return self.FINISHED
        if self.suggested in self.positions:
            config = {**self.control[len(self.control_trials)], ARM: "baseline"}
            self.control_trials.append(trial_id)
        else:
            config = self.searcher.suggest(trial_id)
            if config is None or config == self.FINISHED:
                return config
            config = {**config, ARM: "anchored"}
        self.suggested += 1
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # stopping is the scheduler's job; searchers learn from completed trials only

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if trial_id not in self.control_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
