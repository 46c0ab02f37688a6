"""Tasks: everything that differs between kinds of fine-tuning, behind one Protocol.

A task owns its model head, how rows become arrays, its loss (summed, with the number of
labelled units it covers), evaluation as *additive* counts (summed across workers with one
all-reduce, so metrics are exact under data parallelism), its primary metric and that
metric's direction, its model card block and its serving predictor. The training loop, the
sweep, the registry and the serving core ask the task; none of them asks which task it is.

    task = build_task(spec)                     # settings as flat values; labels come later
    task = task.with_labels(data.label_names)   # after the driver has read the data

Adding a task: a module here with a class satisfying ``Task``, one entry in ``TASKS``, its
name in ``tether.config.TaskName`` and its columns in ``tether.config.task_columns``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from tether.config import JobSpec
    from tether.data import Encoded
    from tether.models import LoadedModel

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Task(Protocol):
    name: str
    primary_metric: str  # what model selection ranks on, e.g. "eval/accuracy"
    mode: str  # "max" or "min": the primary metric's direction
    label_column: str | None  # the column whose hub ClassLabel names label ids, if any
    labels: tuple[str, ...]  # class or tag names in id order ((), for causal LMs)

    def with_labels(self, labels: list[str]) -> Task: ...

    def cache_key(self) -> dict[str, Any]:
        """Settings that change the encoding (part of the encoded-data cache key)."""
        ...

    # -- data (driver) -------------------------------------------------------------------
    def label_names(
        self, rows: list[dict], declared: list[str] | None, hub_names: list[str] | None
    ) -> list[str]: ...

    def encode(self, rows: list[dict], tokenizer, split: str) -> tuple[Encoded, dict[str, int]]:
        """Arrays for one split, and counts worth reporting (truncated, dropped)."""
        ...

    # -- model and training (workers) ----------------------------------------------------
    def load_tokenizer(self, source: str, revision: str | None, trust_remote_code: bool): ...

    def load_model(
        self, source: str, revision: str | None, trust_remote_code: bool
    ) -> LoadedModel: ...

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of labelled units): examples, tags or target tokens."""
        ...

    def eval_counts(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Additive statistics of one batch: float64, the same shape for every batch."""
        ...

    def num_counts(self) -> int:
        """The length of ``eval_counts``' vector."""
        ...

    def eval_metrics(self, counts: torch.Tensor) -> dict[str, float]: ...

    def extra_splits(
        self, source: str, revision: str | None, trust_remote_code: bool, tokenizer
    ) -> tuple[dict[str, Encoded], dict[str, float]]:
        """Splits the task scores besides validation (built on the driver from the base
        model, e.g. the forgetting probe), and constants its metrics need."""
        ...

    def extra_metrics(self, model: torch.nn.Module, tokenizer, data, score) -> dict[str, float]:
        """Metrics beyond the validation counts. ``score(split, counts_fn, size)`` returns a
        split's additive counts summed over all workers (the loop's exact evaluation)."""
        ...

    def samples(
        self, model: torch.nn.Module, tokenizer, split: Encoded, n: int
    ) -> list[dict[str, str]]:
        """A few generations for the run log (rank 0; [] for tasks that do not generate)."""
        ...

    # -- export and serving --------------------------------------------------------------
    def card(self) -> dict[str, Any]:
        """The task block of the model card (tether.json): labels, max_length, ..."""
        ...

    def request_model(self, max_items: int, max_chars: int) -> type:
        """The pydantic model of a POST /v1/predict body (its JSON schema is published)."""
        ...

    def request_example(self) -> dict[str, Any]:
        """A valid POST /v1/predict body, for the docs."""
        ...

    def prediction_model(self) -> type: ...

    def predictor(
        self, model_dir, card: dict[str, Any], max_batch_tokens: int, quantize: bool = False
    ):
        """A loaded model that answers requests (see ``tether.tasks.predict.Predictor``)."""
        ...


class ValidationOnly:
    """For tasks scored on their validation split alone: no other split, no metrics beyond
    the validation counts, nothing generated for the run log."""

    def extra_splits(self, source, revision, trust_remote_code, tokenizer):
        return {}, {}

    def extra_metrics(self, model, tokenizer, data, score) -> dict[str, float]:
        return {}

    def samples(self, model, tokenizer, split, n: int) -> list[dict[str, str]]:
        return []


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a Hugging Face model's forward takes (the rest are targets and extras)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def metric_names(task: Task) -> set[str]:
    """The validation metrics a task reports (what a sweep may rank on)."""
    zeros = torch.zeros(task.num_counts(), dtype=torch.float64)
    return set(task.eval_metrics(zeros)) - {"eval/num_examples"}


# name → "module:Class"; imported on first use, so `import tether.tasks` stays light
TASKS: dict[str, str] = {
    "sequence-classification": "tether.tasks.classification:SequenceClassification",
    "token-classification": "tether.tasks.token_classification:TokenClassification",
    "question-answering": "tether.tasks.question_answering:QuestionAnswering",
    "causal-lm": "tether.tasks.causal_lm:CausalLM",
}


def task_class(name: str):
    """The class implementing task ``name`` (each has from_spec and from_card)."""
    import importlib

    if name not in TASKS:
        raise ValueError(f"model.task: unknown task {name!r} (known: {sorted(TASKS)})")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_task(spec: JobSpec, labels: list[str] | None = None) -> Task:
    """The spec's task with its settings as flat values (and its labels, when known)."""
    task = task_class(spec.model.task).from_spec(spec)
    return task.with_labels(labels) if labels is not None else task


def task_for_card(card: dict[str, Any]) -> Task:
    """The task of an exported model, rebuilt from its card (serving, re-scoring)."""
    return task_class(card.get("task", "sequence-classification")).from_card(card)
