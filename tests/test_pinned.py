"""Pinned numbers: the tiny job's curve, recorded before the Task/loop refactor.

Recorded on the pre-refactor loop (commit 591da59, `tether.loop`) with the tiny BERT and toy
data of conftest, in-process (num_workers=0), 1 epoch, an evaluation every 5 steps. The loss
is now normalised per labelled unit (per example here) instead of per micro-batch: with equal
batch sizes, as here, that is the same number, so the curve must not move.
"""

from __future__ import annotations

import json

import pytest

from tether.config import validate_job
from tether.run import run_training
from tether.train.checkpoint import checkpoints

from .helpers import make_tiny_job

FINE_LOSS = [
    0.7647892236709595,
    0.7294029831886292,
    0.6634760022163391,
    0.718566358089447,
    0.6608897686004639,
]
EVAL_LOSS = [
    0.6816492363958075,
    0.6821715099976795,
    0.675709866061069,
    0.6194229125976562,
    0.6066725324876238,
]
ACCURACY = [
    0.594059405940594,
    0.5148514851485149,
    0.5148514851485149,
    0.7128712871287128,
    0.693069306930693,
]


def test_tiny_job_curve_is_unchanged_by_the_refactor(tiny_model_dir, easy_csv, tmp_path):
    """Fine loss, eval loss and accuracy at steps 5..25 equal the pre-refactor loop's."""
    job = make_tiny_job(
        tiny_model_dir,
        easy_csv,
        tmp_path / "runs",
        scaling={"num_workers": 0},
        train={"epochs": 1, "eval_interval": 5, "keep_checkpoints": 10},
        tracking={"enabled": False},
        storage={"run_name": "pinned"},
    )
    outcome = run_training(validate_job(job))
    states = [
        json.loads((c / "trainer_state.json").read_text())["metrics"]
        for c in checkpoints(outcome.summary["run_dir"])
    ]
    assert [m["step"] for m in states] == [5, 10, 15, 20, 25]
    assert [m["train/fine_loss"] for m in states] == pytest.approx(FINE_LOSS, rel=1e-4)
    assert [m["eval/loss"] for m in states] == pytest.approx(EVAL_LOSS, rel=1e-4)
    assert [m["eval/accuracy"] for m in states] == pytest.approx(ACCURACY, abs=1e-9)
