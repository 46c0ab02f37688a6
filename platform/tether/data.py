"""Data: load the splits, sample, map labels, tokenize once, batch with dynamic padding.

The driver prepares the data before any Ray work (so a bad column or label fails early),
tokenizes it once (cached on disk by fingerprint) and ships compact token arrays to the
workers. Workers shard the example order with a ``DistributedSampler`` and pad each batch to
its own longest example.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.config import SYNTHETIC_PREFIX, DataSection, is_local_path
from tether.synthetic import LABEL_NAMES as SENTIMENT_LABELS
from tether.synthetic import sentiment_examples

# name → (generator, label names, train size, validation size)
SYNTHETIC_SOURCES = {"sentiment": (sentiment_examples, SENTIMENT_LABELS, 4000, 800)}
CACHE_VERSION = "1"


class DataError(ValueError):
    """The data does not fit the job spec (names the key and the value)."""


# --------------------------------------------------------------------------- encoded splits


@dataclass
class EncodedSplit:
    """Tokenized examples as flat arrays: example i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32, all token ids concatenated
    offsets: np.ndarray  # int64, shape (n + 1,)
    labels: np.ndarray  # int64, shape (n,)
    type_ids: np.ndarray | None = None  # int8, like ids; only for text pairs

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def collate(self, indices: list[int] | np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """A batch padded to its longest example: input_ids, attention_mask, labels (B, T)."""
        lengths = self.lengths[indices]
        width = int(lengths.max())
        input_ids = np.full((len(indices), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(indices), width), dtype=np.int64)
        types = (
            np.zeros((len(indices), width), dtype=np.int64) if self.type_ids is not None else None
        )
        for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
            start = self.offsets[i]
            input_ids[row, :n] = self.ids[start : start + n]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = self.type_ids[start : start + n]
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(self.labels[indices].astype(np.int64)),
        }
        if types is not None:
            batch["token_type_ids"] = torch.from_numpy(types)
        return batch


@dataclass
class PreparedData:
    """What the workers need: both splits encoded, label names, padding id, lineage."""

    train: EncodedSplit
    validation: EncodedSplit
    label_names: list[str]
    pad_id: int
    fingerprint: str
    lineage: dict[str, Any] = field(default_factory=dict)


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int):
    """Tokenize with truncation; returns (ids, offsets, type_ids or None)."""
    enc = tokenizer(
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        return_token_type_ids=pairs is not None,
        return_attention_mask=False,
    )
    ids_list = enc["input_ids"]
    offsets = np.zeros(len(ids_list) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids_list], out=offsets[1:])
    ids = np.fromiter((t for row in ids_list for t in row), dtype=np.int32, count=int(offsets[-1]))
    type_ids = None
    if pairs is not None:
        flat = (t for row in enc["token_type_ids"] for t in row)
        type_ids = np.fromiter(flat, dtype=np.int8, count=int(offsets[-1]))
    return ids, offsets, type_ids


# --------------------------------------------------------------------------- loading raw rows


def load_rows(ref: str, split: str, hub_subset: str | None) -> list[dict[str, Any]]:
    """Rows of one split from a synthetic source, a local file, or the hub."""
    if ref.startswith(SYNTHETIC_PREFIX):
        generate, _, n_train, n_val = SYNTHETIC_SOURCES[ref[len(SYNTHETIC_PREFIX) :]]
        n = n_train if split == "train" else n_val
        return generate("train" if split == "train" else "validation", n, seed=0)
    import datasets

    datasets.disable_progress_bars()
    if is_local_path(ref):
        suffix = Path(ref).suffix.lower()
        builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}.get(
            suffix, "parquet"
        )
        kwargs: dict[str, Any] = {}
        if suffix == ".tsv":
            kwargs = {"delimiter": "\t", "quoting": 3}  # csv.QUOTE_NONE: quotes are text here
        ds = datasets.load_dataset(builder, data_files=ref, split="train", **kwargs)
    else:
        ds = datasets.load_dataset(ref, hub_subset, split=split)
    return ds.to_list()


def hub_label_names(ref: str, hub_subset: str | None, label_column: str) -> list[str] | None:
    """ClassLabel names from a hub dataset's features, when it declares them."""
    if ref.startswith(SYNTHETIC_PREFIX):
        return list(SYNTHETIC_SOURCES[ref[len(SYNTHETIC_PREFIX) :]][1])
    if is_local_path(ref):
        return None
    import datasets

    builder = datasets.load_dataset_builder(ref, hub_subset)
    feature = (builder.info.features or {}).get(label_column)
    return list(feature.names) if hasattr(feature, "names") else None


def _rename(rows: list[dict[str, Any]], renames: dict[str, str]) -> list[dict[str, Any]]:
    if not renames:
        return rows
    return [{renames.get(k, k): v for k, v in r.items()} for r in rows]


def split_rows(cfg: DataSection) -> tuple[list[dict], list[dict]]:
    """Train and validation rows after renaming, sampling and (if needed) a held-out carve."""
    train = _rename(load_rows(cfg.train, cfg.train_split, cfg.hub_subset), cfg.rename_columns)
    rng = np.random.default_rng(cfg.sample_seed)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        keep = rng.permutation(len(train))[: cfg.max_train_samples]
        train = [train[i] for i in sorted(keep)]
    validation = None
    if cfg.validation is not None:
        validation = load_rows(cfg.validation, cfg.validation_split, cfg.hub_subset)
    elif cfg.train.startswith(SYNTHETIC_PREFIX):
        validation = load_rows(cfg.train, "validation", None)
    elif not is_local_path(cfg.train):
        validation = _try_hub_split(cfg)
    if validation is None:  # carve from the (sampled) training rows, never from a dev/test set
        order = rng.permutation(len(train))
        n_val = max(1, round(cfg.validation_fraction * len(train)))
        validation = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    else:
        validation = _rename(validation, cfg.rename_columns)
    if cfg.max_validation_samples is not None and cfg.max_validation_samples < len(validation):
        keep = rng.permutation(len(validation))[: cfg.max_validation_samples]
        validation = [validation[i] for i in sorted(keep)]
    return train, validation


def _try_hub_split(cfg: DataSection) -> list[dict] | None:
    try:
        return load_rows(cfg.train, cfg.validation_split, cfg.hub_subset)
    except ValueError:  # the hub dataset has no such split
        return None


def label_ids(rows: list[dict], column: str, label_names: list[str], split: str) -> np.ndarray:
    """Labels as ids in [0, num_labels): ints pass through, strings map by name."""
    index = {n: i for i, n in enumerate(label_names)}
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        value = row.get(column)
        if isinstance(value, str) and value in index:
            out[i] = index[value]
        elif (
            isinstance(value, (int, np.integer))
            and not isinstance(value, bool)
            and 0 <= value < len(label_names)
        ):
            out[i] = int(value)
        else:
            raise DataError(
                f"data.label_column: {split} row {i} has label {value!r}, expected one of "
                f"{label_names} or an id in [0, {len(label_names)}); set model.label_names"
            )
    return out


def infer_label_names(rows: list[dict], column: str) -> list[str]:
    """Sorted distinct string labels, or '0'..'K-1' for integer labels."""
    values = {r.get(column) for r in rows}
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(int(max(values)) + 1)]
    raise DataError(f"data.label_column: mixed or missing label values in column {column!r}")


# --------------------------------------------------------------------------- prepare (driver)


def data_fingerprint(cfg: DataSection, tokenizer_id: str, label_names: list[str] | None) -> str:
    """Stable key for the encoded cache: data settings, file stats, tokenizer, labels."""
    parts: dict[str, Any] = {
        "v": CACHE_VERSION,
        "data": cfg.model_dump(mode="json"),
        "tokenizer": tokenizer_id,
        "labels": label_names,
    }
    for ref in (cfg.train, cfg.validation):
        if ref and is_local_path(ref) and Path(ref).is_file():
            st = Path(ref).stat()
            parts[ref] = [st.st_size, st.st_mtime_ns]
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_identity(tokenizer, source: str) -> str:
    """Name plus a hash of the vocabulary: two tokenizers that encode alike hash alike."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return f"{type(tokenizer).__name__}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def cache_dir() -> Path:
    root = os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether"
    return Path(root) / "encoded"


def prepare_data(
    cfg: DataSection,
    tokenizer,
    tokenizer_source: str,
    label_names: list[str] | None,
    use_cache: bool = True,
) -> PreparedData:
    """Load, sample and tokenize both splits (cached by fingerprint)."""
    if label_names is None:
        label_names = hub_label_names(cfg.train, cfg.hub_subset, cfg.label_column)
    fp = data_fingerprint(cfg, tokenizer_identity(tokenizer, tokenizer_source), label_names)
    path = cache_dir() / f"{fp}.npz"
    if use_cache and path.is_file():
        return _load_cached(path, fp)
    train_rows, val_rows = split_rows(cfg)
    if not train_rows:
        raise DataError(f"data.train: no training examples in {cfg.train!r}")
    _check_columns(train_rows[0], cfg, "train")
    _check_columns(val_rows[0], cfg, "validation")
    if label_names is None:
        label_names = infer_label_names(train_rows, cfg.label_column)
    splits = {}
    for name, rows in (("train", train_rows), ("validation", val_rows)):
        texts = [str(r[cfg.text_column]) for r in rows]
        pairs = [str(r[cfg.text_pair_column]) for r in rows] if cfg.text_pair_column else None
        ids, offsets, types = encode_texts(tokenizer, texts, pairs, cfg.max_length)
        labels = label_ids(rows, cfg.label_column, label_names, name)
        splits[name] = EncodedSplit(ids, offsets, labels, types)
    lineage = {
        "train_source": cfg.train,
        "validation_source": cfg.validation or f"{cfg.train} ({_val_origin(cfg)})",
        "num_train": len(train_rows),
        "num_validation": len(val_rows),
        "fingerprint": fp,
    }
    prepared = PreparedData(
        splits["train"], splits["validation"], list(label_names), _pad_id(tokenizer), fp, lineage
    )
    if use_cache:
        _save_cached(path, prepared)
    return prepared


def _val_origin(cfg: DataSection) -> str:
    if cfg.train.startswith(SYNTHETIC_PREFIX):
        return "held-out synthetic split"
    if not is_local_path(cfg.train):
        return f"hub split {cfg.validation_split!r} or a {cfg.validation_fraction:.0%} carve"
    return f"{cfg.validation_fraction:.0%} carved from train"


def _check_columns(row: dict, cfg: DataSection, split: str) -> None:
    needed = {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}
    if cfg.text_pair_column:
        needed["data.text_pair_column"] = cfg.text_pair_column
    for key, col in needed.items():
        if col not in row:
            raise DataError(f"{key}: column {col!r} not in the {split} data (has {sorted(row)})")


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id or 0)


def _save_cached(path: Path, d: PreparedData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in ("train", "validation"):
        split: EncodedSplit = getattr(d, name)
        arrays.update({f"{name}_ids": split.ids, f"{name}_offsets": split.offsets})
        arrays[f"{name}_labels"] = split.labels
        if split.type_ids is not None:
            arrays[f"{name}_type_ids"] = split.type_ids
    meta = {"label_names": d.label_names, "pad_id": d.pad_id, "lineage": d.lineage}
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def _load_cached(path: Path, fp: str) -> PreparedData:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        splits = {
            name: EncodedSplit(
                z[f"{name}_ids"],
                z[f"{name}_offsets"],
                z[f"{name}_labels"],
                z[f"{name}_type_ids"] if f"{name}_type_ids" in z else None,
            )
            for name in ("train", "validation")
        }
    return PreparedData(
        splits["train"],
        splits["validation"],
        meta["label_names"],
        meta["pad_id"],
        fp,
        meta["lineage"],
    )


# --------------------------------------------------------------------------- batching (workers)


def epoch_batches(
    lengths: np.ndarray,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    group_by_length: bool = False,
) -> list[np.ndarray]:
    """This rank's batches for one epoch; every rank gets the same number of batches.

    A DistributedSampler shuffles with (seed, epoch) and shards; with ``group_by_length``
    each chunk of 50 batches is sorted by length so batches pad less, and the batches are then
    shuffled so long and short ones interleave.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(len(lengths)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)  # a new order every epoch, identical across ranks
    order = np.fromiter(sampler, dtype=np.int64)
    if group_by_length:
        chunk = batch_size * 50
        parts = [order[i : i + chunk] for i in range(0, len(order), chunk)]
        order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng = np.random.default_rng([seed, epoch, rank])
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
