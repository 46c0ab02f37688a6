"""Job specs: every shipped spec validates; bad specs name every bad key at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tether.config import SpecError, load_job, parse_overrides, validate_job

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_job_spec_validates(path):
    """Each jobs/*.yaml validates and opens with a comment giving its launch command."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "tether " in first, f"{path.name} must open with its command"
    spec = load_job(path)
    assert spec.name
    # the spec round-trips: its resolved dict validates to the same spec
    assert validate_job(spec.to_dict()).to_dict() == spec.to_dict()


def test_shipped_specs_cover_demo_and_sst2():
    """The offline demo and the SST-2 job are shipped."""
    assert {"demo.yaml", "sst2.yaml"} <= {p.name for p in JOBS}


def test_overrides_parse_yaml_values_into_nested_keys():
    """key=value overrides become nested dicts with YAML-typed values."""
    got = parse_overrides(["objective.lambda=0.1", "scaling.num_workers=2", "model.freeze=[a, b]"])
    assert got == {
        "objective": {"lambda": 0.1},
        "scaling": {"num_workers": 2},
        "model": {"freeze": ["a", "b"]},
    }


def test_overrides_apply_on_top_of_the_file(tmp_path):
    """CLI overrides win over the YAML file."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"objective": {"lambda": 0.5, "mode": "decoupled"}}))
    spec = load_job(path, ["objective.lambda=0.25"])
    assert spec.objective.lam == 0.25 and spec.objective.mode == "decoupled"


def test_all_problems_are_reported_at_once_with_key_and_value():
    """Unknown key, wrong type, negative λ and a bad enum all appear in one error."""
    with pytest.raises(SpecError) as err:
        validate_job(
            {
                "objective": {"lambda": -1, "mode": "sideways"},
                "train": {"batch_size": "big"},
                "optim": {"learning_rate": 0.1},
            }
        )
    text = str(err.value)
    assert len(err.value.problems) == 4
    assert "objective.lambda" in text and "-1" in text
    assert "objective.mode" in text and "sideways" in text
    assert "train.batch_size" in text and "big" in text
    assert "optim.learning_rate: unknown key" in text


def test_missing_data_file_and_unknown_column_are_named(tmp_path, easy_csv):
    """A missing file and a column that is not in the file fail validation, naming both."""
    with pytest.raises(SpecError) as err:
        validate_job(
            {
                "data": {
                    "train": str(easy_csv["train"]),
                    "validation": str(tmp_path / "nope.csv"),
                    "text_column": "sentence",
                }
            }
        )
    text = str(err.value)
    assert "data.validation: file not found" in text and "nope.csv" in text
    assert "data.train" in text and "'sentence'" in text and "has ['label', 'text']" in text


def test_rename_columns_satisfies_the_column_check(tmp_path):
    """rename_columns maps a file's columns onto the configured names (SST-2 dev's 'content')."""
    path = tmp_path / "dev.tsv"
    path.write_text("label\tcontent\n1\ta fine film\n")
    spec = validate_job(
        {
            "data": {
                "train": str(path),
                "text_column": "sentence",
                "rename_columns": {"content": "sentence"},
            }
        }
    )
    assert spec.data.train == str(path)


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch, easy_csv):
    """Relative data/storage paths are stored absolute, so Ray workers elsewhere find them."""
    monkeypatch.chdir(easy_csv["train"].parent)
    spec = validate_job({"data": {"train": "./train.csv"}, "storage": {"path": "out"}})
    assert spec.data.train == str(easy_csv["train"].resolve())
    assert Path(spec.storage.path).is_absolute()


def test_label_names_must_match_num_labels():
    """model.label_names and model.num_labels must agree."""
    with pytest.raises(SpecError, match="label_names has 3 names but model.num_labels is 2"):
        validate_job({"model": {"label_names": ["a", "b", "c"], "num_labels": 2}})


def test_unknown_packaged_model_and_missing_model_dir(tmp_path):
    """Model references are checked before any work: unknown packaged name, missing folder."""
    with pytest.raises(SpecError) as err:
        validate_job({"model": {"name": "packaged:gpt-17"}})
    assert "unknown packaged model" in str(err.value)
    with pytest.raises(SpecError, match="no such model directory"):
        validate_job({"model": {"name": str(tmp_path / "missing-model")}})


def test_malformed_override_is_rejected():
    """An override without '=' is an error naming the item."""
    with pytest.raises(SpecError, match="expected key=value"):
        parse_overrides(["objective.lambda"])


@pytest.mark.parametrize(
    "section,values,key",
    [
        ("optim", {"betas": [0.9, 1.0]}, "optim.betas.1"),
        ("optim", {"betas": [-0.1, 0.999]}, "optim.betas.0"),
        ("tracking", {"registered_model": "team/sentiment"}, "tracking.registered_model"),
        ("tracking", {"registered_model": "sentiment@v2"}, "tracking.registered_model"),
        ("tracking", {"registered_model": "s3:model"}, "tracking.registered_model"),
        ("tracking", {"registered_model": ".."}, "tracking.registered_model"),
        ("tracking", {"experiment": ""}, "tracking.experiment"),
        ("tracking", {"experiment": "  "}, "tracking.experiment"),
        ("model", {"label_names": ["neg", "pos", "neg"]}, "model.label_names"),
    ],
)
def test_values_the_workers_or_mlflow_would_refuse_fail_validation(section, values, key):
    """AdamW's betas outside [0, 1), a registry name MLflow refuses or a models:/ URI cannot
    hold, an empty experiment and repeated label names fail here, naming the key."""
    with pytest.raises(SpecError) as err:
        validate_job({section: values})
    assert [p for p in err.value.problems if p.startswith(f"{key}:")], err.value.problems


def test_submit_checks_every_reference_that_needs_no_local_file(tmp_path):
    """Without the files (`tether submit`), unknown packaged models, synthetic datasets, a
    synthetic dataset of another task and a malformed models:/ URI still fail; a missing
    local file does not (it is checked where the job runs)."""
    with pytest.raises(SpecError) as err:
        validate_job(
            {
                "model": {"name": "packaged:gpt-17"},
                "data": {"train": "synthetic:sentimnt", "validation": "synthetic:chat"},
            },
            check_files=False,
        )
    text = str(err.value)
    assert "model.name: unknown packaged model" in text
    assert "data.train: unknown synthetic dataset" in text
    assert "data.validation: synthetic:chat is causal-lm data" in text
    with pytest.raises(SpecError, match="model.name: a registered model is models:/NAME@ALIAS"):
        validate_job({"model": {"name": "models:/demo"}}, check_files=False)
    with pytest.raises(SpecError, match="unknown synthetic dataset"):  # with a schema error too
        validate_job(
            {"data": {"train": "synthetic:nope"}, "train": {"epochs": 0}}, check_files=False
        )
    missing = {"data": {"train": str(tmp_path / "absent.csv")}}
    assert validate_job(missing, check_files=False).data.train.endswith("absent.csv")


def test_a_mistyped_file_is_file_not_found_not_a_hub_id(tmp_path, monkeypatch):
    """'data/train.cvs' (wrong suffix) is a path whether or not data/ exists here, and so is
    'data/train' when data/ exists: each is 'file not found' naming its key, not a hub lookup.
    Hub ids ('owner/name', 'owner/name-v1.5') stay hub ids."""
    monkeypatch.chdir(tmp_path)
    for ref in ("data/train.cvs", "train.cvs", "data/sst2/train"):
        with pytest.raises(SpecError, match="data.train: file not found"):
            validate_job({"data": {"train": ref}})
    (tmp_path / "data").mkdir()
    with pytest.raises(SpecError, match="data.validation: file not found"):
        validate_job({"data": {"train": "synthetic:sentiment", "validation": "data/dev"}})
    for hub_id in ("nyu-mll/glue", "imdb", "teknium/OpenHermes-2.5"):
        assert validate_job({"data": {"train": hub_id}}).data.train == hub_id
