"""Raw rows of a split: from a synthetic generator, a local file, or the hub; then sampled.

Files are read exactly as written: CSV/TSV cells stay strings (no pandas NA guessing turns
"NA" or "None" into a missing value, and an empty cell stays empty for the task to reject), a
UTF-8 byte-order mark is dropped, and every row remembers where it came from (``WHERE``:
"train.csv line 14"), so a bad value is reported with its file and line.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tether.errors import DataError, first_line
from tether.sources import (
    CONLL_SUFFIXES,
    SYNTHETIC_DATASETS,
    SYNTHETIC_PREFIX,
    is_local_path,
    is_squad,
)

Row = dict[str, Any]
WHERE = "__where__"  # each row's origin, for error messages; never a data column


def where(row: Row) -> str:
    return str(row.get(WHERE, "a row"))


# --------------------------------------------------------------------------- one source


def load_rows(
    ref: str,
    split: str,
    hub_subset: str | None = None,
    hub_revision: str | None = None,
    key: str = "data.train",
) -> list[Row]:
    """Rows of one split from a synthetic source, a local file, or the hub (``key``, the spec
    key that named ``ref``, is what a hub failure names)."""
    if ref.startswith(SYNTHETIC_PREFIX):
        from tether.synthetic import generate

        name = ref[len(SYNTHETIC_PREFIX) :]
        info = SYNTHETIC_DATASETS[name]
        n = info.train_size if split == "train" else info.validation_size
        rows = generate(name, "train" if split == "train" else "validation", n, seed=0)
        return [r | {WHERE: f"{ref} [{split}] example {i}"} for i, r in enumerate(rows)]
    if is_local_path(ref):
        return read_file(Path(ref))
    import datasets

    datasets.disable_progress_bars()
    with hub_errors(key, ref):
        ds = datasets.load_dataset(ref, hub_subset, split=split, revision=hub_revision)
    return [r | {WHERE: f"{ref} [{split}] row {i}"} for i, r in enumerate(ds.to_list())]


@contextmanager
def hub_errors(key: str, ref: str):
    """A hub dataset that cannot be reached or found is a DataError naming its key, not a
    traceback: every such failure (no network, offline mode, HTTP error, no such dataset)
    is an OSError in datasets and huggingface_hub."""
    try:
        yield
    except OSError as e:
        reason = first_line(e)
        raise DataError(
            f"{key}: cannot load hub dataset {ref!r} ({type(e).__name__}: {reason}); check the "
            "id and the network, or give a local file (a path: ./file.csv)"
        ) from e


def read_file(path: Path) -> list[Row]:
    """Every row of a data file, each tagged with its file and line (or row index)."""
    suffix = path.suffix.lower()
    if suffix in CONLL_SUFFIXES:
        return read_conll(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [r | {WHERE: f"{path.name} row {i}"} for i, r in enumerate(rows)]


def _read_delimited(path: Path, sep: str) -> list[Row]:
    import csv

    import pandas as pd

    frame = pd.read_csv(
        path,
        sep=sep,
        dtype=str,  # cells are text: the task decides what a label string means
        keep_default_na=False,
        na_filter=False,  # "NA", "null", "None" are words here, not missing values
        encoding="utf-8-sig",  # drop a byte-order mark instead of naming a column '\ufefftext'
        quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,  # TSV quotes are text
    )
    records = frame.to_dict(orient="records")
    lines = record_lines(path, sep)
    if len(lines) != len(records):  # a layout the csv module reads otherwise: count rows
        lines = [i + 2 for i in range(len(records))]
    return [r | {WHERE: f"{path.name} line {n}"} for r, n in zip(records, lines, strict=True)]


def record_lines(path: Path, sep: str) -> list[int]:
    """The line (as an editor shows it) each data record starts on: blank lines are skipped
    and a quoted cell may span lines, so the row index is not the line."""
    import csv

    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    starts, end = [], 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=sep, quoting=quoting)
        for record in reader:
            start, end = end + 1, reader.line_num
            if record:  # a blank line is no record
                starts.append(start)
    return starts[1:]  # the header is the first


# a file decoded as UTF-8 holds no surrogate: only a JSON escape (\ud800-\udfff) makes one
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_utf8(value: Any, where: str, field: str = "") -> None:
    """JSON's \\ud83d escapes can make a string with half a surrogate pair, which no UTF-8
    encoder (tokenizer, cache key) accepts: refuse it here, naming where it is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"{where} field {field or '(row)'!r}: {value[max(0, e.start - 10) : e.end + 10]!r} "
                "has an unpaired surrogate (a lone \\ud800-\\udfff escape); it is not text"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_utf8(k, where, field)
            check_utf8(v, where, f"{field}.{k}" if field else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_utf8(v, where, f"{field}[{i}]")


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path.name} line {number}: expected a JSON object per line")
            if SURROGATE_ESCAPE.search(line):
                check_utf8(row, f"{path.name} line {number}")
            rows.append(row | {WHERE: f"{path.name} line {number}"})
    return rows


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    rows = _json_rows(content, path.name)
    if SURROGATE_ESCAPE.search(text):
        for row in rows:
            check_utf8({k: v for k, v in row.items() if k != WHERE}, row[WHERE])
    return rows


def _json_rows(content: Any, name: str) -> list[Row]:
    if is_squad(content):
        return squad_rows(content, name)
    if isinstance(content, dict):  # column-oriented {"text": [...], "label": [...]}
        lengths = {len(v) for v in content.values() if isinstance(v, list)}
        if len(lengths) != 1 or not all(isinstance(v, list) for v in content.values()):
            raise DataError(f"{name}: a JSON object must map columns to equal-length lists")
        n = lengths.pop()
        content = [{k: v[i] for k, v in content.items()} for i in range(n)]
    if not isinstance(content, list) or not all(isinstance(r, dict) for r in content):
        raise DataError(f"{name}: expected a list of objects or an object of columns")
    return [r | {WHERE: f"{name} row {i}"} for i, r in enumerate(content)]


def squad_rows(content: dict, name: str) -> list[Row]:
    """One row per question of a SQuAD file, in the flat hub layout: {"id", "title",
    "context", "question", "answers": {"text": [...], "answer_start": [...]}}. SQuAD v2.0's
    unanswerable questions get empty answer lists (its "plausible_answers" are not answers)."""
    rows: list[Row] = []
    for a, article in enumerate(content["data"]):
        for p, paragraph in enumerate(article.get("paragraphs") or []):
            for q, qa in enumerate(paragraph.get("qas") or []):
                answers = [] if qa.get("is_impossible") else qa.get("answers") or []
                if not all(isinstance(x, dict) for x in answers):
                    raise DataError(
                        f"{name} data[{a}].paragraphs[{p}].qas[{q}]: answers must be a list of "
                        '{"text", "answer_start"} objects'
                    )
                rows.append(
                    {
                        "id": qa.get("id", f"{a}.{p}.{q}"),
                        "title": article.get("title", ""),
                        "context": paragraph.get("context"),
                        "question": qa.get("question"),
                        "answers": {
                            "text": [x.get("text") for x in answers],
                            "answer_start": [x.get("answer_start") for x in answers],
                        },
                        WHERE: f"{name} data[{a}].paragraphs[{p}].qas[{q}]",
                    }
                )
    return rows


COLUMN_SEPARATOR = re.compile(r"[ \t]+")


def read_conll(path: Path) -> list[Row]:
    """CoNLL-2003 format: one token per line, the tag in the last column, blank lines between
    sentences, ``-DOCSTART-`` lines skipped. Rows: {"tokens": [...], "ner_tags": [...]}."""
    rows: list[Row] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0

    def flush() -> None:
        if tokens:
            rows.append(
                {"tokens": list(tokens), "ner_tags": list(tags), WHERE: f"{path.name} line {start}"}
            )
        tokens.clear()
        tags.clear()

    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            # columns are ASCII-separated: str.split() would also split a token at a no-break
            # space ('10\u00a0000') and keep only its first half
            parts = COLUMN_SEPARATOR.split(line.strip(" \t\r\n"))
            parts = [] if parts == [""] else parts
            if not parts:
                flush()
                continue
            if parts[0] == "-DOCSTART-":
                flush()
                continue
            if len(parts) < 2:
                raise DataError(
                    f"{path.name} line {number}: expected 'TOKEN ... TAG' (the tag in the last "
                    f"column), got {line.rstrip()!r}"
                )
            if not tokens:
                start = number
            tokens.append(parts[0])
            tags.append(parts[-1])
    flush()
    return rows


# --------------------------------------------------------------------------- both splits


def _rename(rows: list[Row], renames: dict[str, str]) -> list[Row]:
    if not renames:
        return rows
    return [{renames.get(k, k): v for k, v in r.items()} for r in rows]


def split_rows(cfg) -> tuple[list[Row], list[Row]]:
    """Train and validation rows after renaming, sampling and (if needed) a held-out carve.

    ``cfg`` is the job's data section. Validation comes from its own file, a synthetic
    source's held-out split, the hub's validation split, or a carve from the *sampled*
    training rows, never from a dev/test set.
    """
    train = load_rows(cfg.train, cfg.train_split, cfg.hub_subset, cfg.hub_revision)
    if not train:
        raise DataError(f"data.train: no training rows in {cfg.train!r}")
    train = _rename(train, cfg.rename_columns)
    rng = np.random.default_rng(cfg.sample_seed)
    # Drawn whether or not it is used, so that the validation sample below is the same rows
    # at every max_train_samples (a data-size study scores every size on one validation set).
    train_order = rng.permutation(len(train))
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = [train[i] for i in sorted(train_order[: cfg.max_train_samples])]
    validation = None
    if cfg.validation is not None:
        validation = load_rows(
            cfg.validation,
            cfg.validation_split,
            cfg.hub_subset,
            cfg.hub_revision,
            "data.validation",
        )
        if not validation:
            raise DataError(f"data.validation: no rows in {cfg.validation!r} (only a header?)")
    elif cfg.train.startswith(SYNTHETIC_PREFIX):
        validation = load_rows(cfg.train, "validation")
    elif not is_local_path(cfg.train):
        validation = _try_hub_split(cfg)
    if validation is None:
        if len(train) < 2:
            raise DataError("data.train: need at least 2 rows to carve a validation set")
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


def _try_hub_split(cfg) -> list[Row] | None:
    try:
        return load_rows(cfg.train, cfg.validation_split, cfg.hub_subset, cfg.hub_revision)
    except DataError:  # the hub is unreachable: not a missing split
        raise
    except ValueError:  # the hub dataset has no such split
        return None


def hub_label_names(
    ref: str, hub_subset: str | None, column: str | None, hub_revision: str | None = None
) -> list[str] | None:
    """ClassLabel names a hub dataset declares for ``column`` (or for its elements), at the
    same revision as its rows; a synthetic dataset's class names."""
    if column is None or is_local_path(ref):
        return None
    if ref.startswith(SYNTHETIC_PREFIX):
        from tether.synthetic import CLASS_NAMES

        names = CLASS_NAMES.get(ref[len(SYNTHETIC_PREFIX) :])
        return list(names) if names else None
    import datasets

    with hub_errors("data.train", ref):
        builder = datasets.load_dataset_builder(ref, hub_subset, revision=hub_revision)
    feature = (builder.info.features or {}).get(column)
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for tags
    return list(feature.names) if hasattr(feature, "names") else None


def content_digest(*splits: list[Row]) -> str:
    """sha256 of exactly the rows used: the encoded cache can never serve stale data."""
    import hashlib

    h = hashlib.sha256()
    for rows in splits:
        h.update(b"\x00split")
        for row in rows:
            clean = {k: v for k, v in row.items() if k != WHERE}
            h.update(json.dumps(clean, sort_keys=True, default=str, ensure_ascii=False).encode())
            h.update(b"\n")
    return h.hexdigest()
