"""Serving a sequence classifier: {"text"} or {"texts"} in, a label and probabilities per text out.

A model trained on text pairs (``data.text_pair_column``, e.g. NLI premise + hypothesis; its
card says ``"text_pair": true``) takes {"text", "text_pair"} or {"items": [{"text",
"text_pair"}, ...]} instead, and reads each pair as training encoded it (one sequence with
segment ids, cut longest-first to the card's max_length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints

from tether.tasks.classification import tokenize
from tether.tasks.predict import (
    DEFAULT_MAX_BATCH_TOKENS,
    ItemsRefused,
    forward_chunks,
    load_for_inference,
    one_or_many,
    served_max_length,
)

# at least one non-space character. Spelled out, not \S: JSON Schema (ECMA-262), pydantic's
# Rust regex and Python disagree on what \s is (U+0085, U+FEFF, U+001C...), and a published
# pattern must mean what the server enforces (a fuzzer found the difference)
WHITESPACE = "\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NON_BLANK = f"[^{WHITESPACE}]"


def text_type(max_chars: int):
    """A non-blank string of at most ``max_chars`` characters (in the schema, too)."""
    return Annotated[str, StringConstraints(min_length=1, max_length=max_chars, pattern=NON_BLANK)]


class Prediction(BaseModel):
    label: str
    label_id: int
    probabilities: dict[str, float]
    truncated: bool = Field(
        description="the text (with its text_pair) was longer than max_length tokens and was cut"
    )


def text_request_model(max_items: int, max_chars: int) -> type[BaseModel]:
    """{"text": "..."} or {"texts": [...]}: exactly one (each form forbids the other's key)."""

    Text = text_type(max_chars)

    class OneText(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, title="OneText")
        text: Text = Field(examples=["a fine film"])  # type: ignore[valid-type]

    class ManyTexts(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, title="ManyTexts")
        texts: list[Text] = Field(  # type: ignore[valid-type]
            min_length=1, max_length=max_items, examples=[["great", "dull"]]
        )

    class TextRequest(RootModel[OneText | ManyTexts]):
        model_config = ConfigDict(title="PredictRequest")

    return TextRequest


PAIR_EXAMPLE = {
    "text": "A man is playing a guitar on stage.",
    "text_pair": "Someone is performing music.",
}


def pair_request_model(max_items: int, max_chars: int) -> type[BaseModel]:
    """{"text", "text_pair"} or {"items": [{"text", "text_pair"}, ...]}: exactly one."""

    Text = text_type(max_chars)

    class TextPair(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, title="TextPair")
        text: Text = Field(  # type: ignore[valid-type]
            description="the first text (e.g. an NLI premise)", examples=[PAIR_EXAMPLE["text"]]
        )
        text_pair: Text = Field(  # type: ignore[valid-type]
            description="the second text (e.g. an NLI hypothesis)",
            examples=[PAIR_EXAMPLE["text_pair"]],
        )

    return one_or_many(TextPair, "ManyPairs", max_items)


@dataclass(frozen=True)
class TextPairItem:
    text: str
    text_pair: str


class WrongInputForm(ItemsRefused):
    """Texts for a pair model, or pairs for a single-text one: a body the app's schema took
    (it is built from the task before any model loads) that the loaded model cannot read."""


def text_items(request: BaseModel) -> list[str]:
    body = request.root
    return [body.text] if hasattr(body, "text") else list(body.texts)


def pair_items(request: BaseModel) -> list[TextPairItem]:
    body = request.root
    pairs = body.items if hasattr(body, "items") else [body]
    return [TextPairItem(p.text, p.text_pair) for p in pairs]


class ClassificationPredictor:
    """A loaded classifier: tokenizer, weights and card, used together. Its items are texts,
    or ``TextPairItem``s for a model trained on pairs (the task's ``pair_column``)."""

    Prediction = Prediction

    def __init__(
        self,
        task,
        model_dir,
        card: dict[str, Any],
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        quantize: bool = False,
    ):
        self.tokenizer, self.model = load_for_inference(task, model_dir, quantize)
        self.labels = list(card.get("label_names") or task.labels)
        if len(self.labels) != self.model.config.num_labels:
            from tether.errors import ModelSourceError

            raise ModelSourceError(
                f"{model_dir}: tether.json has {len(self.labels)} label_names but the model has "
                f"{self.model.config.num_labels} outputs"
            )
        self.max_length = served_max_length(card, self.tokenizer, self.model.config)
        self.max_batch_tokens = max_batch_tokens
        self.reads_pairs = task.pair_column is not None
        # what a pyfunc DataFrame must hold (None: its first column holds the texts)
        self.frame_columns = ("text", "text_pair") if self.reads_pairs else None

    def items(self, request: BaseModel) -> list[str] | list[TextPairItem]:
        body = request.root
        sent_pairs = getattr(body, "text_pair", None) is not None or hasattr(body, "items")
        if sent_pairs and not self.reads_pairs:
            raise WrongInputForm(
                'text_pair: this model classifies single texts: send {"text"} or {"texts"}',
                "text_pair",
            )
        if self.reads_pairs and not sent_pairs:
            raise WrongInputForm(
                "text_pair: this model classifies text pairs (it was trained on two texts per "
                'example): send {"text", "text_pair"} or {"items": [{"text", "text_pair"}, ...]}',
                "text_pair",
            )
        return pair_items(request) if self.reads_pairs else text_items(request)

    def item_length(self, item: str | TextPairItem) -> int:
        if isinstance(item, TextPairItem):
            return len(item.text) + len(item.text_pair)
        return len(item)

    def frame_items(self, column: list[Any]) -> list[str] | list[TextPairItem]:
        """Texts from a DataFrame's first column; for a pair model, rows of its
        ``frame_columns`` (as dicts)."""
        if self.reads_pairs:
            return [TextPairItem(str(row["text"]), str(row["text_pair"])) for row in column]
        return [str(t) for t in column]

    def example(self) -> dict[str, Any]:
        if self.reads_pairs:
            return {"items": [PAIR_EXAMPLE]}
        return {"texts": ["a wonderful, moving film", "dull and far too long"]}

    def predict(self, items: list[str] | list[TextPairItem]) -> list[Prediction]:
        """Tokenize as training did (truncating to max_length), run the forward pass(es),
        softmax per item."""
        if self.reads_pairs:
            texts = [i.text for i in items]
            pairs: list[str] | None = [i.text_pair for i in items]
        else:
            texts, pairs = list(items), None
        encoded = tokenize(self.tokenizer, texts, pairs, self.max_length)
        truncated = truncation_flags(self.tokenizer, encoded, texts, pairs, self.max_length)
        probabilities: list[torch.Tensor | None] = [None] * len(texts)
        for chunk, outputs in forward_chunks(
            self.model, self.tokenizer, encoded, self.max_batch_tokens
        ):
            probs = torch.softmax(outputs.logits.float(), dim=-1)
            for row, i in zip(probs, chunk, strict=True):
                probabilities[i] = row
        return [self._prediction(p, cut) for p, cut in zip(probabilities, truncated, strict=True)]

    def _prediction(self, probs: torch.Tensor, truncated: bool) -> Prediction:
        label_id = int(probs.argmax())
        return Prediction(
            label=self.labels[label_id],
            label_id=label_id,
            probabilities={n: float(p) for n, p in zip(self.labels, probs.tolist(), strict=True)},
            truncated=truncated,
        )


def truncation_flags(
    tokenizer, encoded, texts: list[str], pairs: list[str] | None, max_length: int
) -> list[bool]:
    """Which texts (with their pairs) lost tokens to truncation."""
    if encoded.encodings is not None:  # fast tokenizer: truncation keeps the overflow
        return [bool(e.overflowing) for e in encoded.encodings]
    full = tokenizer(texts, pairs, truncation=False)["input_ids"]
    return [len(ids) > max_length for ids in full]
