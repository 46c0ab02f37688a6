"""`tether interpolate`: θ(α) = θ* + α(θ − θ*) scored along the line, the best α exported and
registered; no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tether.config import validate_job
from tether.run import run_training

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
