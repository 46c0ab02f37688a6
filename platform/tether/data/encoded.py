"""Encoded examples as compact arrays: what the driver tokenizes once and ships to workers.

A split is a set of named fields. Token-level fields are ``Ragged`` (all rows concatenated,
with offsets), per-example fields are plain arrays. ``collate`` pads a batch of rows to its
longest one: ``input_ids`` with the tokenizer's pad id, ``labels`` with -100 (ignored by the
loss), everything else with 0; ``attention_mask`` comes from the lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # label of positions the loss and metrics skip


@dataclass
class Ragged:
    """Variable-length rows in one array: row i is values[offsets[i]:offsets[i+1]]."""

    values: np.ndarray
    offsets: np.ndarray  # int64, shape (n + 1,)

    @classmethod
    def from_rows(cls, rows: list, dtype) -> Ragged:
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        flat = (v for r in rows for v in r)
        return cls(np.fromiter(flat, dtype=dtype, count=int(offsets[-1])), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def take(self, indices: np.ndarray) -> Ragged:
        return Ragged.from_rows([self.row(int(i)) for i in indices], self.values.dtype)

    def padded(
        self, indices, pad_value: int, width: int | None = None, left: bool = False
    ) -> np.ndarray:
        """Rows ``indices`` in a (len, width) array; ``left`` right-aligns them."""
        lengths = self.lengths[indices]
        width = int(lengths.max()) if width is None else width
        out = np.full((len(indices), width), pad_value, dtype=np.int64)
        for r, (i, n) in enumerate(zip(indices, lengths, strict=True)):
            row = self.values[self.offsets[i] : self.offsets[i] + n]
            if left:
                out[r, width - n :] = row
            else:
                out[r, :n] = row
        return out


class StaleCache(Exception):
    """A cached encoding in an older layout: encode again."""


@dataclass
class Encoded:
    """One encoded split: ``input_ids`` plus task fields (ragged or one value per row)."""

    input_ids: Ragged
    fields: dict[str, Ragged | np.ndarray] = field(default_factory=dict)
    token_fields: tuple[str, ...] = ()  # ragged fields aligned with input_ids (padded with it)
    pad_left: bool = False  # causal LMs: rows end together, so targets share the last positions
    pad_values: dict[str, int] = field(default_factory=dict)  # a ragged field's padding; else 0
    group_field: str | None = None  # rows sharing its value are scored together (QA windows)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.input_ids.lengths

    @property
    def groups(self) -> np.ndarray | None:
        """Per row, the group it is evaluated with (None: every row on its own)."""
        return None if self.group_field is None else self.fields[self.group_field]

    def collate(self, indices, pad_id: int) -> dict[str, torch.Tensor]:
        """A batch padded to its longest row: input_ids, attention_mask and every field."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        width = int(lengths.max())
        left = self.pad_left
        positions = np.arange(width)[None, :]
        real = positions >= width - lengths[:, None] if left else positions < lengths[:, None]
        batch = {
            "input_ids": torch.from_numpy(self.input_ids.padded(indices, pad_id, width, left)),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
        }
        for name, values in self.fields.items():
            pad = self.pad_values.get(name, 0)
            if isinstance(values, Ragged):
                token_level = name in self.token_fields
                wide = width if token_level else None
                batch[name] = torch.from_numpy(
                    values.padded(indices, pad, wide, left and token_level)
                )
            else:
                batch[name] = torch.from_numpy(values[indices].astype(np.int64))
        return batch

    def subset(self, indices) -> Encoded:
        indices = np.asarray(indices, dtype=np.int64)
        fields = {
            k: v.take(indices) if isinstance(v, Ragged) else v[indices]
            for k, v in self.fields.items()
        }
        return Encoded(
            self.input_ids.take(indices),
            fields,
            self.token_fields,
            self.pad_left,
            self.pad_values,
            self.group_field,
        )

    # ------------------------------------------------------------------- (de)serialisation

    def to_arrays(self, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"{prefix}.input_ids.v": self.input_ids.values}
        arrays[f"{prefix}.input_ids.o"] = self.input_ids.offsets
        kinds = {}
        for name, values in self.fields.items():
            if isinstance(values, Ragged):
                arrays[f"{prefix}.{name}.v"], arrays[f"{prefix}.{name}.o"] = (
                    values.values,
                    values.offsets,
                )
                kinds[name] = "ragged"
            else:
                arrays[f"{prefix}.{name}"] = values
                kinds[name] = "array"
        meta = {
            "kinds": kinds,
            "token_fields": list(self.token_fields),
            "pad_left": self.pad_left,
            "pad_values": self.pad_values,
            "group_field": self.group_field,
        }
        return arrays, meta

    @classmethod
    def from_arrays(cls, z, prefix: str, meta: dict[str, Any]) -> Encoded:
        fields: dict[str, Ragged | np.ndarray] = {}
        for name, kind in meta["kinds"].items():
            if kind == "ragged":
                fields[name] = Ragged(z[f"{prefix}.{name}.v"], z[f"{prefix}.{name}.o"])
            else:
                fields[name] = z[f"{prefix}.{name}"]
        ids = Ragged(z[f"{prefix}.input_ids.v"], z[f"{prefix}.input_ids.o"])
        if "pad_values" not in meta:  # written before tasks owned their padding
            raise StaleCache("encoded split without pad_values")
        pad_left = bool(meta.get("pad_left", False))
        return cls(
            ids,
            fields,
            tuple(meta["token_fields"]),
            pad_left,
            dict(meta["pad_values"]),
            meta.get("group_field"),
        )
