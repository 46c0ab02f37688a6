"""Data: raw rows → encoded arrays (once, on the driver, cached) → batches (on the workers).

    rows      load a split from a synthetic source, a file (CSV/TSV/JSON/JSONL/parquet/CoNLL)
              or the hub; sample; carve a validation set
    encoded   Ragged / Encoded: compact arrays and the padding collate
    prepare   PreparedData and prepare_data (cache keyed by content and tokenizer)
    batching  epoch batches (DistributedSampler order) and equal-count eval shards

How a row becomes arrays is the task's business (``tether.tasks``); this package never asks
which task it serves.
"""

from tether.data.batching import epoch_batches, eval_batches, steps_per_epoch
from tether.data.encoded import IGNORE_INDEX, Encoded, Ragged
from tether.data.prepare import PreparedData, prepare_data, tokenizer_identity
from tether.data.rows import WHERE, load_rows, split_rows, where
from tether.errors import DataError

__all__ = [
    "DataError",
    "Encoded",
    "IGNORE_INDEX",
    "PreparedData",
    "Ragged",
    "WHERE",
    "epoch_batches",
    "eval_batches",
    "load_rows",
    "prepare_data",
    "split_rows",
    "steps_per_epoch",
    "tokenizer_identity",
    "where",
]
