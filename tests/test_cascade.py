"""Cascaded fine-tuning: a registered model is the base (θ*) of a new run, pinned, reused
with its head, and named in the new version's lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tether.config import validate_job
from tether.errors import DataError
from tether.run import run_training

from .test_runs import local_job

pytestmark = [pytest.mark.slow]


def tracked_job(model, easy_csv, root: Path, db: Path, name: str, **sections) -> dict:
    job = local_job(model, easy_csv, root, db, **sections)
    job["name"] = name
    job["model"]["name"] = str(model)
    job["tracking"]["registered_model"] = name
    job["storage"]["run_name"] = name
    return job


@pytest.fixture(scope="module")
def stage1(tiny_model_dir, easy_csv, tmp_path_factory):
    """Stage 1: a registered run (it becomes stage1 v1 @champion)."""
    root = tmp_path_factory.mktemp("cascade")
    db = root / "mlflow.db"
    job = tracked_job(tiny_model_dir, easy_csv, root, db, "stage1", objective={"lambda": 0.0})
    return root, db, run_training(validate_job(job), register=True)


def test_stage_two_is_tethered_to_stage_one_and_names_it(stage1, easy_csv, capsys):
    """models:/stage1@champion is pinned to v1 and downloaded once; θ*'s hash is that of stage
    1's exported weights, head included (same labels: reused, anchored); the base scores as
    stage 1 did; the registered stage-2 version and `tether models list` name its parent."""
    from transformers import AutoModelForSequenceClassification

    from tether.anchor import weights_hash
    from tether.cli import main
    from tether.models import load_tokenizer
    from tether.train.loop import evaluate
    from tether.train.strategy import DataParallel

    from .helpers import prepare

    root, db, first = stage1
    job = tracked_job(
        "models:/stage1@champion",
        easy_csv,
        root,
        db,
        "stage2",
        objective={"lambda": 0.1},
        train={"max_steps": 5, "eval_interval": 5},
    )
    spec = validate_job(job)
    second = run_training(spec, register=True)
    assert "models:/stage1@champion is models:/stage1/1" in capsys.readouterr().out
    base = Path(job["storage"]["path"]) / "bases" / "stage1-v1"
    card = json.loads((Path(second.summary["model_dir"]) / "tether.json").read_text())
    assert card["objective"]["base_model"] == "models:/stage1/1"

    stage1_model = AutoModelForSequenceClassification.from_pretrained(first.summary["model_dir"])
    assert second.summary["theta_star_sha256"] == weights_hash(stage1_model.named_parameters())

    task, data = prepare(spec, load_tokenizer(str(base)), ["negative", "positive"])
    model = task.load_model(str(base), None, False).model
    start = evaluate(
        model, data.validation, task, data.pad_id, spec, DataParallel(0, 1, torch.device("cpu"))
    )
    assert start["eval/accuracy"] == first.summary["metrics"]["eval/accuracy"]
    assert start["eval/loss"] == pytest.approx(first.summary["metrics"]["eval/loss"], rel=1e-5)

    from mlflow.tracking import MlflowClient

    version = MlflowClient(tracking_uri=f"sqlite:///{db}").get_model_version("stage2", "1")
    assert version.tags["tether.base_model"] == "models:/stage1/1"
    assert main(["models", "--tracking-uri", f"sqlite:///{db}", "list", "stage2"]) == 0
    assert "← models:/stage1/1" in capsys.readouterr().out


def test_a_base_with_the_same_labels_in_another_order_is_refused(stage1, easy_csv):
    """Reusing the head with its rows meaning other classes would be silent nonsense."""
    root, db, _ = stage1
    job = tracked_job("models:/stage1/1", easy_csv, root, db, "swapped")
    job["model"]["label_names"] = ["positive", "negative"]
    with pytest.raises(DataError, match="registered order"):
        run_training(validate_job(job))


def test_a_malformed_or_missing_registered_name_fails_before_training(stage1, easy_csv):
    from tether.config import SpecError
    from tether.errors import ModelSourceError

    root, db, _ = stage1
    with pytest.raises(SpecError, match="models:/NAME@ALIAS"):
        validate_job(tracked_job("models:/stage1", easy_csv, root, db, "bad"))
    with pytest.raises(ModelSourceError, match="not in the registry"):
        run_training(
            validate_job(tracked_job("models:/nothing@champion", easy_csv, root, db, "none"))
        )


def test_a_pinned_base_is_downloaded_once_and_again_only_when_the_store_changes(
    stage1, easy_csv, monkeypatch
):
    """A second run from the same version reuses bases/stage1-v1; a base whose recorded run
    is not the registry's (another store, a re-created model) is fetched again."""
    import tether.registry as registry
    from tether.run import pin_registered_base

    root, db, _ = stage1
    fetched = []
    real = registry.fetch_model_dir
    monkeypatch.setattr(
        registry, "fetch_model_dir", lambda *a, **k: fetched.append(a) or real(*a, **k)
    )
    pin_registered_base(validate_job(tracked_job("models:/stage1/1", easy_csv, root, db, "a")))
    fetched.clear()  # now it is there, whichever test put it there
    spec = validate_job(tracked_job("models:/stage1@champion", easy_csv, root, db, "again"))
    pin_registered_base(spec)
    assert spec.model.name == "models:/stage1/1" and fetched == []
    card_path = Path(spec.storage.path) / "bases" / "stage1-v1" / "tether.json"
    card = json.loads(card_path.read_text())
    card["registry"]["run_id"] = "another-store"
    card_path.write_text(json.dumps(card))
    pin_registered_base(validate_job(tracked_job("models:/stage1/1", easy_csv, root, db, "x")))
    assert len(fetched) == 1
    assert json.loads(card_path.read_text())["registry"]["run_id"] != "another-store"
