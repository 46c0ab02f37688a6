"""The served model: where it comes from, how it loads, and who it says it is.

No Ray here: the Serve replica and offline checks call the same code.

    model_dir = resolve_model_dir(model_dir="runs/demo/model")   # or model_uri="models:/demo@champion"
    served = load_served_model(model_dir)
    served.predictor.predict(served.predictor.items(request))     # the task's own predictor

A model directory is what ``tether train`` exports: config.json, *.safetensors, tokenizer
files, job.yaml and tether.json (the model card: name, task, labels, max_length, objective,
metrics, step). The card's task picks the predictor; nothing here asks which task it is.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tether.card import MODEL_CARD_FILE, read_card
from tether.errors import ModelSourceError
from tether.tasks import TASKS, task_for_card
from tether.tasks.predict import DEFAULT_MAX_BATCH_TOKENS

__all__ = ["ModelSourceError", "ServedModel", "load_served_model", "resolve_model_dir"]

REGISTRY_MISSING = "MLflow registry support not installed yet; use --model-dir"
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?$")


# --------------------------------------------------------------------------- resolution


def resolve_model_dir(
    model_dir: str | Path | None = None,
    model_uri: str | None = None,
    tracking_uri: str | None = None,
    need_card: bool = True,
) -> Path:
    """The local directory to load: ``model_dir`` if it exists here, else fetched by ``model_uri``.

    The one place a model source becomes a directory. The CLI resolves a URI (to fail before
    deploying, and again on --reload); a replica on a node without the CLI's directory
    fetches by URI itself. ``need_card=False``: a pretrained base folder (no tether.json) is
    enough, for a base that serves LoRA adapters.
    """
    if model_dir is not None and Path(model_dir).is_dir():
        path = Path(model_dir)
    elif model_uri:
        path = fetch_registered_model(model_uri, tracking_uri)
    elif model_dir is not None:
        raise ModelSourceError(f"model_dir: {model_dir} is not a directory")
    else:
        raise ModelSourceError("no model: give --model-dir PATH or --model-uri models:/NAME@ALIAS")
    check_model_dir(path, need_card)
    return path.resolve()


def fetch_registered_model(model_uri: str, tracking_uri: str | None = None) -> Path:
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
    return Path(fetch_model_dir(model_uri, tracking_uri))


def check_model_dir(path: Path, need_card: bool = True) -> None:
    """Raise naming every missing file, so a half-copied directory fails before loading."""
    needed = ("config.json", MODEL_CARD_FILE) if need_card else ("config.json",)
    missing = [name for name in needed if not (path / name).is_file()]
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


def base_card(model_dir: Path, task: str = "causal-lm") -> dict[str, Any]:
    """The card of a model folder; for a pretrained base without one (a base serving LoRA
    adapters), its name and task only."""
    if (Path(model_dir) / MODEL_CARD_FILE).is_file():
        return read_card(model_dir)
    return {"name": Path(model_dir).name, "task": task}


def card_task(model_dir: Path, card: dict[str, Any] | None = None) -> str:
    """The task a model directory was trained for (what the serving app is built for)."""
    card = card if card is not None else read_card(model_dir)
    task = card.get("task", "sequence-classification")
    if task not in TASKS:
        raise ModelSourceError(
            f"{model_dir}: task {task!r} cannot be served (known: {sorted(TASKS)})"
        )
    return task


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

    def names(self) -> set[str]:
        """Every id a client may use for this model: its name, URI, NAME/VERSION, NAME@ALIAS
        (with or without models:/)."""
        names = {self.name, self.model_uri}
        if self.version:
            names |= {f"{self.name}/{self.version}", f"models:/{self.name}/{self.version}"}
        if self.alias:
            names |= {f"{self.name}@{self.alias}", f"models:/{self.name}@{self.alias}"}
        return names - {None}

    def public(self) -> dict[str, Any]:
        """What any caller may see: no server paths (the model folder, a local base model)."""
        out = self.to_dict()
        out.pop("model_dir")
        objective = dict(out["objective"])
        base = str(objective.get("base_model") or "")
        if base.startswith(("/", "./", "../", "~")):
            objective["base_model"] = Path(base).name  # a folder on the training machine
        out["objective"] = objective
        return out


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


# --------------------------------------------------------------------------- loading


class ServedModel:
    """A loaded model: the task's predictor and the card's identity, swapped as one object."""

    def __init__(self, predictor, info: ModelInfo):
        self.predictor = predictor
        self.info = info

    def classify(self, texts: list[str]):
        """Predictions for a list of texts (every text task takes them as items)."""
        return self.predictor.predict(self.predictor.frame_items(texts))


def load_served_model(
    model_dir: Path,
    model_uri: str | None = None,
    *,
    quantize: bool = False,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    alias: str | None = None,
    card: dict[str, Any] | None = None,
) -> ServedModel:
    """Load weights (safetensors only, never remote code), tokenizer and card from a directory.

    ``alias``: the alias a pinned ``models:/NAME/VERSION`` was resolved from (for display).
    ``card``: instead of the folder's tether.json (a pretrained base has none)."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir, need_card=card is None)
    card = card if card is not None else read_card(model_dir)
    card_task(model_dir, card)
    predictor = task_for_card(card).predictor(model_dir, card, max_batch_tokens, quantize)
    return describe_served(predictor, model_dir, card, model_uri, alias)


def describe_served(
    predictor,
    model_dir: Path,
    card: dict[str, Any],
    model_uri: str | None = None,
    alias: str | None = None,
    name: str | None = None,
) -> ServedModel:
    """A loaded predictor with the identity its folder, card and URI give it (``name``: what
    the client asked for, e.g. an adapter's id)."""
    identity = registry_identity(model_uri, card, default_name=Path(model_dir).name)
    if alias:
        identity["alias"] = alias
    if name:
        identity["name"] = name
    info = ModelInfo(
        **identity,
        model_dir=str(model_dir),
        model_uri=model_uri,
        task=card.get("task", "sequence-classification"),
        label_names=list(getattr(predictor, "labels", []) or []),
        max_length=predictor.max_length,
        objective=card.get("objective") or {},
        metrics={k: v for k, v in (card.get("metrics") or {}).items() if k.startswith("eval/")},
        step=card.get("step"),
        weights_sha256=weights_sha256(Path(model_dir)),
    )
    return ServedModel(predictor, info)
