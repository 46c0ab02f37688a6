"""The benchmark plumbing that decides what docs/benchmarks.md says (not the measurements).

The scripts live in benchmarks/ and import each other as top-level modules, as they do when run
as ``python benchmarks/<name>.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO

BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402


def test_quick_runs_never_overwrite_the_real_results():
    args = argparse.Namespace(quick=True, out=None, steps=30)
    _common.apply_quick(args, {"steps": 5}, "thing")
    assert args.steps == 5
    assert args.out == BENCH / "results" / "thing_quick.json"
    real = argparse.Namespace(quick=False, out=None, steps=30)
    _common.apply_quick(real, {"steps": 5}, "thing")
    assert (real.steps, real.out.name) == (30, "thing.json")


def test_write_json_is_atomic_and_handles_numpy(tmp_path):
    import numpy as np

    out = tmp_path / "r.json"
    _common.write_json(out, {"x": np.float32(1.5), "n": np.int64(3), "p": Path("/a")})
    assert json.loads(out.read_text()) == {"x": 1.5, "n": 3, "p": "/a"}
    assert not out.with_suffix(".json.tmp").exists()
    info = _common.machine_info(torch_threads=2)
    assert info["torch_threads"] == 2 and info["torch"].startswith("2.")


def test_full_data_arm_is_chosen_on_validation_not_dev():
    quality = pytest.importorskip("anchoring_quality")

    def cell(val: float, dev: float) -> dict:
        return {"selected": {"val_accuracy": val, "lambda": 0.1, "lr": 1e-4}, "dev_accuracy": dev}

    # coupled wins on validation, decoupled on dev: the dev set must not decide
    by_seed = {
        s: {"plain": cell(0.70, 0.80), "coupled": cell(0.75, 0.70), "decoupled": cell(0.60, 0.90)}
        for s in (0, 1)
    }
    cells = {100: {0: {a: cell(0.9, 0.9) for a in by_seed[0]}}, 2000: by_seed}
    assert quality.best_arm(cells, ["plain", "coupled", "decoupled"]) == "coupled"
    tie = {2000: {0: {"plain": cell(0.7, 0.5), "coupled": cell(0.7, 0.9)}}}
    assert quality.best_arm(tie, ["plain", "coupled"]) == "plain"  # the anchor must earn it


def test_report_summarises_full_quick_missing_and_broken_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "hpo_efficiency_quick.json").write_text(
        json.dumps(
            {
                "machine": {"cpu_count": 2},
                "verdict": {"accuracy_gap_points": 0.0, "compute_fraction": 0.7, "pass": False},
            }
        )
    )
    (results / "throughput_vs_hf.json").write_text('{"arms": {')  # a run killed mid-write
    modes = {
        "lambda0": {},
        "coupled": {"target_pct": 3.0, "overhead_pct": 1.8, "pass_full_step": True},
        "decoupled": {"target_pct": 2.0, "overhead_pct": 2.6, "pass_full_step": False},
    }
    (results / "anchor_overhead.json").write_text(json.dumps({"modes": modes}))
    out = tmp_path / "docs" / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--results", str(results), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    glance = page.split("## At a glance")[1].split("\n## ")[0]
    rows = [line for line in glance.splitlines() if line.startswith("| ") and "---" not in line]
    by_title = {}
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        by_title.setdefault(cells[0], []).append(cells)
    assert [c[-3:] for c in by_title["Anchor overhead per optimizer step"]] == [
        ["+1.80 %", "PASS", "full"],
        ["+2.60 %", "FAIL", "full"],
    ]
    assert by_title["Hyperparameter search efficiency"][0][-2:] == ["FAIL", "quick only"]
    assert "not measured" in by_title["GPU training throughput"][0][3]
    assert "not measured" in by_title["Does anchoring help? (low-data SST-2)"][0][3]
    assert "unreadable" in done.stdout  # the truncated file is named, not fatal


def test_qa_summary_pairs_f1_and_em_and_the_report_renders_it():
    """The QA study's rows carry EM beside F1, the untrained start, and skip unfinished seeds."""
    qa = pytest.importorskip("qa_study")
    report = pytest.importorskip("report")

    def run(f1: float, em: float, lam: float = 0.0) -> dict:
        return {"f1": f1, "exact_match": em, "selected": {"lambda": lam, "lr": 1e-4}}

    out = {
        "start": {"k0": {"f1": 0.05}, "k1": {"f1": 0.07}},
        "cells": {
            100: {
                s: {
                    "plain": run(0.50 + s / 10, 0.40) | extra,
                    "coupled": run(0.60 + s / 10, 0.45, 0.1) | extra,
                }
                for s, extra in (
                    (0, {"start_key": "k0", "samples_per_s": 8.0, "wall_s": 30.0}),
                    (1, {"start_key": "k1", "samples_per_s": 10.0, "wall_s": 40.0}),
                )
            }
            | {2: {"plain": run(0.9, 0.9)}},  # a seed still running: left out
        },
    }
    for by_seed in out["cells"][100].values():
        for cell in by_seed.values():
            cell.setdefault("drift_l2", None)
    plain, coupled = qa.summarize(out, ["plain", "coupled"])
    assert plain["seeds"] == coupled["seeds"] == [0, 1]
    assert coupled["delta_vs_plain_mean"] == pytest.approx(0.10)
    assert coupled["em_delta_vs_plain_mean"] == pytest.approx(0.05)
    assert coupled["start_f1_mean"] == pytest.approx(0.06)
    assert plain["samples_per_s_mean"] == pytest.approx(9.0)
    d = {
        "settings": {"seeds": [0, 1], "lr": 1e-4, "lambda_coupled": 0.1, "kappa": 1.0}
        | {"epochs": 2, "min_steps": 100, "val": 300},
        "synthetic": out | {"summary": [plain, coupled]},
        "squad": "skipped: squad/train-v1.1.json not found",
    }
    page = report.render_qa(d)
    assert "| 100 | coupled | 65.00 ± 7.07 | 45.00 ± 0.00 | 6.00 | +10.0 | +5.0 | 2/2 |" in page
    assert "skipped: squad/train-v1.1.json not found" in page
    assert len(report.qa_glance_rows(d)) == 3  # plain's score, coupled's Δ, SQuAD's skip
