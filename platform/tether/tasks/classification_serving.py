"""Serving a sequence classifier: {"text"} or {"texts"} in, a label and probabilities per text out."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints

from tether.tasks.predict import (
    DEFAULT_MAX_BATCH_TOKENS,
    forward_chunks,
    load_for_inference,
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
    truncated: bool = Field(description="the text was longer than max_length tokens and was cut")


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


def text_items(request: BaseModel) -> list[str]:
    body = request.root
    return [body.text] if hasattr(body, "text") else list(body.texts)


class ClassificationPredictor:
    """A loaded classifier: tokenizer, weights and card, used together."""

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

    items = staticmethod(text_items)

    def item_length(self, item: str) -> int:
        return len(item)

    def frame_items(self, column: list[Any]) -> list[str]:
        return [str(t) for t in column]

    def example(self) -> dict[str, Any]:
        return {"texts": ["a wonderful, moving film", "dull and far too long"]}

    def predict(self, texts: list[str]) -> list[Prediction]:
        """Tokenize (truncating to max_length), run the forward pass(es), softmax per text."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        truncated = truncation_flags(self.tokenizer, encoded, texts, self.max_length)
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


def truncation_flags(tokenizer, encoded, texts: list[str], max_length: int) -> list[bool]:
    """Which texts lost tokens to truncation."""
    if encoded.encodings is not None:  # fast tokenizer: truncation keeps the overflow
        return [bool(e.overflowing) for e in encoded.encodings]
    full = tokenizer(texts, truncation=False)["input_ids"]
    return [len(ids) > max_length for ids in full]
