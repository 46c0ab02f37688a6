"""What a task's predictor looks like to the serving core and to the MLflow pyfunc.

A predictor turns a validated request body into *items* (one text, one sentence, one question
with its context), and a list of items into predictions with one batched forward pass per
chunk. The serving core owns the HTTP contract (limits, errors, batching across requests);
the predictor owns everything task-shaped: the request and prediction schemas (so
``/openapi.json`` tells the truth for the served model), pre- and post-processing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import BaseModel

DEFAULT_MAX_BATCH_TOKENS = 16384  # padded tokens per forward pass (32 texts × 512)


class Predictor(Protocol):
    Request: type[BaseModel]  # the POST /v1/predict body
    Prediction: type[BaseModel]  # one result per item
    max_length: int
    labels: list[str]

    def items(self, request: BaseModel) -> list[Any]:
        """The independent units of a request (each may share a batch with other requests)."""
        ...

    def item_length(self, item: Any) -> int:
        """Characters in an item, checked against the server's per-item limit."""
        ...

    def predict(self, items: list[Any]) -> list[BaseModel]: ...

    def frame_items(self, column: list[Any]) -> list[Any]:
        """Items from the first column of a pyfunc DataFrame (MLflow's predict)."""
        ...

    def example(self) -> dict[str, Any]:
        """A request body for the docs and the pyfunc input example."""
        ...


def length_sorted_chunks(input_ids: list[list[int]], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into forward passes of at most ``max_batch_tokens`` padded tokens.

    Sorted by length first, so one long text pads only the chunk of long texts, not every
    short text of the batch.
    """
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    chunks: list[list[int]] = []
    for i in order:
        # sorted ascending: the text being added is the longest of its chunk
        if chunks and (len(chunks[-1]) + 1) * len(input_ids[i]) <= max_batch_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def forward_chunks(model, tokenizer, features, max_batch_tokens: int):
    """(row indices, model outputs) per forward pass over ``features`` (token-id lists per
    row, e.g. input_ids and token_type_ids): rows grouped by ``length_sorted_chunks`` and
    padded right, so row ``i``'s outputs sit at positions ``0..len(i)-1``."""
    for chunk in length_sorted_chunks(features["input_ids"], max_batch_tokens):
        padded = pad_right(tokenizer, {k: [features[k][i] for i in chunk] for k in features})
        with torch.inference_mode():
            outputs = model(**padded)
        yield chunk, outputs


def pad_right(tokenizer, features: dict[str, list]) -> dict[str, torch.Tensor]:
    """A chunk padded on the right whatever the tokenizer's own side (Llama-family tokenizers
    pad left): predictors read row ``i``'s outputs at positions ``0..len(i)-1``."""
    return tokenizer.pad(features, padding_side="right", return_tensors="pt")


class ItemsRefused(ValueError):
    """Items the loaded model will not take, though they fit the app's schema (a 422 naming
    ``param``): too much compute for one request, or a form this model does not read."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class RequestTooLarge(ItemsRefused):
    """A request whose items need more compute than one request may ask for."""


def one_or_many(item: type[BaseModel], many_title: str, max_items: int) -> type[BaseModel]:
    """A /v1/predict body that is one ``item`` or ``{"items": [item, ...]}``: exactly one."""
    from pydantic import ConfigDict, Field, RootModel, create_model

    many = create_model(
        many_title,
        __config__=ConfigDict(extra="forbid", strict=True, title=many_title),
        items=(list[item], Field(min_length=1, max_length=max_items)),
    )

    class Request(RootModel[item | many]):  # type: ignore[valid-type]
        model_config = ConfigDict(title="PredictRequest")

    return Request


def quantize_linear_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear (CPU inference; weights int8, activations fp32)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao but still works in 2.13
        warnings.simplefilter("ignore", DeprecationWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def served_max_length(card: dict[str, Any], tokenizer, config) -> int:
    """The card's max_length (what the model was trained on), else what the model can take."""
    if card.get("max_length"):
        return int(card["max_length"])
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512), 512]
    return int(min(limits))


@dataclass(frozen=True)
class Preloaded:
    """A tokenizer and a model already in memory, handed to a predictor instead of a folder
    (a LoRA adapter on a shared base: its model is a view that activates the adapter)."""

    tokenizer: Any
    model: Any


def load_for_inference(task, model_dir, quantize: bool):
    """Tokenizer and eval-mode model of an exported folder (safetensors, no remote code), or
    the pair a ``Preloaded`` holds."""
    if isinstance(model_dir, Preloaded):
        return model_dir.tokenizer, model_dir.model
    tokenizer = task.load_tokenizer(str(model_dir), None, False)
    model = task.load_model(str(model_dir), None, False).model.eval()
    return tokenizer, (quantize_linear_int8(model) if quantize else model)
