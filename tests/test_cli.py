"""The command line: invalid specs fail before any Ray work; the packaged model trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tether.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_invalid_spec_exits_2_naming_every_problem_before_ray_starts(capsys):
    """`tether train` with a bad spec lists each problem, exits 2, and never starts Ray."""
    import ray

    code = main(
        [
            "train",
            str(REPO / "jobs" / "demo.yaml"),
            "objective.lambda=-0.5",
            "scaling.num_workerz=2",
            "data.train=/nonexistent/train.csv",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "objective.lambda" in err and "-0.5" in err
    assert "scaling.num_workerz: unknown key" in err
    assert "data.train: file not found" in err
    assert "nothing was started" in err
    assert not ray.is_initialized()


def test_validate_prints_the_resolved_spec(capsys):
    """`tether validate` prints the spec with overrides applied and paths resolved."""
    code = main(["validate", str(REPO / "jobs" / "demo.yaml"), "objective.lambda=0.2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "lambda: 0.2" in out and "name: demo" in out


def test_console_script_reports_bad_override_syntax():
    """The installed `tether` entry point exits non-zero with a one-line reason."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether.cli",
            "validate",
            str(REPO / "jobs" / "demo.yaml"),
            "lambda",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "platform"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "expected key=value" in proc.stderr


@pytest.mark.slow
def test_packaged_minilm_trains_a_few_steps_in_process(tmp_path):
    """The real packaged MiniLM loads, takes optimizer steps on the demo job, and exports."""
    summary = tmp_path / "summary.json"
    code = main(
        [
            "train",
            str(REPO / "jobs" / "demo.yaml"),
            "scaling.num_workers=0",
            "train.max_steps=3",
            "train.eval_interval=3",
            "train.batch_size=8",
            "data.max_validation_samples=64",
            f"storage.path={tmp_path / 'runs'}",
            "--summary",
            str(summary),
        ]
    )
    assert code == 0
    result = json.loads(summary.read_text())
    assert result["step"] == 3
    assert result["metrics"]["eval/num_examples"] == 64
    assert result["metrics"]["train/drift_l2"] > 0
    card = json.loads((Path(result["model_dir"]) / "tether.json").read_text())
    assert card["objective"]["base_model"] == "packaged:all-MiniLM-L6-v2"
    assert card["objective"]["num_anchored_tensors"] > 90  # every pretrained tensor, no head
