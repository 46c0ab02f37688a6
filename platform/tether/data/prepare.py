"""Prepare a job's data on the driver: load, sample, encode once (cached), before any Ray work.

    data = prepare_data(spec.data, task, tokenizer, spec.model.label_names)

A bad column, label or line fails here with its file and line. The encoded splits are cached
under ``~/.cache/tether/encoded`` (``TETHER_CACHE`` moves it), keyed by the *content* of the
rows used, the data and task settings, and the tokenizer's whole configuration (vocabulary,
normaliser, pre-tokenizer, special tokens, truncation side, chat template), so a hit can
never be stale. Workers receive compact arrays and pad each batch to its longest row.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tether.data.encoded import Encoded, StaleCache
from tether.data.rows import content_digest, hub_label_names, split_rows
from tether.errors import DataError
from tether.sources import SYNTHETIC_PREFIX, is_local_path

if TYPE_CHECKING:
    from tether.tasks import Task

CACHE_VERSION = "2"


@dataclass
class PreparedData:
    """What the workers need: both splits encoded, label names, padding id, lineage."""

    train: Encoded
    validation: Encoded
    label_names: list[str]
    pad_id: int
    fingerprint: str
    lineage: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # truncated/dropped counts, constants
    extras: dict[str, Encoded] = field(default_factory=dict)  # task sets, e.g. a probe


def tokenizer_identity(tokenizer) -> str:
    """A hash of everything that changes how a tokenizer encodes text.

    Fast tokenizers serialise their whole pipeline (normaliser, pre-tokenizer, model,
    post-processor); init kwargs add special tokens, sides and the chat template.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)  # call-time state, set by every encode
        pipeline.pop("padding", None)
    else:
        pipeline = sorted(tokenizer.get_vocab().items())
    settings = {
        "class": type(tokenizer).__name__,
        "pipeline": pipeline,
        # where the files sit is no setting (their content is the pipeline above): a model
        # installed elsewhere (another venv, node or clone) encodes the same
        "init": {
            k: v
            for k, v in (tokenizer.init_kwargs or {}).items()
            if k != "name_or_path" and not k.endswith("_file")
        },
        "special": tokenizer.special_tokens_map,
        "sides": [
            getattr(tokenizer, "padding_side", None),
            getattr(tokenizer, "truncation_side", None),
        ],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)
    return f"{type(tokenizer).__name__}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def data_fingerprint(cfg, task_key: dict[str, Any], tokenizer_id: str, digest: str, labels) -> str:
    parts = {
        "v": CACHE_VERSION,
        "data": cfg.model_dump(mode="json"),
        "task": task_key,
        "tokenizer": tokenizer_id,
        "rows": digest,
        "labels": labels,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether"
    return Path(root) / "encoded"


def prepare_data(
    cfg, task: Task, tokenizer, label_names: list[str] | None, use_cache: bool = True
) -> PreparedData:
    """Load, sample and encode both splits for ``task`` (cached by content fingerprint)."""
    tokenizer_id = tokenizer_identity(tokenizer)  # before any encode sets call-time state
    train_rows, val_rows = split_rows(cfg)
    hub_names = hub_label_names(cfg.train, cfg.hub_subset, task.label_column, cfg.hub_revision)
    labels = task.label_names(train_rows, label_names, hub_names)
    task = task.with_labels(labels)
    digest = content_digest(train_rows, val_rows)
    fp = data_fingerprint(cfg, task.cache_key(), tokenizer_id, digest, labels)
    path = cache_dir() / f"{fp}.npz"
    if use_cache and path.is_file():
        try:
            return load_cached(path, fp)
        except StaleCache:
            pass  # re-encoded below and the cache rewritten
    stats: dict[str, float] = {}
    splits = {}
    for name, rows in (("train", train_rows), ("validation", val_rows)):
        splits[name], split_stats = task.encode(rows, tokenizer, name)
        stats.update({f"{name}_{k}": v for k, v in split_stats.items()})
        if len(splits[name]) == 0:
            raise DataError(f"data.{name}: no usable examples left after encoding ({split_stats})")
    lineage = {
        "train_source": cfg.train,
        "validation_source": cfg.validation or f"{cfg.train} ({_val_origin(cfg)})",
        "num_train": len(splits["train"]),
        "num_validation": len(splits["validation"]),
        "fingerprint": fp,
        "content_sha256": digest,
    }
    prepared = PreparedData(
        splits["train"], splits["validation"], list(labels), pad_id(tokenizer), fp, lineage, stats
    )
    if use_cache:
        save_cached(path, prepared)
    return prepared


def _val_origin(cfg) -> str:
    if cfg.train.startswith(SYNTHETIC_PREFIX):
        return "held-out synthetic split"
    if not is_local_path(cfg.train):
        return f"hub split {cfg.validation_split!r} or a {cfg.validation_fraction:.0%} carve"
    return f"{cfg.validation_fraction:.0%} carved from train"


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id or 0)


def save_cached(path: Path, d: PreparedData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    splits_meta = {}
    for name, split in [("train", d.train), ("validation", d.validation), *d.extras.items()]:
        split_arrays, meta = split.to_arrays(name)
        arrays.update(split_arrays)
        splits_meta[name] = meta
    meta = {
        "label_names": d.label_names,
        "pad_id": d.pad_id,
        "lineage": d.lineage,
        "stats": d.stats,
        "splits": splits_meta,
        "extras": list(d.extras),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def load_cached(path: Path, fp: str) -> PreparedData:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        splits = {n: Encoded.from_arrays(z, n, m) for n, m in meta["splits"].items()}
    return PreparedData(
        splits["train"],
        splits["validation"],
        meta["label_names"],
        meta["pad_id"],
        fp,
        meta["lineage"],
        meta.get("stats", {}),
        {name: splits[name] for name in meta.get("extras", [])},
    )
