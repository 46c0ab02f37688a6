"""MLflow on a real SQLite store: one run per job, curves, lineage, registry and the gate."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tether.config import validate_job
from tether.run import run_training

from .helpers import make_tiny_job

pytestmark = [pytest.mark.slow]


def job(model_dir, easy_csv, tmp, db, **over) -> dict:
    """The tiny job tracked in ``db``; ``over`` as section__field=value."""
    updates: dict = {
        "name": "tracked",
        "optim": {"new_param_lr_scale": 3.0},
        "train": {"eval_interval": 10},
        "tracking": {"uri": f"sqlite:///{db}", "experiment": "tests", "registered_model": "toy"},
    }
    for key, value in over.items():
        section, field = key.split("__")
        updates.setdefault(section, {})[field] = value
    return make_tiny_job(model_dir, easy_csv, tmp / "runs", **updates)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    return tmp, tmp / "mlflow.db"


@pytest.fixture(scope="module")
def good_run(ray_cluster, tiny_model_dir, easy_csv, store):
    """A 2-worker run, tracked and registered (the first version becomes champion)."""
    tmp, db = store
    spec = validate_job(job(tiny_model_dir, easy_csv, tmp, db))
    return run_training(spec, register=True)


def client(db):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def test_a_train_run_is_one_mlflow_run_with_curves_params_spec_and_data(good_run, store):
    """Exactly one run (not one per worker) holds params, ≥2 points per curve, job.yaml, datasets."""
    _, db = store
    c = client(db)
    exp = c.get_experiment_by_name("tests")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == good_run.summary["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.lambda"] == "0.01"
    assert run.data.params["scaling.num_workers"] == "2"
    for key in (
        "train/fine_loss",
        "train/anchor_loss",
        "train/drift_l2",
        "eval/accuracy",
        "train/samples_per_s",
        "drift/bert.encoder.layer.0",
    ):
        history = c.get_metric_history(run.info.run_id, key)
        assert len(history) >= 2, key
        assert sorted(m.step for m in history) == [
            m.step for m in sorted(history, key=lambda m: m.step)
        ]
    last_acc = max(c.get_metric_history(run.info.run_id, "eval/accuracy"), key=lambda m: m.step)
    assert last_acc.value == pytest.approx(good_run.summary["metrics"]["eval/accuracy"])
    assert "job.yaml" in {a.path for a in c.list_artifacts(run.info.run_id)}
    logged = c.search_logged_models(experiment_ids=[exp.experiment_id])
    assert [m.source_run_id for m in logged] == [run.info.run_id]
    assert good_run.summary["model_uri"] == logged[0].model_uri
    contexts = {
        tag.value
        for d in run.inputs.dataset_inputs
        for tag in d.tags
        if tag.key == "mlflow.data.context"
    }
    assert contexts == {"training", "validation"}
    assert run.data.tags["tether.theta_star_sha256"]
    assert run.data.tags["tether.data_fingerprint"] == good_run.summary["data"]["fingerprint"]
    assert good_run.summary["tracking"] == "ok"


def test_champion_loads_with_pyfunc_and_predicts_like_the_model_dir(
    good_run, store, easy_csv, monkeypatch
):
    """models:/toy@champion loads with mlflow.pyfunc and agrees with the exported folder."""
    import mlflow

    from tether.serving.model import load_served_model

    _, db = store
    assert good_run.summary["registry"]["promoted"] is True
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")  # restored after the test
    model = mlflow.pyfunc.load_model("models:/toy@champion")
    texts = list(pd.read_csv(easy_csv["validation"]).text[:20])
    got = model.predict(pd.DataFrame({"text": texts}))
    want = load_served_model(__import__("pathlib").Path(good_run.summary["model_dir"])).classify(
        texts
    )
    assert list(got.label) == [p.label for p in want]
    assert got["p_positive"].tolist() == pytest.approx(
        [p.probabilities["positive"] for p in want], abs=1e-5
    )


def test_a_worse_model_becomes_challenger_and_champion_stays(
    good_run, tiny_model_dir, easy_csv, store, capsys
):
    """The gate: a worse second model gets `challenger`, `champion` does not move."""
    tmp, db = store
    worse = validate_job(
        job(
            tiny_model_dir,
            easy_csv,
            tmp,
            db,
            optim__lr=1e-7,
            train__max_steps=2,
            scaling__num_workers=0,
        )
    )
    outcome = run_training(worse, register=True)
    reg = outcome.summary["registry"]
    assert reg["promoted"] is False
    assert reg["champion_value"] == pytest.approx(good_run.summary["metrics"]["eval/accuracy"])
    c = client(db)
    assert (
        str(c.get_model_version_by_alias("toy", "champion").version)
        == good_run.summary["registry"]["version"]
    )
    assert str(c.get_model_version_by_alias("toy", "challenger").version) == reg["version"]
    assert "champion stays" in capsys.readouterr().out
    description = c.get_model_version("toy", reg["version"]).description
    assert "does not beat" in description and f"{reg['champion_value']:.4f}" in description


def test_tracking_outage_degrades_but_training_finishes(tiny_model_dir, easy_csv, tmp_path):
    """If workers cannot reach the store, the run still completes and says tracking is degraded."""
    db = tmp_path / "ok.db"
    spec = validate_job(
        job(
            tiny_model_dir,
            easy_csv,
            tmp_path,
            db,
            train__max_steps=4,
            train__eval_interval=2,
            scaling__num_workers=0,
        )
    )
    outcome = run_training(
        spec,
        inputs_override={
            "tracking": {"uri": f"sqlite:///{tmp_path}/missing/dir/x.db", "run_id": "0" * 32}
        },
    )
    assert outcome.summary["tracking"] == "degraded"
    assert outcome.summary["step"] == 4
    assert (tmp_path / "runs").exists() and outcome.summary["model_dir"]


def test_models_cli_lists_versions_with_aliases(good_run, store, capsys):
    """`tether models list` shows each version's accuracy and aliases."""
    from tether.cli import main

    _, db = store
    assert main(["models", "--tracking-uri", f"sqlite:///{db}", "list", "toy"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "champion" in out and "v1" in out


def registry_client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'gate.db'}")


def new_version(client, name: str, value: float, **tags) -> str:
    from tether.registry import register_version

    base = {
        "eval/accuracy": value,
        "tether.metric": "eval/accuracy",
        "validation_fingerprint": "fp",
        "tether.task": "sequence-classification",
        "tether.labels_sha256": "ab",
    }
    return register_version(client, f"file:///tmp/{name}-{value}", name, None, base | tags)


def test_concurrent_promotions_settle_on_the_better_challenger(tmp_path):
    """A (0.85) and B (0.83) gate at once against a 0.80 champion; B's alias write lands last;
    the champion still ends as A."""
    import threading

    from tether.registry import CHAMPION, gate_champion

    client = registry_client(tmp_path)
    champion = new_version(client, "race", 0.80)
    client.set_registered_model_alias("race", CHAMPION, champion)
    a, b = new_version(client, "race", 0.85), new_version(client, "race", 0.83)
    both_read = threading.Barrier(2)

    class Interleaved:
        """Both read the champion before either writes; B's first champion write lands last."""

        def __init__(self, version, delay):
            self.version, self.delay, self.first = version, delay, True

        def __getattr__(self, name):
            return getattr(client, name)

        def get_model_version_by_alias(self, name, alias):
            mv = client.get_model_version_by_alias(name, alias)
            if self.first and alias == CHAMPION:
                both_read.wait(timeout=30)
            return mv

        def set_registered_model_alias(self, name, alias, version):
            if alias == CHAMPION and self.first:
                self.first = False
                import time

                time.sleep(self.delay)
            client.set_registered_model_alias(name, alias, version)

    errors = []

    def gate(version, delay, value):
        try:
            gate_champion(
                Interleaved(version, delay), "race", version, "eval/accuracy", "max", value, "fp"
            )
        except Exception as e:  # both gates must finish: a lost alias write is no excuse
            errors.append(e)

    threads = [
        threading.Thread(target=gate, args=(a, 0.0, 0.85)),
        threading.Thread(target=gate, args=(b, 1.0, 0.83)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert str(client.get_model_version_by_alias("race", CHAMPION).version) == a


def test_a_champion_of_another_task_is_not_gated_against(tmp_path):
    """Registering a NER model under a classifier's name: challenger, champion untouched."""
    from tether.registry import CHAMPION, NotComparable, gate_champion

    client = registry_client(tmp_path)
    champion = new_version(client, "shared", 0.80)
    client.set_registered_model_alias("shared", CHAMPION, champion)
    ner = new_version(client, "shared", 0.90, **{"tether.task": "token-classification"})
    with pytest.raises(NotComparable, match="cannot be compared"):
        gate_champion(client, "shared", ner, "eval/accuracy", "max", 0.90, "fp")
    assert str(client.get_model_version_by_alias("shared", CHAMPION).version) == champion


def test_registering_needs_a_model_name_other_than_the_default(tiny_job):
    """The default job name 'job' is shared by every unnamed job: --register refuses it."""
    from tether.errors import SpecError

    spec = validate_job({k: v for k, v in tiny_job.items() if k != "name"})
    with pytest.raises(SpecError, match="tracking.registered_model"):
        run_training(spec, register=True)


def test_logged_models_carry_tether_as_code_not_a_public_package_name(good_run, store):
    """The logged model's requirements name no 'tether' package; its code ships with it."""
    import mlflow
    import yaml

    _, db = store
    uri = good_run.summary["model_uri"]
    from tether.tracking import active_tracking_uri

    with active_tracking_uri(f"sqlite:///{db}"):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    requirements = (local / "requirements.txt").read_text().split()
    assert not [r for r in requirements if r.split("=")[0].split("@")[0].strip() == "tether"]
    assert all("==" in r for r in requirements if r and not r.startswith("-"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "code" in mlmodel["flavors"]["python_function"]
    assert (local / "code" / "tether" / "tasks" / "__init__.py").is_file()


def test_an_alias_write_that_loses_a_race_is_retried(tmp_path):
    """MLflow's SQL store sets an alias by read-then-insert: a writer that loses the race gets
    a unique-key violation, and set_alias retries it onto the update path."""
    from mlflow.exceptions import MlflowException

    from tether.registry import CHAMPION, set_alias

    client = registry_client(tmp_path)
    v1, v2 = new_version(client, "busy", 0.80), new_version(client, "busy", 0.90)
    calls = []

    class LosesOnce:
        def __getattr__(self, name):
            return getattr(client, name)

        def set_registered_model_alias(self, name, alias, version):
            calls.append(version)
            if len(calls) == 1:  # the other writer inserted the row between our read and write
                client.set_registered_model_alias(name, alias, v1)
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: ...")
            client.set_registered_model_alias(name, alias, version)

    set_alias(LosesOnce(), "busy", CHAMPION, v2)
    assert calls == [v2, v2]
    assert str(client.get_model_version_by_alias("busy", CHAMPION).version) == v2
    with pytest.raises(MlflowException):  # a real error is not retried into silence
        set_alias(client, "busy", CHAMPION, "99")


def test_the_slower_of_two_concurrent_winners_says_it_was_overtaken(tmp_path):
    """B (0.83) beat the 0.80 champion it read, but A (0.85) holds the alias: B's decision
    says promoted=False and names A."""
    from tether.registry import CHAMPION, PROMOTABLE, gate_champion

    client = registry_client(tmp_path)
    champion = new_version(client, "pair", 0.80)
    client.set_registered_model_alias("pair", CHAMPION, champion)
    a, b = new_version(client, "pair", 0.85), new_version(client, "pair", 0.83)
    client.set_model_version_tag("pair", a, PROMOTABLE, "true")  # A won its gate a moment ago

    class StaleRead:  # B read the champion before A moved it
        def __getattr__(self, name):
            return getattr(client, name)

        def get_model_version_by_alias(self, name, alias):
            return client.get_model_version(name, champion)

    decision = gate_champion(StaleRead(), "pair", b, "eval/accuracy", "max", 0.83, "fp")
    assert (decision.promoted, decision.overtaken_by) == (False, a)
    assert str(client.get_model_version_by_alias("pair", CHAMPION).version) == a
    assert f"champion is v{a}" in client.get_model_version("pair", b).tags["tether.gate"]


def test_a_rollback_by_hand_is_not_undone_by_the_next_gate(tmp_path):
    """v2 (0.90) beat v1 and was rolled back by hand to v1; v3 (0.85) then beats v1: the
    champion becomes v3, not v2 again."""
    from tether.registry import CHAMPION, gate_champion, promote_by_hand

    client = registry_client(tmp_path)
    v1 = new_version(client, "rb", 0.80)
    gate_champion(client, "rb", v1, "eval/accuracy", "max", 0.80, "fp")
    v2 = new_version(client, "rb", 0.90)
    assert gate_champion(client, "rb", v2, "eval/accuracy", "max", 0.90, "fp").promoted
    promote_by_hand(client, "rb", CHAMPION, v1)
    v3 = new_version(client, "rb", 0.85)
    assert gate_champion(client, "rb", v3, "eval/accuracy", "max", 0.85, "fp").promoted
    assert str(client.get_model_version_by_alias("rb", CHAMPION).version) == v3


def test_a_diverged_first_version_is_registered_but_never_champion(tmp_path):
    """A NaN metric (a diverged run) with no champion yet: challenger, no champion, and the
    decision says why; the next finite version becomes champion."""
    from mlflow.exceptions import MlflowException

    from tether.registry import CHALLENGER, CHAMPION, gate_champion

    client = registry_client(tmp_path)
    nan = float("nan")
    v1 = new_version(client, "nan", nan)
    decision = gate_champion(client, "nan", v1, "eval/accuracy", "max", nan, "fp")
    assert not decision.promoted
    assert "not a finite number" in client.get_model_version("nan", v1).tags["tether.gate"]
    assert str(client.get_model_version_by_alias("nan", CHALLENGER).version) == v1
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("nan", CHAMPION)
    v2 = new_version(client, "nan", 0.6)
    assert gate_champion(client, "nan", v2, "eval/accuracy", "max", 0.6, "fp").promoted
    assert str(client.get_model_version_by_alias("nan", CHAMPION).version) == v2


@pytest.mark.parametrize(
    "mode,bad", [("max", float("nan")), ("max", float("inf")), ("min", float("-inf"))]
)
def test_a_non_finite_champion_loses_to_any_finite_challenger(tmp_path, mode, bad):
    """A champion recorded with NaN (or an infinity in the winning direction) is replaced by the next finite
    version, however low its value; a non-finite challenger does not replace a finite one."""
    from tether.registry import CHAMPION, PROMOTABLE, gate_champion

    client = registry_client(tmp_path)
    old = new_version(client, "stuck", bad)
    client.set_registered_model_alias("stuck", CHAMPION, old)
    client.set_model_version_tag("stuck", old, PROMOTABLE, "true")  # promoted by an old gate
    low = new_version(client, "stuck", 0.1)
    decision = gate_champion(client, "stuck", low, "eval/accuracy", mode, 0.1, "fp")
    assert decision.promoted, decision.describe()
    assert str(client.get_model_version_by_alias("stuck", CHAMPION).version) == low
    worse = new_version(client, "stuck", float("nan"))
    nan = float("nan")
    assert not gate_champion(client, "stuck", worse, "eval/accuracy", mode, nan, "fp").promoted
    assert str(client.get_model_version_by_alias("stuck", CHAMPION).version) == low


def test_a_sweep_whose_registration_fails_still_finishes_and_says_why(
    tiny_model_dir, easy_csv, tmp_path, monkeypatch
):
    """The trials are done when the registry fails: summary.json is written with the error, the
    MLflow parent run ends FINISHED, and nothing raises (it used to end in a KeyError)."""
    import json

    import tether.sweep.tracking as sweep_tracking
    from tether.sweep import open_sweep
    from tether.sweep.runner import SweepOutcome

    db = tmp_path / "sweep.db"
    spec = validate_job(job(tiny_model_dir, easy_csv, tmp_path, db) | {"tune": {"name": "fails"}})
    sweep = open_sweep(spec)
    best = {"trial_id": "t1", "metrics": {"eval/accuracy": 0.9}, "config": {}}
    monkeypatch.setattr(
        sweep_tracking,
        "run_sweep",
        lambda sweep, **kw: SweepOutcome(summary={"best": best, "trials": 1}),
    )

    def store_down(*args, **kwargs):
        raise ConnectionError("registry store down")

    monkeypatch.setattr(sweep_tracking, "register_best", store_down)
    outcome = sweep_tracking.run_tracked_sweep(sweep)
    assert outcome.summary["registry"] == {"error": "ConnectionError: registry store down"}
    assert "model_uri" not in outcome.summary
    on_disk = json.loads((sweep.dir / "summary.json").read_text())
    assert on_disk["registry"]["error"].endswith("registry store down")
    parent = client(db).get_run(outcome.summary["parent_run_id"])
    assert parent.info.status == "FINISHED"


def test_a_champion_is_rescored_on_this_jobs_columns_and_its_download_removed(
    good_run, tiny_model_dir, easy_csv, store, tmp_path, monkeypatch
):
    """Gating on other data re-scores the champion with the challenger job's columns (here the
    text sits in a 'sentence' column) and deletes the downloaded copy afterwards."""
    import tempfile

    from tether.run import score_registered_model

    tmp, db = store
    renamed = tmp / "renamed-validation.csv"
    pd.read_csv(easy_csv["validation"]).rename(columns={"text": "sentence"}).to_csv(
        renamed, index=False
    )
    spec = validate_job(
        job(tiny_model_dir, easy_csv, tmp, db)
        | {"data": {"train": str(renamed), "validation": str(renamed), "text_column": "sentence"}}
    )
    private = tmp_path / "tmp"  # downloads land here, apart from anything else's
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    metrics = score_registered_model(spec, "models:/toy@champion", f"sqlite:///{db}")
    assert metrics["eval/accuracy"] == pytest.approx(good_run.summary["metrics"]["eval/accuracy"])
    assert list(private.glob("tether-model-*")) == []
