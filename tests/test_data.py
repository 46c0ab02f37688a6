"""Data: file formats, label mapping, dynamic padding, sharding, caching."""

from __future__ import annotations

import numpy as np
import pytest

from tether.config import validate_job
from tether.data import DataError, epoch_batches, eval_batches
from tether.models import load_tokenizer

from .helpers import easy_rows, prepare, row_ids, shared_data, write_rows


@pytest.fixture(scope="module")
def tokenizer(packaged_model_dir):
    return load_tokenizer(str(packaged_model_dir))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_every_file_format_loads_to_the_same_examples(tmp_path, tokenizer, suffix):
    """csv/tsv/json/jsonl/parquet files give identical encoded data."""
    rows = easy_rows(30, seed=3)
    path = write_rows(tmp_path / f"train{suffix}", rows)
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.2}})
    _, data = prepare(spec, tokenizer, ["negative", "positive"])
    assert len(data.train) + len(data.validation) == 30
    assert len(data.validation) == 6
    reference = tokenizer(rows[0]["text"])["input_ids"]
    assert reference in row_ids(data.train) + row_ids(data.validation)


def test_string_labels_map_to_ids_and_bad_labels_are_named(tmp_path, tokenizer):
    """String labels map by label_names; a label outside them fails naming the value."""
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}] * 5
    path = write_rows(tmp_path / "s.jsonl", rows)
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.2}})
    _, data = prepare(spec, tokenizer, ["neg", "pos"])
    assert set(data.train.fields["labels"].tolist()) == {0, 1}
    bad = write_rows(tmp_path / "b.jsonl", rows + [{"text": "meh", "label": "neutral"}])
    spec = validate_job({"data": {"train": str(bad), "validation_fraction": 0.2}})
    with pytest.raises(DataError, match=r"'neutral'.*b.jsonl line 11|b.jsonl line 11.*'neutral'"):
        prepare(spec, tokenizer, ["neg", "pos"])


def test_collate_pads_each_batch_to_its_longest_example(tmp_path, tokenizer):
    """Dynamic padding: width = longest example in the batch, mask marks real tokens."""
    rows = [{"text": "a " * n, "label": n % 2} for n in (1, 3, 9, 20)] * 3
    path = write_rows(tmp_path / "p.csv", rows)
    spec = validate_job(
        {"data": {"train": str(path), "validation_fraction": 0.25, "max_length": 16}}
    )
    _, data = prepare(spec, tokenizer)
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
    _, first = prepare(spec, tokenizer, use_cache=True)
    files = list((tmp_path / "cache" / "encoded").glob("*.npz"))
    assert len(files) == 1
    _, second = prepare(spec, tokenizer, use_cache=True)
    assert second.fingerprint == first.fingerprint
    assert row_ids(second.train) == row_ids(first.train)
    spec.data.max_length = 8
    prepare(spec, tokenizer, use_cache=True)
    assert len(list((tmp_path / "cache" / "encoded").glob("*.npz"))) == 2


def test_max_train_samples_subsamples_reproducibly(tmp_path, tokenizer):
    """Low-data runs: the same sample_seed picks the same examples; another seed differs."""
    path = write_rows(tmp_path / "m.csv", easy_rows(200, 0))

    def sample(seed):
        spec = validate_job(
            {"data": {"train": str(path), "max_train_samples": 50, "sample_seed": seed}}
        )
        _, d = prepare(spec, tokenizer)
        return len(d.train) + len(d.validation), row_ids(d.train)

    n, a = sample(1)
    assert n == 50
    assert sample(1)[1] == a and sample(2)[1] != a


def test_the_validation_sample_is_the_same_at_every_training_size(tmp_path):
    """A data-size study scores every size on the same validation rows: the validation sample
    does not depend on whether (or how much) max_train_samples cuts the training set."""
    from tether.data.rows import split_rows

    train = write_rows(tmp_path / "train.csv", easy_rows(120, 0))
    dev = write_rows(tmp_path / "dev.csv", easy_rows(80, 1))

    def validation(max_train, seed=0):
        data = {"train": str(train), "validation": str(dev), "max_validation_samples": 30}
        spec = validate_job({"data": {**data, "max_train_samples": max_train, "sample_seed": seed}})
        rows, held_out = split_rows(spec.data)
        assert len(rows) == min(max_train or 120, 120)
        return [row["text"] for row in held_out]

    chosen = validation(None)
    assert len(chosen) == 30
    assert all(validation(n) == chosen for n in (10, 119, 120, 500))
    assert validation(None, seed=1) != chosen


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
    _, data = prepare(spec, tokenizer, ["negative", "positive"])
    assert len(data.train) == 300
    assert len(data.validation) == 872
    assert set(data.validation.fields["labels"].tolist()) == {0, 1}


def test_equal_eval_batch_counts_on_every_rank_cover_each_example_once():
    """Eval shards are disjoint and complete; short ranks repeat a batch marked not counted."""
    lengths = np.arange(1, 12)  # 11 examples on 3 ranks: 4, 4, 3
    per_rank = [eval_batches(lengths, 2, r, 3) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    counted = np.concatenate([i for batches in per_rank for i, c in batches if c])
    assert sorted(counted.tolist()) == list(range(11))
    assert [c for _, c in per_rank[2]] == [True, True]
    tiny = [eval_batches(np.array([5]), 4, r, 2) for r in range(2)]
    assert [len(b) for b in tiny] == [1, 1] and tiny[1][0][1] is False


def test_grouped_rows_are_evaluated_together_on_one_rank():
    """With groups (the windows of one QA context), every group's rows land in one batch on
    one rank, each row once; ranks still run the same number of batches; a group larger
    than the batch size gets a batch of its own."""
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 4, 5, 6, 6])
    lengths = np.arange(len(groups)) % 5 + 3
    per_rank = [eval_batches(lengths, 3, r, 2, groups) for r in range(2)]
    assert len({len(b) for b in per_rank}) == 1
    counted = [i for batches in per_rank for i, c in batches if c]
    assert sorted(np.concatenate(counted).tolist()) == list(range(len(groups)))
    homes = {}
    for rank, batches in enumerate(per_rank):
        for b, (indices, c) in enumerate(batches):
            for g in set(groups[indices].tolist()) if c else ():
                assert g not in homes, f"group {g} split over batches"
                homes[g] = (rank, b)
                assert set(np.flatnonzero(groups == g)) <= set(indices.tolist())
    assert any(len(i) == 5 for batches in per_rank for i, _ in batches)  # group 4: 5 rows


# --------------------------------------------------------------------------- data edge cases


def test_csv_with_a_byte_order_mark_loads(tmp_path, tokenizer):
    """Excel's UTF-8 CSV starts with a BOM: the first column is still 'text', not '\ufefftext'."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\ngood film,1\nbad film,0\nfine,1\ndull,0\n".encode())
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.25}})
    _, data = prepare(spec, tokenizer, ["negative", "positive"])
    assert len(data.train) + len(data.validation) == 4


def test_na_words_are_text_and_empty_cells_are_named(tmp_path, tokenizer):
    """'NA', 'null' and 'None' are words, not missing values; an empty cell names its line."""
    path = tmp_path / "na.csv"
    path.write_text("text,label\nNA,1\nnull,0\nNone,1\nfine,0\n")
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.25}})
    _, data = prepare(spec, tokenizer, ["negative", "positive"])
    decoded = {
        tokenizer.decode(ids, skip_special_tokens=True)
        for ids in row_ids(data.train) + row_ids(data.validation)
    }
    assert {"na", "null", "none"} <= decoded  # the uncased tokenizer lower-cases them
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\ngood,1\n,0\nbad,0\nok,1\n")
    spec = validate_job({"data": {"train": str(empty), "validation_fraction": 0.25}})
    with pytest.raises(DataError, match=r"empty.csv line 3 column 'text'"):
        prepare(spec, tokenizer, ["negative", "positive"])


def test_integer_labels_from_one_make_no_phantom_class(tmp_path, tokenizer):
    """Labels 1..3 without names become classes '1','2','3' (not '0'..'3')."""
    rows = [{"text": f"text {i}", "label": 1 + i % 3} for i in range(12)]
    path = write_rows(tmp_path / "k.csv", rows)
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.25}})
    _, data = prepare(spec, tokenizer)
    assert data.label_names == ["1", "2", "3"]
    assert set(data.train.fields["labels"].tolist()) <= {0, 1, 2}


def test_header_only_validation_file_is_named(tmp_path, tokenizer, easy_csv):
    """A validation file with a header and no rows fails with a DataError naming it."""
    empty = tmp_path / "dev.csv"
    empty.write_text("text,label\n")
    spec = validate_job({"data": {"train": str(easy_csv["train"]), "validation": str(empty)}})
    with pytest.raises(DataError, match="data.validation: no rows"):
        prepare(spec, tokenizer, ["negative", "positive"])


def test_cache_key_follows_tokenizer_settings_and_file_content(
    tmp_path, packaged_model_dir, monkeypatch
):
    """Same vocabulary, other normaliser or truncation side: a cache miss; edited rows too."""
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    path = write_rows(tmp_path / "c.csv", easy_rows(20, 0))
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.25}})
    plain = load_tokenizer(str(packaged_model_dir))
    _, a = prepare(spec, plain, use_cache=True)
    left = load_tokenizer(str(packaged_model_dir))
    left.truncation_side = "left"
    _, b = prepare(spec, left, use_cache=True)
    cased = load_tokenizer(str(packaged_model_dir))
    from tokenizers import normalizers

    cased.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    _, c = prepare(spec, cased, use_cache=True)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    stat = path.stat()
    rows = easy_rows(20, 0)
    rows[0]["text"] = "something else entirely"
    write_rows(path, rows)
    import os

    os.utime(
        path, ns=(stat.st_atime_ns, stat.st_mtime_ns)
    )  # same size and time would fool a stat key
    _, d = prepare(spec, plain, use_cache=True)
    assert d.fingerprint != a.fingerprint


def test_a_bad_csv_row_is_named_by_the_line_an_editor_shows(tmp_path, tokenizer):
    """Blank lines and a quoted cell spanning two lines: the empty text on line 7 is named
    as line 7, not as the fifth row's 'line 6'."""
    path = tmp_path / "t.csv"
    path.write_text('text,label\ngood,1\n\n"two\nlines",0\nfine,1\n,0\n')
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.25}})
    with pytest.raises(DataError, match=r"t.csv line 7"):
        prepare(spec, tokenizer)


def test_a_model_installed_elsewhere_has_the_same_tokenizer_identity(tmp_path, packaged_model_dir):
    """Where the tokenizer's files sit (another venv, node or clone) changes nothing it
    encodes: the identity (and so the data fingerprint a resume and the registry gate
    compare) stays the same; a real setting still changes it."""
    import shutil

    from tether.data.prepare import tokenizer_identity

    copy = shutil.copytree(packaged_model_dir, tmp_path / "elsewhere")
    here, there = load_tokenizer(str(packaged_model_dir)), load_tokenizer(str(copy))
    assert tokenizer_identity(here) == tokenizer_identity(there)
    there.padding_side = "left" if here.padding_side == "right" else "right"
    assert tokenizer_identity(here) != tokenizer_identity(there)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_escape_is_named_not_a_traceback(tmp_path, tokenizer, suffix):
    """JSON's "\\ud83d" without its pair parses to a string no UTF-8 encoder takes: the read
    fails with a DataError naming the file, line (or row) and field."""
    path = tmp_path / f"s{suffix}"
    rows = ['{"text": "good film", "label": 1}', '{"text": "great \\ud83d film", "label": 1}']
    path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else f"[{', '.join(rows)}]")
    spec = validate_job({"data": {"train": str(path), "validation_fraction": 0.5}})
    where = "line 2" if suffix == ".jsonl" else "row 1"
    with pytest.raises(DataError, match=rf"s{suffix} {where} field 'text'.*unpaired surrogate"):
        prepare(spec, tokenizer, ["negative", "positive"])


def test_conll_columns_split_on_ascii_whitespace_only(tmp_path):
    """A no-break space inside a token ('10\u00a0000') is part of the token, not a column break."""
    from tether.data import load_rows

    path = tmp_path / "nbsp.conll"
    path.write_text("Paid NN O\n10\u00a0000 CD B-MONEY\neuros\tNN\tI-MONEY\n\n")
    (row,) = load_rows(str(path), "train")
    assert row["tokens"] == ["Paid", "10\u00a0000", "euros"]
    assert row["ner_tags"] == ["O", "B-MONEY", "I-MONEY"]


def test_hub_revision_pins_every_split_and_the_label_names(monkeypatch):
    """data.hub_revision reaches the train split, a hub validation source and the ClassLabel
    names (no network: the loaders are recorded)."""
    import datasets

    from tether.data.rows import hub_label_names, split_rows

    calls = []

    class Rows:
        def to_list(self):
            return [{"text": "fine", "label": 0}, {"text": "dull", "label": 1}]

    class Builder:
        info = datasets.DatasetInfo(
            features=datasets.Features({"label": datasets.ClassLabel(names=["neg", "pos"])})
        )

    def load_dataset(ref, subset=None, split=None, revision=None):
        calls.append(("rows", ref, split, revision))
        return Rows()

    def load_dataset_builder(ref, subset=None, revision=None):
        calls.append(("builder", ref, None, revision))
        return Builder()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    spec = validate_job(
        {
            "data": {
                "train": "owner/reviews",
                "validation": "owner/reviews",
                "hub_revision": "c0ffee",
            }
        }
    )
    split_rows(spec.data)
    assert [c[3] for c in calls] == ["c0ffee"] * 2, calls  # train, then validation
    assert hub_label_names("owner/reviews", None, "label", "c0ffee") == ["neg", "pos"]
    assert calls[-1] == ("builder", "owner/reviews", None, "c0ffee")


def test_an_unreachable_hub_dataset_is_a_data_error_naming_the_key(monkeypatch):
    """No network (or offline mode) is a DataError naming data.train, not a ConnectionError
    traceback; a hub dataset without a validation split still falls back to a carve."""
    import datasets

    from tether.data.rows import split_rows

    class Rows:
        def to_list(self):
            return [{"text": f"text {i}", "label": i % 2} for i in range(10)]

    def load_dataset(ref, subset=None, split=None, revision=None):
        if ref == "owner/offline":
            raise ConnectionError(f"Couldn't reach '{ref}' on the Hub (LocalEntryNotFoundError)")
        if split == "validation":
            raise ValueError(f"Unknown split {split!r}")
        return Rows()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = validate_job({"data": {"train": "owner/offline"}})
    with pytest.raises(DataError, match="data.train: cannot load hub dataset 'owner/offline'"):
        split_rows(spec.data)
    train, validation = split_rows(validate_job({"data": {"train": "owner/reviews"}}).data)
    assert (len(train), len(validation)) == (9, 1)


def test_max_length_beyond_the_models_positions_fails_before_encoding(
    tiny_model_dir, easy_csv, tmp_path
):
    """The tiny model has 128 positions: data.max_length 256 fails on the driver, naming the
    key, the limit and the model; 128 is accepted."""
    from tether.errors import SpecError
    from tether.run import prepare_run_data

    from .helpers import make_tiny_job

    job = make_tiny_job(tiny_model_dir, easy_csv, tmp_path / "runs", data={"max_length": 256})
    with pytest.raises(SpecError, match=r"data.max_length: 256 .*max_position_embeddings is 128"):
        prepare_run_data(validate_job(job), use_cache=False)
    job["data"]["max_length"] = 128
    task, _ = prepare_run_data(validate_job(job), use_cache=False)
    assert task.max_length == 128


def test_positions_without_an_end_take_any_max_length():
    """Only a learned table of absolute positions ends: rotary (Llama) and relative (DeBERTa
    v3) models take a longer data.max_length; BERT's table refuses it."""
    from transformers import BertConfig, DebertaV2Config, LlamaConfig

    from tether.errors import SpecError
    from tether.run import check_max_length

    class NoLimit:
        model_max_length = int(1e30)

    for config in (
        LlamaConfig(max_position_embeddings=512),
        DebertaV2Config(max_position_embeddings=512, position_biased_input=False),
    ):
        check_max_length(1024, "m", NoLimit(), config)
    with pytest.raises(SpecError, match="max_position_embeddings is 512"):
        check_max_length(1024, "m", NoLimit(), BertConfig(max_position_embeddings=512))
