"""Checkpoint layout, written at every evaluation and read on resume.

    checkpoint_000040/
      model.safetensors    weights (rank 0)
      optimizer.pt         AdamW state (rank 0; tensors only, loaded with weights_only=True)
      trainer_state.json   step, scheduler state, anchor identity (base model + θ* hash)
      rng_rank{r}.pt       each worker's torch RNG (dropout), so a resumed run continues exactly
      weights_rank{r}.sha256  each worker's weight hash (replicas must agree)
      worker_rank{r}.json  the node, host and pid each worker ran on
      model/               only in the final checkpoint: the HF model + tokenizer + job.yaml

θ* itself is never stored: a resumed run rebuilds it from the base model and refuses to go on
if its hash differs from the one recorded here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from tether.anchor import weights_hash

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
HF_MODEL_DIR = "model"


class AnchorMismatch(RuntimeError):
    """A checkpoint was trained against a different θ* than the one rebuilt for resuming."""


def save_training_state(
    directory: Path,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    worker: dict[str, Any] | None = None,
) -> None:
    """Write this rank's share of a checkpoint (rank 0 writes the shared part).

    ``worker`` (node id, host, pid) is recorded per rank: where each replica ran.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if worker is not None:
        (directory / f"worker_rank{rank}.json").write_text(json.dumps(worker))
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    # every replica records a hash of its weights: DDP replicas must never diverge
    (directory / f"weights_rank{rank}.sha256").write_text(weights_hash(model.named_parameters()))
    if rank != 0:
        return
    save_model(model, str(directory / MODEL_FILE))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_training_state(
    directory: Path,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    theta_star_hash: str,
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; return the trainer state (step, ...)."""
    state = json.loads((directory / STATE_FILE).read_text())
    recorded = state.get("anchor", {}).get("theta_star_sha256")
    if recorded != theta_star_hash:
        raise AnchorMismatch(
            f"checkpoint {directory} was trained against θ* {recorded}, but the base model now "
            f"gives {theta_star_hash}: the base weights changed, refusing to resume"
        )
    missing, unexpected = load_model(model, str(directory / MODEL_FILE), strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"checkpoint {directory} does not fit the model: {missing} {unexpected}")
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, weights_only=True))
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming on more workers than wrote it
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


MODEL_CARD_FILE = "tether.json"


def export_hf_model(
    model, tokenizer, job: dict[str, Any], card: dict[str, Any], directory: Path
) -> None:
    """The deliverable: save_pretrained (safetensors) + tokenizer + job.yaml + tether.json.

    tether.json is the model's card for serving and the registry: label names, objective,
    final metrics, base model and θ* hash.
    """
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    (directory / MODEL_CARD_FILE).write_text(json.dumps(card, indent=2))


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
