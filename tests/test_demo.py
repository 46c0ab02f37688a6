"""End to end: `tether demo --quick --exit` sweeps, registers, serves and answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tether.cli import main

from .helpers import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_quick_demo_runs_search_register_serve_and_answers(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    """The README's main command, shrunk: sweep with a λ=0 arm → champion → live answers."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the embedded MLflow store lands in ./mlflow.db
    summary_path = tmp_path / "demo.json"
    code = main(
        [
            "demo",
            "--job",
            str(REPO / "jobs" / "demo.yaml"),
            "--quick",
            "--exit",
            "--port",
            str(free_port()),
            "--summary",
            str(summary_path),
            f"storage.path={tmp_path / 'runs'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    summary = json.loads(summary_path.read_text())
    # the sweep: anchored trials and the λ=0 control arm, the best one chosen
    arms = {r["arm"] for r in json.loads(json.dumps(summary)).get("rows", [])} or None
    assert summary["trials"] == 3 and summary["baseline_best"]["config"]["objective.lambda"] == 0
    assert arms is None or arms == {"anchored", "baseline"}
    # registered and promoted: the first version of a fresh store becomes champion
    assert summary.get("tracking") == "ok" and summary.get("registry"), out[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("demo", "champion")
    assert summary["registry"]["version"] == str(champion.version)
    # the parent run has one child per trial
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 3
    # the live endpoint answered every sample text with a label
    predictions = summary["sample_predictions"]
    assert len(predictions) == 4
    assert all(p["label"] in ("negative", "positive") for p in predictions)
    for line in ("best trial:", "best λ=0", "MLflow UI:", "endpoint: curl"):
        assert line in out
    # progress inside each trial, one line per evaluation with step/total and an ETA: more
    # lines than trials (each trial evaluates more than once)
    progress = re.findall(r"trial #\d+ .*: step \d+/\d+ epoch [\d.]+ .*s left\)", out)
    assert len(progress) > summary["trials"], out[-3000:]


def test_quick_llm_demo_sweeps_registers_and_chats(
    ray_cluster, tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    """`tether demo --llm --quick --exit` on the tiny Llama: a chat SFT sweep with its λ = 0
    arm, the champion behind the OpenAI routes, answers printed beside θ*'s."""
    monkeypatch.chdir(tmp_path)
    summary_path = tmp_path / "demo.json"
    code = main(
        [
            "demo",
            "--llm",
            "--job",
            str(REPO / "jobs" / "chat_sft.yaml"),
            "--quick",
            "--exit",
            "--port",
            str(free_port()),
            "--summary",
            str(summary_path),
            f"model.name={tiny_llama_dir}",
            "eval.forgetting_probe=none",
            "scaling.cpus_per_worker=1",
            f"storage.path={tmp_path / 'runs'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["metric"] == "eval/loss" and summary["mode"] == "min"
    assert summary["baseline_best"]["config"]["objective.lambda"] == 0
    assert summary["registry"]["promoted"] is True
    completions = summary["sample_completions"]
    assert len(completions) == 4 and all("theta_star" in c for c in completions)
    for line in ("fine-tuned:", "θ*:", "openai: from openai import OpenAI", "chat/completions"):
        assert line in out
