"""Sequence classification: one label per text (sentiment, topic, NLI with text pairs).

Loss unit: the example. Evaluation counts: the K×K confusion matrix (true × predicted) plus
the summed loss, so accuracy and macro-F1 are exact when summed across workers.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tether.data import DataError, Encoded, Ragged, where
from tether.tasks import ValidationOnly, model_inputs

_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class SequenceClassification(ValidationOnly):
    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 128
    labels: tuple[str, ...] = ()

    name = "sequence-classification"
    primary_metric = "eval/accuracy"
    example_labels = ("negative", "positive")  # what a spec check may assume before the data
    mode = "max"

    @classmethod
    def from_spec(cls, spec) -> SequenceClassification:
        d = spec.data
        return cls(d.text_column, d.text_pair_column, d.label_column, d.max_length)

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> SequenceClassification:
        """The served task: a pair model reads rows {"text", "text_pair"}, the request's names."""
        return cls(
            pair_column="text_pair" if card.get("text_pair") else None,
            max_length=int(card.get("max_length") or 512),
            labels=tuple(card["label_names"]),
        )

    def with_labels(self, labels) -> SequenceClassification:
        return dataclasses.replace(self, labels=tuple(labels))

    def cache_key(self) -> dict[str, Any]:
        return {"name": self.name} | dataclasses.asdict(self)

    def num_counts(self) -> int:
        return len(self.labels) ** 2 + 2

    # ------------------------------------------------------------------- data

    def label_names(self, rows, declared, hub_names) -> list[str]:
        """Declared names, else the hub's ClassLabel names, else the distinct values in
        train: strings sorted, integers in numeric order (labels 1..K make K classes)."""
        if declared:
            return list(declared)
        if hub_names:
            return list(hub_names)
        values = [self._raw_label(r) for r in rows]
        if all(isinstance(v, int) for v in values):
            return [str(v) for v in sorted(set(values))]
        if all(isinstance(v, str) for v in values):
            return sorted(set(values))
        bad = next(r for r, v in zip(rows, values, strict=True) if not isinstance(v, str))
        raise DataError(
            f"data.label_column: labels mix names and integers ({where(bad)} has "
            f"{bad.get(self.label_column)!r}); set model.label_names"
        )

    def _raw_label(self, row: dict) -> int | str:
        value = row.get(self.label_column)
        if isinstance(value, bool) or value is None or value == "":
            raise DataError(
                f"data.label_column: {where(row)} has no label in column "
                f"{self.label_column!r} (got {value!r})"
            )
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        value = str(value).strip()
        return int(value) if _INT.match(value) else value

    def label_id(self, row: dict) -> int:
        """A label's id: by name, or as an id when the names are not themselves integers."""
        value = self._raw_label(row)
        index = {n: i for i, n in enumerate(self.labels)}
        names_are_ints = all(_INT.match(n) for n in self.labels)
        if str(value) in index and (isinstance(value, str) or names_are_ints):
            return index[str(value)]
        if isinstance(value, int) and not names_are_ints and 0 <= value < len(self.labels):
            return value
        raise DataError(
            f"data.label_column: {where(row)} has label {value!r}, expected one of "
            f"{list(self.labels)}"
            + ("" if names_are_ints else f" or an id in [0, {len(self.labels)})")
            + "; set model.label_names"
        )

    def text(self, row: dict, column: str) -> str:
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"data: {where(row)} column {column!r} is empty or not text (got {value!r})"
            )
        return value

    def encode(self, rows, tokenizer, split):
        texts = [self.text(r, self.text_column) for r in rows]
        pairs = [self.text(r, self.pair_column) for r in rows] if self.pair_column else None
        labels = np.array([self.label_id(r) for r in rows], dtype=np.int64)
        enc = tokenize(tokenizer, texts, pairs, self.max_length)
        fields: dict[str, Any] = {"labels": labels}
        if pairs is not None:
            fields["token_type_ids"] = Ragged.from_rows(enc["token_type_ids"], np.int8)
        encoded = Encoded(Ragged.from_rows(enc["input_ids"], np.int32), fields, ("token_type_ids",))
        return encoded, {"examples": len(rows), "truncated": count_truncated(enc)}

    # ------------------------------------------------------------------- model

    def load_tokenizer(self, source, revision, trust_remote_code):
        from tether.models import load_tokenizer

        return load_tokenizer(source, revision, trust_remote_code)

    def load_model(self, source, revision, trust_remote_code):
        from transformers import AutoModelForSequenceClassification

        from tether.models import label_kwargs, load_pretrained

        return load_pretrained(
            source,
            AutoModelForSequenceClassification,
            revision,
            trust_remote_code,
            **label_kwargs(self.labels),
        )

    def loss(self, model, batch):
        logits = model(**model_inputs(batch)).logits
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        return loss_sum, torch.tensor(len(labels), dtype=torch.float64)

    # ------------------------------------------------------------------- evaluation

    def eval_counts(self, model, batch) -> torch.Tensor:
        """Flattened confusion matrix, then [summed loss, examples]."""
        logits = model(**model_inputs(batch)).logits.float()
        labels = batch["labels"]
        k = len(self.labels)
        pred = logits.argmax(dim=-1)
        confusion = torch.bincount(labels * k + pred, minlength=k * k).to(torch.float64).cpu()
        loss_sum = F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        return torch.cat([confusion, loss_sum.reshape(1), torch.tensor([float(len(labels))])])

    def eval_metrics(self, counts: torch.Tensor) -> dict[str, float]:
        k = len(self.labels)
        metrics = confusion_metrics(counts[: k * k].reshape(k, k))
        metrics["eval/loss"] = float(counts[-2] / counts[-1]) if counts[-1] > 0 else 0.0
        return metrics

    # ------------------------------------------------------------------- export

    def card(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "label_names": list(self.labels),
            "max_length": self.max_length,
            "text_pair": self.pair_column is not None,  # served as {"text", "text_pair"}
        }

    def request_model(self, max_items: int, max_chars: int):
        from tether.tasks.classification_serving import pair_request_model, text_request_model

        if self.pair_column is not None:
            return pair_request_model(max_items, max_chars)
        return text_request_model(max_items, max_chars)

    def request_example(self) -> dict[str, Any]:
        if self.pair_column is not None:
            from tether.tasks.classification_serving import PAIR_EXAMPLE

            return {"items": [PAIR_EXAMPLE]}
        return {"texts": ["a gripping, beautifully acted film", "dull"]}

    def prediction_model(self):
        from tether.tasks.classification_serving import Prediction

        return Prediction

    def predictor(self, model_dir, card, max_batch_tokens: int, quantize: bool = False):
        from tether.tasks.classification_serving import ClassificationPredictor

        return ClassificationPredictor(self, model_dir, card, max_batch_tokens, quantize)


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


def tokenize(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int):
    """Token ids of each text, or of each (text, pair) as ``[CLS] text [SEP] pair [SEP]`` with
    segment ids, cut to ``max_length`` tokens longest-first: training and serving read a row
    the same way."""
    return tokenizer(
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        return_token_type_ids=pairs is not None,
        return_attention_mask=False,
    )


def count_truncated(enc) -> int:
    """Rows that lost tokens to truncation (fast tokenizers keep the overflow)."""
    encodings = getattr(enc, "encodings", None)
    if not encodings:
        return 0
    return sum(bool(e.overflowing) for e in encodings)
