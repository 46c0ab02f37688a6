"""The model card, ``tether.json``: what an exported model is, for serving and the registry.

    {"name": job name, "task": ..., "label_names": [...], "max_length": ...,   # the task block
     "objective": {"base_model", "theta_star_sha256", "lambda", "mode", ...},
     "metrics": {"eval/...": ...}, "step": ..., "primary_metric": ..., "mode": "max"|"min",
     "registry": {"name", "version", "alias", "run_id"}}      # only on a registry download

Written once, by the final checkpoint's export; read by serving, the registry and tracking.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tether.errors import ModelSourceError

MODEL_CARD_FILE = "tether.json"


def read_card(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_CARD_FILE
    if not path.is_file():
        raise ModelSourceError(f"{model_dir} has no {MODEL_CARD_FILE}: not a tether model")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(card, dict):
        raise ModelSourceError(f"{path} must hold a JSON object")
    return card


def write_card(model_dir: str | Path, card: dict[str, Any]) -> None:
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    (Path(model_dir) / MODEL_CARD_FILE).write_text(json.dumps(card, indent=2, default=str))


def card_or_empty(model_dir: str | Path | None) -> dict[str, Any]:
    """The card, or {} when there is no model folder (a run that exported nothing)."""
    if not model_dir or not (Path(model_dir) / MODEL_CARD_FILE).is_file():
        return {}
    return read_card(model_dir)
