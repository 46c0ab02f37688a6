"""Checkpoint layout, written at every evaluation and read on resume.

    checkpoint_000040/
      model.safetensors    weights (rank 0)
      optimizer.pt         AdamW state (rank 0; tensors only, loaded with weights_only=True)
      sharded/             FSDP instead of the two above: weights and AdamW state written by
                           every rank with torch.distributed.checkpoint (its .metadata from
                           rank 0, one __{rank}_0.distcp per rank); it loads on any number of
                           workers (DCP reshards)
      trainer_state.json   step, scheduler state, metrics, anchor identity (base + θ* hash),
                           and that every DDP replica held the same weights when it was written
                           (FSDP ranks hold different shards: no weights hash)
      rng_rank{r}.pt       each worker's torch RNG (dropout), so a resumed run continues exactly
      loop_rank{r}.pt      the rest of the loop's state on each worker: the decoupled pull's
                           rounding carry (this rank's shards under FSDP) and the fp16 loss
                           scale
      worker_rank{r}.json  the node, host and pid each worker ran on
      model/               only in the final checkpoint: the HF model + tokenizer + job.yaml +
                           tether.json (the model card); a LoRA run's model is merged
                           (W₀ + s·B·A) and model/adapter/ holds the adapter itself
A LoRA run's model.safetensors holds the trained parameters only (factors and head).

θ* itself is never stored: a resumed run rebuilds it from the base model and refuses to go on
if its hash differs from the one recorded here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model

from tether.adapters import (
    ADAPTER_DIR,
    is_adapted,
    merged_for_export,
    save_adapter,
    trainable_state,
)
from tether.card import write_card
from tether.errors import AnchorMismatch

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
HF_MODEL_DIR = "model"
SHARDED_DIR = "sharded"
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{int(step):06d}"


def save_training_state(
    directory: Path,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    worker: dict[str, Any] | None = None,
    sharded: bool = False,
    loop_state: dict[str, Any] | None = None,
) -> None:
    """Write this rank's share of a checkpoint (rank 0 writes the shared part). ``sharded``
    (FSDP): every rank must call it; each writes its own shards of weights and AdamW state.
    ``loop_state``: tensors and numbers the loop needs back on resume (``load_loop_state``)."""
    directory.mkdir(parents=True, exist_ok=True)
    if worker is not None:
        (directory / f"worker_rank{rank}.json").write_text(json.dumps(worker))
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if loop_state is not None:
        torch.save(loop_state, directory / _loop_file(rank))
    if sharded:
        _save_sharded(directory / SHARDED_DIR, model, optimizer)
    if rank != 0:
        return
    if not sharded:
        _save_whole(directory, model, optimizer)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def _save_whole(directory: Path, model, optimizer) -> None:
    if is_adapted(model):  # the adapter and head only: the frozen base is θ*, rebuilt on resume
        save_file(trainable_state(model), str(directory / MODEL_FILE))
    else:
        save_model(model, str(directory / MODEL_FILE))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)


def load_training_state(
    directory: Path,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    theta_star_hash: str,
    device: torch.device,
    sharded: bool = False,
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; return the trainer state (step, ...).

    Tensors load straight onto this worker's device: without ``map_location`` every rank of a
    multi-GPU node would first materialise rank 0's Adam state on GPU 0. ``sharded`` (FSDP):
    every rank reads the shards it now owns, whatever the world size that wrote them.
    """
    state = read_state(directory)
    recorded = state.get("anchor", {}).get("theta_star_sha256")
    if recorded != theta_star_hash:
        raise AnchorMismatch(
            f"checkpoint {directory} was trained against θ* {recorded}, but the base model now "
            f"gives {theta_star_hash}: the base weights changed, refusing to resume"
        )
    if sharded:
        _load_sharded(directory, model, optimizer)
    else:
        _load_whole(directory, model, optimizer, device)
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming on more workers than wrote it
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def load_loop_state(
    directory: Path, rank: int, device: torch.device, sharded: bool = False
) -> dict[str, Any] | None:
    """This rank's ``loop_state``. DDP replicas hold the same state, so a rank that did not
    exist when it was written (more workers now) takes rank 0's; FSDP shards do not travel."""
    path = directory / _loop_file(rank)
    if not path.is_file() and not sharded:
        path = directory / _loop_file(0)
    if not path.is_file():  # a checkpoint written before the file existed, or new shards
        return None
    return torch.load(path, weights_only=True, map_location=device)


def _loop_file(rank: int) -> str:
    return f"loop_rank{rank}.pt"


def _load_whole(directory: Path, model, optimizer, device: torch.device) -> None:
    missing, unexpected = load_model(
        model, str(directory / MODEL_FILE), strict=False, device=str(device)
    )
    if is_adapted(model):  # only the trained parameters are stored
        missing = [k for k in missing if k in trainable_state(model)]
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"checkpoint {directory} does not fit the model: {missing} {unexpected}")
    optimizer.load_state_dict(
        torch.load(directory / OPTIMIZER_FILE, weights_only=True, map_location=device)
    )


def load_trained_weights(model: torch.nn.Module, checkpoint: Path) -> list[str]:
    """A checkpoint's weights into a whole (unsharded) model in this process, whichever
    strategy wrote them (an FSDP checkpoint's shards are read without a process group);
    returns the names the checkpoint did not hold."""
    if (checkpoint / SHARDED_DIR / ".metadata").is_file():
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR), no_dist=True)
        model.load_state_dict(state["model"])
        return []
    missing, unexpected = load_model(model, str(checkpoint / MODEL_FILE), strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} does not fit the model: {unexpected[:3]}")
    return missing


def _save_sharded(directory: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))


def _load_sharded(directory: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (directory / SHARDED_DIR / ".metadata").is_file():
        raise RuntimeError(
            f"checkpoint {directory} holds no sharded state: it was written by a run without "
            "scaling.strategy: fsdp"
        )
    model_state, optim_state = get_state_dict(model, optimizer)  # the shards this rank owns
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(directory / SHARDED_DIR))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def export_hf_model(
    model, tokenizer, job: dict[str, Any], card: dict[str, Any], directory: Path
) -> None:
    """The deliverable: save_pretrained (safetensors) + tokenizer + job.yaml + tether.json.

    A LoRA model is saved as its adapter, then merged in place: the caller is done with it.
    """
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    if is_adapted(model):
        # the adapter for a base that serves many, and the merged model every loader reads
        save_adapter(model, directory / ADAPTER_DIR, card)
        model = merged_for_export(model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    write_card(directory, card)


def model_card(
    job_name: str, task_block: dict[str, Any], task, anchor: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    """tether.json for an export: the task block, the objective and the eval metrics."""
    return task_block | {
        "name": job_name,
        "objective": anchor,
        "metrics": {k: v for k, v in metrics.items() if k.startswith("eval/")},
        "step": metrics.get("step"),
        "primary_metric": task.primary_metric,
        "mode": task.mode,
    }


# --------------------------------------------------------------------------- a run's folders


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest first."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def best_checkpoint(run_dir: Path, metric: str, mode: str) -> tuple[Path, dict] | None:
    """The checkpoint whose recorded ``metric`` is best (ties: the later one), with metrics."""
    best = None
    sign = 1.0 if mode == "max" else -1.0
    for path in checkpoints(run_dir):
        metrics = read_state(path).get("metrics", {})
        value = metrics.get(metric)
        if isinstance(value, (int, float)) and (best is None or sign * value >= sign * best[2]):
            best = (path, metrics, value)
    return (best[0], best[1]) if best else None


def prune_checkpoints(run_dir: Path, keep: int, metric: str, mode: str) -> None:
    """Keep the best ``keep`` checkpoints by ``metric`` plus the latest (local mode; Ray
    Train does this itself for runs on workers)."""
    found = checkpoints(run_dir)
    if len(found) <= keep + 1:
        return
    sign = 1.0 if mode == "max" else -1.0

    def score(path: Path) -> float:
        value = read_state(path).get("metrics", {}).get(metric)
        return sign * value if isinstance(value, (int, float)) else -float("inf")

    ranked = sorted(found[:-1], key=score, reverse=True)
    for path in ranked[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
