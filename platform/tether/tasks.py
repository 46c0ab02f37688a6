"""Tasks: what the head predicts and how it is scored, behind one small Protocol.

The training loop only needs a task to name its Auto* model class and to turn a validation
batch into *additive* counts (so they can be summed across workers with one all-reduce) and
counts into metrics. Token classification, extractive QA and causal LM add a class here and
their own encoding in ``data``; the loop does not change.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Task(Protocol):
    name: str
    primary_metric: str  # the key model selection ranks on, e.g. "eval/accuracy"

    def model_class(self): ...

    def eval_counts(
        self, logits: torch.Tensor, labels: torch.Tensor, num_labels: int
    ) -> torch.Tensor:
        """Additive statistics of one batch (float64, same shape for every batch)."""
        ...

    def eval_metrics(self, counts: torch.Tensor, num_labels: int) -> dict[str, float]: ...


class SequenceClassification:
    """One label per text (sentiment, topic, NLI with text pairs)."""

    name = "sequence-classification"
    primary_metric = "eval/accuracy"

    def model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def eval_counts(
        self, logits: torch.Tensor, labels: torch.Tensor, num_labels: int
    ) -> torch.Tensor:
        """Confusion matrix (true × predicted), flattened: additive across batches and ranks."""
        pred = logits.argmax(dim=-1)
        flat = labels.to(torch.int64) * num_labels + pred
        return torch.bincount(flat, minlength=num_labels * num_labels).to(torch.float64)

    def eval_metrics(self, counts: torch.Tensor, num_labels: int) -> dict[str, float]:
        return confusion_metrics(counts.reshape(num_labels, num_labels))


def confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a (true × predicted) confusion matrix."""
    confusion = confusion.to(torch.float64)
    total = confusion.sum()
    tp = confusion.diag()
    precision_denom = confusion.sum(dim=0)  # predicted as class k
    recall_denom = confusion.sum(dim=1)  # truly class k
    f1_denom = precision_denom + recall_denom
    f1 = torch.where(f1_denom > 0, 2 * tp / f1_denom.clamp(min=1), torch.zeros_like(tp))
    present = f1_denom > 0  # macro over classes that occur in labels or predictions
    return {
        "eval/accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "eval/macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "eval/num_examples": float(total),
    }


TASKS: dict[str, Task] = {"sequence-classification": SequenceClassification()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"model.task: unknown task {name!r} (known: {sorted(TASKS)})")
    return TASKS[name]
