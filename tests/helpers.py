"""Helpers the test modules share (conftest.py holds the fixtures)."""

from __future__ import annotations

import csv
import json
import random
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "nice", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "sad", "boring", "ugly", "dreadful"]
FILLER = ["the", "movie", "was", "plot", "really", "and", "a", "story", "it", "very"]


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def easy_rows(n: int, seed: int) -> list[dict]:
    """A learnable toy task: the label is which word list the sentence draws from."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the suffix names."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        df.to_parquet(path)
    return path


def make_tiny_job(
    model_dir: Path, easy_csv: dict[str, Path], storage_path: Path, **updates
) -> dict:
    """A fast job on the tiny model and toy data; ``updates`` are merged per section."""
    from tether.config import deep_merge

    job = {
        "name": "tiny",
        "model": {"name": str(model_dir), "label_names": ["negative", "positive"]},
        "data": {
            "train": str(easy_csv["train"]),
            "validation": str(easy_csv["validation"]),
            "max_length": 32,
        },
        "objective": {"lambda": 0.01},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
        "train": {"epochs": 4, "batch_size": 16, "eval_interval": 5, "seed": 7},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "storage": {"path": str(storage_path)},
    }
    return deep_merge(job, updates)


def prepare(spec, tokenizer, labels=None, use_cache=False):
    """The spec's task with its labels, and its encoded data."""
    from tether.data import prepare_data
    from tether.tasks import build_task

    task = build_task(spec)
    data = prepare_data(spec.data, task, tokenizer, labels, use_cache=use_cache)
    return task.with_labels(data.label_names), data


def row_ids(split) -> list[list[int]]:
    """Every row's token ids of an encoded split."""
    return [split.input_ids.row(i).tolist() for i in range(len(split))]


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (shared datasets are optional)")
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class CrashOnce:
    """LoopHooks: kill the last rank's process the first time ``step`` is reached."""

    def __init__(self, step: int, marker: str):
        self.step = step
        self.marker = marker

    def after_step(self, step: int, rank: int, world: int) -> None:
        import os
        import time

        if step != self.step or rank != world - 1 or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"crashed rank {rank}\n")
        # Ray Train's controller collects reports when it polls the workers (every 2 s by
        # default); a crash within that window would lose the last report, which real steps
        # (seconds each) never do. Wait for one poll so the test exercises the resume path.
        time.sleep(5)
        print(f"[tether] test crash: killing rank {rank}", flush=True)
        os._exit(1)


def wait_until_healthy(proc, url: str, log: Path, timeout_s: float = 240.0) -> None:
    """Poll a `tether serve` subprocess's /healthz until it answers 200; fail with the tail of
    its log if it exits or takes longer than ``timeout_s``."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)


def stop_server(proc) -> None:
    """Ctrl-C a `tether serve` subprocess (it shuts Serve down), killing it if it hangs."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
