"""Data: file formats, label mapping, dynamic padding, sharding, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tether.config import validate_job
from tether.data import DataError, epoch_batches, prepare_data
from tether.models import load_tokenizer

from .conftest import easy_rows, shared_data


@pytest.fixture(scope="module")
def tokenizer(packaged_model_dir):
    return load_tokenizer(str(packaged_model_dir))


def write_rows(path, rows):
    """Write rows in the format the suffix names."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_every_file_format_loads_to_the_same_examples(tmp_path, tokenizer, suffix):
    """csv/tsv/json/jsonl/parquet files give identical encoded data."""
    rows = easy_rows(30, seed=3)
    path = write_rows(tmp_path / f"train{suffix}", rows)
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.2}})
    data = prepare_data(spec.data, tokenizer, "t", ["negative", "positive"], use_cache=False)
    assert len(data.train) + len(data.validation) == 30
    assert len(data.validation) == 6
    reference = tokenizer(rows[0]["text"])["input_ids"]
    all_ids = [
        data.train.ids[s:e].tolist() for s, e in zip(data.train.offsets, data.train.offsets[1:])
    ]
    all_ids += [
        data.validation.ids[s:e].tolist()
        for s, e in zip(data.validation.offsets, data.validation.offsets[1:])
    ]
    assert reference in all_ids


def test_string_labels_map_to_ids_and_bad_labels_are_named(tmp_path, tokenizer):
    """String labels map by label_names; a label outside them fails naming the value."""
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}] * 5
    path = write_rows(tmp_path / "s.jsonl", rows)
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.2}})
    data = prepare_data(spec.data, tokenizer, "t", ["neg", "pos"], use_cache=False)
    assert set(data.train.labels.tolist()) == {0, 1}
    bad = write_rows(tmp_path / "b.jsonl", rows + [{"text": "meh", "label": "neutral"}])
    spec = validate_job({"data": {"train": str(bad), "validation_fraction": 0.2}})
    with pytest.raises(DataError, match="'neutral'"):
        prepare_data(spec.data, tokenizer, "t", ["neg", "pos"], use_cache=False)


def test_collate_pads_each_batch_to_its_longest_example(tmp_path, tokenizer):
    """Dynamic padding: width = longest example in the batch, mask marks real tokens."""
    rows = [{"text": "a " * n, "label": n % 2} for n in (1, 3, 9, 20)] * 3
    path = write_rows(tmp_path / "p.csv", rows)
    spec = validate_job(
        {"data": {"train": str(path), "validation_fraction": 0.25, "max_length": 16}}
    )
    data = prepare_data(spec.data, tokenizer, "t", None, use_cache=False)
    lengths = data.train.lengths
    assert lengths.max() == 16, "long texts are truncated to max_length"
    short = np.argsort(lengths)[:2]
    batch = data.train.collate(short, data.pad_id)
    assert batch["input_ids"].shape[1] == lengths[short].max()
    assert batch["attention_mask"].sum().item() == lengths[short].sum()


def test_sharded_batches_are_disjoint_cover_all_and_change_each_epoch():
    """Ranks get disjoint shards of equal batch count covering the data; epochs reshuffle."""
    lengths = np.random.default_rng(0).integers(3, 50, size=101)
    per_rank = [epoch_batches(lengths, 8, epoch=0, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1])
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert set(seen.tolist()) == set(range(101))  # 101 is odd: one example repeats to even out
    assert len(seen) == 102
    epoch1 = epoch_batches(lengths, 8, epoch=1, seed=1, rank=0, world_size=2)
    assert not all(np.array_equal(a, b) for a, b in zip(per_rank[0], epoch1))


def test_group_by_length_pads_less():
    """Length-grouped batches carry less padding than random batches over the same epoch."""
    lengths = np.random.default_rng(0).integers(3, 120, size=2000)

    def padding(batches):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    plain = epoch_batches(lengths, 16, 0, 0, 0, 1, group_by_length=False)
    grouped = epoch_batches(lengths, 16, 0, 0, 0, 1, group_by_length=True)
    assert sorted(np.concatenate(grouped).tolist()) == sorted(np.concatenate(plain).tolist())
    assert padding(grouped) < 0.3 * padding(plain)


def test_encoded_data_is_cached_by_fingerprint(tmp_path, tokenizer, monkeypatch):
    """A second prepare with the same settings reads the cache; changing max_length misses it."""
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    path = write_rows(tmp_path / "c.csv", easy_rows(20, 0))
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.25}})
    first = prepare_data(spec.data, tokenizer, "t", None)
    files = list((tmp_path / "cache" / "encoded").glob("*.npz"))
    assert len(files) == 1
    second = prepare_data(spec.data, tokenizer, "t", None)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train.ids, first.train.ids)
    spec.data.max_length = 8
    prepare_data(spec.data, tokenizer, "t", None)
    assert len(list((tmp_path / "cache" / "encoded").glob("*.npz"))) == 2


def test_max_train_samples_subsamples_reproducibly(tmp_path, tokenizer):
    """Low-data runs: the same sample_seed picks the same examples; another seed differs."""
    path = write_rows(tmp_path / "m.csv", easy_rows(200, 0))

    def sample(seed):
        spec = validate_job(
            {"data": {"train": str(path), "max_train_samples": 50, "sample_seed": seed}}
        )
        d = prepare_data(spec.data, tokenizer, "t", None, use_cache=False)
        return len(d.train) + len(d.validation), d.train.ids.tolist()

    n, a = sample(1)
    assert n == 50
    assert sample(1)[1] == a and sample(2)[1] != a


def test_sst2_tsv_files_load_with_renamed_dev_column(tokenizer):
    """The real SST-2 TSVs load: dev's 'content' column is renamed onto 'sentence'."""
    train, dev = shared_data("sst2", "train.tsv"), shared_data("sst2", "dev.tsv")
    spec = validate_job(
        {
            "data": {
                "train": str(train),
                "validation": str(dev),
                "text_column": "sentence",
                "rename_columns": {"content": "sentence"},
                "max_train_samples": 300,
            }
        }
    )
    data = prepare_data(spec.data, tokenizer, "t", ["negative", "positive"], use_cache=False)
    assert len(data.train) == 300
    assert len(data.validation) == 872
    assert set(data.validation.labels.tolist()) == {0, 1}
