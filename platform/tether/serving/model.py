"""The served model: where it comes from, how it loads, how one batch of texts is classified.

No Ray here: the Serve replica and offline checks call the same code.

    model_dir = resolve_model_dir(model_dir="runs/demo/model")   # or model_uri="models:/demo@champion"
    served = load_served_model(model_dir)
    served.classify(["a fine film", "a dull one"])   # → [Prediction(label="positive", ...), ...]

A model directory is what ``tether train`` exports: config.json (id2label), *.safetensors,
tokenizer files, job.yaml and tether.json (the model card: name, task, label_names, max_length,
objective, metrics, step).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.checkpoints import MODEL_CARD_FILE

REGISTRY_MISSING = "MLflow registry support not installed yet; use --model-dir"
SERVABLE_TASKS = ("sequence-classification",)
DEFAULT_MAX_BATCH_TOKENS = 16384  # padded tokens per forward pass (32 texts × 512)
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?$")


class ModelSourceError(ValueError):
    """The model directory or URI cannot be served (missing, incomplete, unknown task)."""


# --------------------------------------------------------------------------- resolution


def resolve_model_dir(model_dir: str | Path | None = None, model_uri: str | None = None) -> Path:
    """The local directory to load: ``model_dir`` if it exists here, else fetched by ``model_uri``.

    The one place a model source becomes a directory. The CLI resolves a URI (to fail before
    deploying, and again on --reload); a replica on a node without the CLI's directory
    fetches by URI itself.
    """
    if model_dir is not None and Path(model_dir).is_dir():
        path = Path(model_dir)
    elif model_uri:
        path = fetch_registered_model(model_uri)
    elif model_dir is not None:
        raise ModelSourceError(f"model_dir: {model_dir} is not a directory")
    else:
        raise ModelSourceError("no model: give --model-dir PATH or --model-uri models:/NAME@ALIAS")
    check_model_dir(path)
    return path.resolve()


def fetch_registered_model(model_uri: str) -> Path:
    """Download a registered model (``models:/NAME@ALIAS``) through tether.registry."""
    if not _REGISTRY_URI.match(model_uri):
        raise ModelSourceError(
            f"model_uri: {model_uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    try:
        from tether.registry import fetch_model_dir
    except ModuleNotFoundError as e:
        if e.name != "tether.registry":
            raise
        raise ModelSourceError(REGISTRY_MISSING) from None
    return Path(fetch_model_dir(model_uri))


def check_model_dir(path: Path) -> None:
    """Raise naming every missing file, so a half-copied directory fails before loading."""
    missing = [name for name in ("config.json", MODEL_CARD_FILE) if not (path / name).is_file()]
    if not list(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ModelSourceError(f"{path} is not a tether model directory: missing {missing}")


def weights_sha256(path: Path) -> str:
    """Hash of the weight files' bytes: tells two exports with the same card apart."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class ModelInfo:
    """What GET /v1/model reports: identity, provenance and the card's objective and metrics."""

    name: str
    version: str | None
    alias: str | None
    run_id: str | None
    model_dir: str
    model_uri: str | None
    task: str
    label_names: list[str]
    max_length: int
    objective: dict[str, Any]
    metrics: dict[str, Any]
    step: int | None
    weights_sha256: str
    loaded_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def registry_identity(
    model_uri: str | None, card: dict[str, Any], default_name: str
) -> dict[str, str | None]:
    """Name, version, alias and run id: from the URI and the card's optional "registry" block.

    A model served from a directory has no registry identity: version, alias and run id are
    None and the name is the card's. tether.registry.fetch_model_dir adds {"registry":
    {"name", "version", "alias", "run_id"}} to the card of the copy it downloads.
    """
    registry = card.get("registry") or {}
    identity = {
        "name": card.get("name") or default_name,
        "version": None,
        "alias": None,
        "run_id": None,
    }
    match = _REGISTRY_URI.match(model_uri or "")
    if match:
        identity.update(name=match["name"], version=match["version"], alias=match["alias"])
    for key in ("name", "version", "alias", "run_id"):
        if registry.get(key) is not None:
            identity[key] = str(registry[key])
    return identity


def read_card(model_dir: Path) -> dict[str, Any]:
    card = json.loads((model_dir / MODEL_CARD_FILE).read_text())
    task = card.get("task", "sequence-classification")
    if task not in SERVABLE_TASKS:
        raise ModelSourceError(
            f"{model_dir}: task {task!r} cannot be served (known: {SERVABLE_TASKS})"
        )
    return card


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class Prediction:
    label: str
    label_id: int
    probabilities: dict[str, float]
    truncated: bool  # the text was longer than max_length tokens and was cut


class ServedModel:
    """A loaded classifier: weights, tokenizer and card swapped together as one object."""

    def __init__(self, model, tokenizer, info: ModelInfo, max_batch_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.max_batch_tokens = max_batch_tokens

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Tokenize (truncating to max_length), run the forward pass(es), softmax per text."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.info.max_length)
        truncated = truncation_flags(self.tokenizer, encoded, texts, self.info.max_length)
        probabilities: list[torch.Tensor | None] = [None] * len(texts)
        for chunk in length_sorted_chunks(encoded["input_ids"], self.max_batch_tokens):
            features = self.tokenizer.pad(
                {key: [encoded[key][i] for i in chunk] for key in encoded.keys()},
                return_tensors="pt",
            )
            with torch.inference_mode():
                logits = self.model(**features).logits
            for row, i in zip(torch.softmax(logits.float(), dim=-1), chunk, strict=True):
                probabilities[i] = row
        return [self._prediction(p, cut) for p, cut in zip(probabilities, truncated, strict=True)]

    def _prediction(self, probs: torch.Tensor, truncated: bool) -> Prediction:
        label_id = int(probs.argmax())
        names = self.info.label_names
        return Prediction(
            label=names[label_id],
            label_id=label_id,
            probabilities={name: float(p) for name, p in zip(names, probs.tolist(), strict=True)},
            truncated=truncated,
        )


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


def truncation_flags(tokenizer, encoded, texts: list[str], max_length: int) -> list[bool]:
    """Which texts lost tokens to truncation."""
    if encoded.encodings is not None:  # fast tokenizer: truncation keeps the overflow
        return [bool(e.overflowing) for e in encoded.encodings]
    full = tokenizer(texts, truncation=False)["input_ids"]
    return [len(ids) > max_length for ids in full]


# --------------------------------------------------------------------------- loading


def load_served_model(
    model_dir: Path,
    model_uri: str | None = None,
    *,
    quantize: bool = False,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> ServedModel:
    """Load weights (safetensors only, never remote code), tokenizer and card from a directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_model_dir(model_dir)
    card = read_card(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=False
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    label_names = card.get("label_names") or [
        model.config.id2label[i] for i in range(model.config.num_labels)
    ]
    if len(label_names) != model.config.num_labels:
        raise ModelSourceError(
            f"{model_dir}: tether.json has {len(label_names)} label_names but the model has "
            f"{model.config.num_labels} outputs"
        )
    if quantize:
        model = quantize_linear_int8(model)
    info = ModelInfo(
        **registry_identity(model_uri, card, default_name=model_dir.name),
        model_dir=str(model_dir),
        model_uri=model_uri,
        task=card.get("task", "sequence-classification"),
        label_names=list(label_names),
        max_length=served_max_length(card, tokenizer, model.config),
        objective=card.get("objective") or {},
        metrics={k: v for k, v in (card.get("metrics") or {}).items() if k.startswith("eval/")},
        step=card.get("step"),
        weights_sha256=weights_sha256(model_dir),
    )
    return ServedModel(model, tokenizer, info, max_batch_tokens)


def served_max_length(card: dict[str, Any], tokenizer, config) -> int:
    """The card's max_length (what the model was trained on), else what the model can take."""
    if card.get("max_length"):
        return int(card["max_length"])
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512), 512]
    return int(min(limits))


def quantize_linear_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear (CPU inference; weights int8, activations fp32)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao but still works in 2.13
        warnings.simplefilter("ignore", DeprecationWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
