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


def test_submit_refuses_bad_references_before_any_upload(tmp_path, capsys):
    """`tether submit` checks what needs no local file (here an unknown synthetic dataset and
    packaged model): exit 2 naming both, and no cluster is contacted (port 9 is closed)."""
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: x\nmodel: {name: 'packaged:gpt-17'}\ndata: {train: 'synthetic:sentimnt'}\n"
    )
    argv = ["submit", str(job), "--working-dir", str(tmp_path), "--address", "http://127.0.0.1:9"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.name: unknown packaged model" in err
    assert "data.train: unknown synthetic dataset" in err


def test_the_upload_leaves_out_env_files_and_nested_cloud_credentials(tmp_path):
    """.envrc and .env.local are `.env*`; a gcloud folder below the root is withheld too (a
    gitignore pattern with a middle slash would only match at the root)."""
    from tether.submit import upload_contents

    secrets = [".envrc", "sub/.env.local", "sub/.config/gcloud/credentials.db", ".env"]
    for name in [*secrets, "train.csv", "sub/environment.yml"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    files, _, withheld = upload_contents(tmp_path)
    assert sorted(withheld) == sorted(secrets)
    assert files == 2


def test_an_unreachable_hub_dataset_exits_2_without_a_traceback(tmp_path, capsys, monkeypatch):
    """A hub id that cannot be fetched (tests run offline) is a one-line exit-2 error naming
    data.train; training is never reached."""
    import ray

    import tether.run

    def never(*args, **kwargs):
        raise AssertionError("training must not start")

    monkeypatch.setattr(tether.run, "run_training", never)
    job = tmp_path / "job.yaml"
    job.write_text(f"name: x\ndata: {{train: someone/reviews}}\nstorage: {{path: {tmp_path}}}\n")
    assert main(["train", str(job)]) == 2
    err = capsys.readouterr().err
    assert "data.train: cannot load hub dataset 'someone/reviews'" in err
    assert "Traceback" not in err
    assert not ray.is_initialized()
