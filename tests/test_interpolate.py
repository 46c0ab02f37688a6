"""`tether interpolate`: θ(α) = θ* + α(θ − θ*) scored along the line, the best α exported and
registered; no training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tether.config import validate_job
from tether.run import run_training

from .helpers import write_csv
from .test_predict_adapters import three_way_rows
from .test_runs import local_job

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, easy_csv, tmp_path_factory):
    """A finished, tracked local run at λ = 0 (so it drifts as far as it likes)."""
    root = tmp_path_factory.mktemp("interp")
    db = root / "mlflow.db"
    job = local_job(tiny_model_dir, easy_csv, root, db, objective={"lambda": 0.0})
    job["name"] = "interp"
    job["tracking"]["registered_model"] = "interp"
    return job, db, run_training(validate_job(job))


def test_the_curve_runs_from_theta_star_to_the_run_and_the_best_alpha_is_registered(
    tuned, tiny_model_dir, tmp_path
):
    """α = 1 scores exactly as the run reported; α = 0 as θ* with the trained head (scored here
    independently); every α is on the curve; the best α's folder is exported and registered."""
    from transformers import AutoModelForSequenceClassification

    from tether.cli import main
    from tether.models import load_tokenizer
    from tether.run import prepare_run_data
    from tether.train.loop import evaluate
    from tether.train.strategy import DataParallel

    job, db, outcome = tuned
    run_dir = Path(outcome.summary["run_dir"])
    code = main(
        [
            "interpolate",
            str(run_dir),
            "--alphas",
            "1,0,0.5",
            "--register",
            "--tracking-uri",
            f"sqlite:///{db}",
        ]
    )
    assert code == 0
    summary = json.loads((run_dir / "interpolation" / "summary.json").read_text())
    assert [row["alpha"] for row in summary["curve"]] == [0.0, 0.5, 1.0]
    at = {row["alpha"]: row for row in summary["curve"]}
    run_metrics = outcome.summary["metrics"]
    assert at[1.0]["eval/accuracy"] == run_metrics["eval/accuracy"]
    assert at[1.0]["eval/loss"] == pytest.approx(run_metrics["eval/loss"], rel=1e-5)

    spec = validate_job(job)
    task, data = prepare_run_data(spec)
    theta_star = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    trained = AutoModelForSequenceClassification.from_pretrained(outcome.summary["model_dir"])
    theta_star.classifier.load_state_dict(trained.classifier.state_dict())
    want = evaluate(
        theta_star,
        data.validation,
        task,
        data.pad_id,
        spec,
        DataParallel(0, 1, torch.device("cpu")),
    )
    assert at[0.0]["eval/accuracy"] == want["eval/accuracy"]
    assert at[0.0]["eval/loss"] == pytest.approx(want["eval/loss"], rel=1e-5)
    assert at[0.0]["eval/loss"] != pytest.approx(at[1.0]["eval/loss"], rel=1e-3)  # the line moved

    best = summary["best_alpha"]
    exported = Path(summary["model_dir"])
    card = json.loads((exported / "tether.json").read_text())
    assert card["interpolation"]["alpha"] == best
    assert load_tokenizer(str(exported)) is not None
    assert (run_dir / "interpolation" / "curve.png").is_file()
    registry = summary["registry"]
    assert registry["name"] == "interp" and registry["model_uri"].startswith("models:/interp/")


def test_alphas_outside_the_line_are_refused(tuned, capsys):
    from tether.cli import main

    _, _, outcome = tuned
    assert main(["interpolate", outcome.summary["run_dir"], "--alphas", "0,1.5"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


def pretrained_weights(model_dir) -> dict[str, torch.Tensor]:
    """The encoder's weights of a sequence classifier (everything but its head)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return {n: p.detach() for n, p in model.named_parameters() if not n.startswith("classifier.")}


def test_a_base_that_is_not_the_runs_theta_star_is_refused(tuned, tmp_path, capsys):
    """A card recording another θ* (the base changed since the run) is refused, naming both
    hashes and what to do, before anything is written."""
    from tether.cli import main

    _, _, outcome = tuned
    source = tmp_path / "model"
    shutil.copytree(outcome.summary["model_dir"], source)
    card = json.loads((source / "tether.json").read_text())
    card["objective"]["theta_star_sha256"] = "0" * 64
    (source / "tether.json").write_text(json.dumps(card))
    assert main(["interpolate", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "0" * 64 in err and outcome.summary["theta_star_sha256"] in err
    assert "model.revision" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def kappa_bf16(tiny_model_dir, easy_csv, tmp_path_factory):
    """A registered run at κ = 1 (λ derived from its schedule) with θ* and θ₀ in bf16."""
    root = tmp_path_factory.mktemp("interp-kappa")
    db = root / "mlflow.db"
    job = local_job(tiny_model_dir, easy_csv, root, db)
    job["objective"] = {"strength": 1.0, "mode": "decoupled", "anchor_dtype": "bfloat16"}
    job["name"] = job["tracking"]["registered_model"] = "kappa"
    return db, run_training(validate_job(job), register=True)


def test_a_registered_bf16_kappa_run_goes_back_to_its_rounded_theta_star_and_records_its_lambda(
    kappa_bf16, tiny_model_dir, tmp_path
):
    """From models:/kappa@champion: α = 0's pretrained weights are θ* rounded to bf16 (the run's
    θ₀); the registered version is tagged with the λ the run derived from κ, and names its
    source by version, not by the alias."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from tether.cli import main

    db, outcome = kappa_bf16
    uri = f"sqlite:///{db}"
    out = tmp_path / "line"
    args = ["interpolate", "models:/kappa@champion", "--alphas", "0", "--out", str(out)]
    assert main([*args, "--register", "--tracking-uri", uri]) == 0
    exported = load_file(out / "model" / "model.safetensors")
    theta_star = pretrained_weights(tiny_model_dir)
    assert any(not torch.equal(t, t.bfloat16().float()) for t in theta_star.values())
    for name, t in theta_star.items():
        assert torch.equal(exported[name], t.bfloat16().float()), name

    summary = json.loads((out / "summary.json").read_text())
    card = json.loads((Path(outcome.summary["model_dir"]) / "tether.json").read_text())
    trained_lambda = card["objective"]["lambda"]
    assert trained_lambda != pytest.approx(0.01)  # λ's default: what a κ job reloads with
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version("kappa", summary["registry"]["version"])
    assert float(version.tags["lambda"]) == trained_lambda
    run_tags = client.get_run(summary["mlflow_run_id"]).data.tags
    assert run_tags["tether.interpolation_of"] == "models:/kappa/1"


def test_a_lora_model_folder_interpolates_beside_itself_into_a_plain_model(
    tiny_model_dir, easy_csv, tmp_path
):
    """A LoRA run's model folder as the source: the curve and model go beside the folder, not
    into it; α = 0 is the base with the trained head; the export's card keeps the adapter's
    settings under interpolation, not as an adapter (its folder holds merged weights only)."""
    from safetensors.torch import load_file

    from tether.cli import main

    job = local_job(tiny_model_dir, easy_csv, tmp_path)
    job["model"]["adapter"] = {"r": 4, "alpha": 8.0}
    model_dir = Path(run_training(validate_job(job)).summary["model_dir"])
    inside = sorted(p.name for p in model_dir.iterdir())
    assert main(["interpolate", str(model_dir), "--alphas", "0"]) == 0
    assert sorted(p.name for p in model_dir.iterdir()) == inside
    exported_dir = model_dir.with_name(f"{model_dir.name}-interpolation") / "model"
    exported = load_file(exported_dir / "model.safetensors")
    for name, t in pretrained_weights(tiny_model_dir).items():
        assert torch.equal(exported[name], t), name
    trained = load_file(model_dir / "model.safetensors")
    assert torch.equal(exported["classifier.weight"], trained["classifier.weight"])
    card = json.loads((exported_dir / "tether.json").read_text())
    assert card["objective"]["adapter"] is None and not (exported_dir / "adapter").exists()
    assert card["interpolation"]["source_adapter"]["r"] == 4


def test_a_cascade_onto_more_labels_goes_back_to_its_base_with_its_new_head(tuned, tmp_path):
    """Stage 2 trains three labels on the 2-label run's model (a new head): interpolation
    builds that base with a fresh head as training did, and α = 0 is stage 1's encoder with
    stage 2's trained head."""
    from safetensors.torch import load_file

    from tether.cli import main

    _, _, first = tuned
    stage1 = Path(first.summary["model_dir"])
    three = {
        split: write_csv(tmp_path / f"{split}3.csv", three_way_rows(n, seed))
        for split, n, seed in (("train", 120, 3), ("validation", 30, 4))
    }
    job = local_job(stage1, three, tmp_path, train={"max_steps": 5, "eval_interval": 5})
    job["model"]["label_names"] = ["negative", "positive", "neutral"]
    run_dir = Path(run_training(validate_job(job)).summary["run_dir"])
    assert main(["interpolate", str(run_dir), "--alphas", "0"]) == 0
    exported = load_file(run_dir / "interpolation" / "model" / "model.safetensors")
    for name, t in load_file(stage1 / "model.safetensors").items():
        if not name.startswith("classifier."):
            assert torch.equal(exported[name], t), name
    trained = load_file(run_dir / "model" / "model.safetensors")
    assert exported["classifier.weight"].shape == (3, 32)
    assert torch.equal(exported["classifier.weight"], trained["classifier.weight"])
