"""Token classification (NER): one tag per word, scored on entities as conlleval scores them.

Encoding: the words of a sentence are tokenized as pre-split words; each word's *first*
sub-token carries its tag, the other sub-tokens -100 (ignored), as in the reference
transformers examples. Loss unit: the labelled (first) sub-token.

Evaluation: the tag predicted at each word's first sub-token is that word's tag; words cut by
truncation (or with no token at all) count as predicted "O", even where "O" is not a label,
so the scores are those of the whole sentence. Counts per entity type (true positives,
predicted, gold), correct and total words, the summed loss and the labelled tokens are
additive: exact under data parallelism. Metrics: entity-level micro precision/recall/F1
(exact span and type), F1 per type, word accuracy; primary ``eval/entity_f1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tether.data import IGNORE_INDEX, DataError, Encoded, Ragged, where
from tether.tasks import ValidationOnly, model_inputs
from tether.tasks.classification import count_truncated
from tether.tasks.entities import TAG, count_entities, entity_types, f1, ordered_tags


@dataclass(frozen=True)
class TokenClassification(ValidationOnly):
    tokens_column: str = "tokens"
    label_column: str = "ner_tags"
    max_length: int = 128
    labels: tuple[str, ...] = ()

    name = "token-classification"
    primary_metric = "eval/entity_f1"
    example_labels = ("O", "B-X", "I-X")  # what a spec check may assume before the data
    mode = "max"

    @classmethod
    def from_spec(cls, spec) -> TokenClassification:
        d = spec.data
        return cls(d.tokens_column, d.tags_column, d.max_length)

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> TokenClassification:
        return cls(max_length=int(card.get("max_length") or 512), labels=tuple(card["label_names"]))

    def with_labels(self, labels) -> TokenClassification:
        bad = [t for t in labels if not TAG.match(t)]
        if bad:
            raise DataError(
                f"model.label_names: {bad[:3]} are not IOB/IOBES tags (O, B-X, I-X, E-X, S-X)"
            )
        return dataclasses.replace(self, labels=tuple(labels))

    def cache_key(self) -> dict[str, Any]:
        return {"name": self.name} | dataclasses.asdict(self)

    @property
    def types(self) -> list[str]:
        return entity_types(self.labels)

    def num_counts(self) -> int:
        return 3 * len(self.types) + 5

    # ------------------------------------------------------------------- data

    def label_names(self, rows, declared, hub_names) -> list[str]:
        """Declared names, else the hub's, else the tags found in train in a stable order
        (O first, then by type, B before I)."""
        if declared:
            return list(declared)
        if hub_names:
            return list(hub_names)
        found = set()
        for row in rows:
            for tag in self._raw_tags(row):
                if not isinstance(tag, str):
                    raise DataError(
                        f"data.tags_column: {where(row)} has integer tags but no names for "
                        "them; set model.label_names (in id order)"
                    )
                if not TAG.match(tag):
                    raise DataError(
                        f"data.tags_column: {where(row)} has tag {tag!r}: not an IOB/IOBES tag "
                        "(O, B-X, I-X, E-X, S-X)"
                    )
                found.add(tag)
        return ordered_tags(found)

    def _raw_tags(self, row: dict) -> list:
        tags = cell_list(row.get(self.label_column))
        if not isinstance(tags, list):
            raise DataError(
                f"data.tags_column: {where(row)} column {self.label_column!r} is not a list of "
                f"tags (got {type(tags).__name__})"
            )
        return tags

    def words(self, row: dict) -> list[str]:
        words = cell_list(row.get(self.tokens_column))
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise DataError(
                f"data.tokens_column: {where(row)} column {self.tokens_column!r} must be a "
                f"non-empty list of words (got {words!r:.80})"
            )
        return words

    def tag_ids(self, row: dict, n_words: int) -> list[int]:
        tags = self._raw_tags(row)
        if len(tags) != n_words:
            raise DataError(
                f"data.tags_column: {where(row)} has {n_words} words but {len(tags)} tags"
            )
        index = {t: i for i, t in enumerate(self.labels)}
        out = []
        for tag in tags:
            if isinstance(tag, str) and tag in index:
                out.append(index[tag])
            elif isinstance(tag, (int, np.integer)) and 0 <= tag < len(self.labels):
                out.append(int(tag))
            else:
                raise DataError(
                    f"data.tags_column: {where(row)} has tag {tag!r}, not one of "
                    f"{list(self.labels)}"
                )
        return out

    def encode(self, rows, tokenizer, split):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("token-classification needs a fast tokenizer (for word alignment)")
        words = [self.words(r) for r in rows]
        tags = [self.tag_ids(r, len(w)) for r, w in zip(rows, words, strict=True)]
        enc = tokenizer(
            words,
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
        )
        labels, starts = [], []
        for i, sentence_tags in enumerate(tags):
            token_labels, word_starts = align_first_subtokens(enc.word_ids(i), len(sentence_tags))
            labels.append([sentence_tags[w] if w >= 0 else IGNORE_INDEX for w in token_labels])
            starts.append(word_starts)
        fields = {
            "labels": Ragged.from_rows(labels, np.int32),
            "word_starts": Ragged.from_rows(starts, np.int32),
            "word_tags": Ragged.from_rows(tags, np.int32),
        }
        encoded = Encoded(
            Ragged.from_rows(enc["input_ids"], np.int32),
            fields,
            ("labels",),
            # padded positions are no word: the loss, the metrics and serving skip them
            pad_values={"labels": IGNORE_INDEX, "word_tags": IGNORE_INDEX, "word_starts": -1},
        )
        # words with no token (cut by truncation, or one the tokenizer drops, e.g. a lone
        # zero-width space) are scored as "O" predictions: say how many there are
        tokenless = sum(int((np.asarray(s) < 0).sum()) for s in starts)
        stats = {"examples": len(rows), "truncated": count_truncated(enc)}
        return encoded, stats | {"words_without_a_token": tokenless}

    # ------------------------------------------------------------------- model

    def load_tokenizer(self, source, revision, trust_remote_code):
        from tether.models import load_tokenizer

        return load_tokenizer(source, revision, trust_remote_code)

    def load_model(self, source, revision, trust_remote_code):
        from transformers import AutoModelForTokenClassification

        from tether.models import label_kwargs, load_pretrained

        return load_pretrained(
            source,
            AutoModelForTokenClassification,
            revision,
            trust_remote_code,
            **label_kwargs(self.labels),
        )

    def loss(self, model, batch):
        logits = model(**model_inputs(batch)).logits.float()
        labels = batch["labels"]
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, (labels != IGNORE_INDEX).sum().double()

    # ------------------------------------------------------------------- evaluation

    def eval_counts(self, model, batch) -> torch.Tensor:
        """[tp, predicted, gold] per type, correct words, words, sentences, loss, tokens."""
        logits = model(**model_inputs(batch)).logits.float()
        labels = batch["labels"]
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        predicted = logits.argmax(dim=-1).cpu().numpy()
        starts = batch["word_starts"].cpu().numpy()
        gold = batch["word_tags"].cpu().numpy()
        types = self.types
        counts = np.zeros(3 * len(types) + 2)
        # A word with no token (cut, or dropped by the tokenizer) is predicted "O", seqeval's
        # outside tag: it ends any open chunk and starts none. Without an "O" label it gets
        # -1, which still reads as "O" for the entity counts (never label 0, which may be a
        # B- tag and would invent an entity) and matches no gold id for word accuracy.
        outside = self.labels.index("O") if "O" in self.labels else -1
        names = [*self.labels, "O"]  # names[-1] == "O": the tag of the -1 above
        for row in range(len(predicted)):
            n = int((gold[row] != IGNORE_INDEX).sum())  # this sentence's words
            ws = starts[row][:n]
            pred_ids = np.where(ws >= 0, predicted[row][np.maximum(ws, 0)], outside)
            gold_ids = gold[row][:n]
            counts[:-2] += count_entities(
                [names[g] for g in gold_ids], [names[p] for p in pred_ids], types
            )
            counts[-2] += float((pred_ids == gold_ids).sum())
            counts[-1] += float(n)
        tail = [len(predicted), float(loss_sum), float((labels != IGNORE_INDEX).sum())]
        return torch.tensor([*counts, *tail], dtype=torch.float64)

    def eval_metrics(self, counts: torch.Tensor) -> dict[str, float]:
        types = self.types
        c = counts.tolist()
        per_type = [c[3 * i : 3 * i + 3] for i in range(len(types))]
        tp, predicted, gold = (sum(x[j] for x in per_type) for j in range(3))
        precision, recall, score = f1(tp, predicted, gold)
        correct, words, sentences, loss_sum, tokens = c[3 * len(types) :]
        metrics = {
            "eval/entity_f1": score,
            "eval/entity_precision": precision,
            "eval/entity_recall": recall,
            "eval/token_accuracy": correct / words if words else 0.0,
            "eval/loss": loss_sum / tokens if tokens else 0.0,
            "eval/num_examples": sentences,
        }
        for t, (t_tp, t_pred, t_gold) in zip(types, per_type, strict=True):
            metrics[f"eval/f1/{t}"] = f1(t_tp, t_pred, t_gold)[2]
        return metrics

    # ------------------------------------------------------------------- export

    def card(self) -> dict[str, Any]:
        return {"task": self.name, "label_names": list(self.labels), "max_length": self.max_length}

    def request_model(self, max_items: int, max_chars: int):
        from tether.tasks.token_serving import entity_request_model

        return entity_request_model(max_items, max_chars)

    def request_example(self) -> dict[str, Any]:
        return {"texts": ["Anna Miller visited Paris on Monday."]}

    def prediction_model(self):
        from tether.tasks.token_serving import EntityPrediction

        return EntityPrediction

    def predictor(self, model_dir, card, max_batch_tokens: int, quantize: bool = False):
        from tether.tasks.token_serving import EntityPredictor

        return EntityPredictor(self, model_dir, card, max_batch_tokens, quantize)


def align_first_subtokens(word_ids: list[int | None], n_words: int) -> tuple[list[int], list[int]]:
    """Per token: the word it labels (its first sub-token) or -1; per word: that token or -1.

    A word may have no token at all (cut by truncation, or one the tokenizer drops): its
    start is -1 and evaluation predicts "O" for it.
    """
    token_words, starts = [], [-1] * n_words
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous and starts[word] < 0:
            token_words.append(word)
            starts[word] = position
        else:
            token_words.append(-1)
        previous = word
    return token_words, starts


def cell_list(cell: Any) -> Any:
    """A tokens or tags cell as a list. Parquet and JSON hold lists already; a CSV/TSV cell is
    text: a JSON list (``["EU", "rejects"]``), a Python-style one (``['EU', 'rejects']``, as
    pandas writes lists) or words separated by spaces. Anything else is returned unchanged
    for the caller to name."""
    import ast
    import json

    if isinstance(cell, np.ndarray):
        return cell.tolist()
    if not isinstance(cell, str):
        return cell
    text = cell.strip()
    if text.startswith("[") and text.endswith("]"):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(text)
            except (ValueError, SyntaxError):
                continue
            return value if isinstance(value, list) else cell
        return cell
    return text.split()
