"""Many LoRA classifiers on one base encoder, on /v1/predict: each adapter answers with its own
head and labels (even another number of labels), equal to its merged export; the base is
loaded once; the adapter is picked by Serve's multiplexing header on a real Ray Serve."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from tether.serving.adapters import AdapterMismatch, AdapterSource, HeadAdapterPool

from .helpers import FILLER, NEGATIVE, POSITIVE, free_port, write_csv

TASK = "sequence-classification"
TEXTS = ["the movie was great and superb", "the plot was awful and boring", "a story it was"]


def three_way_rows(n: int, seed: int) -> list[dict]:
    """The toy task with a third label: sentences of filler words only are 'neutral'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("negative", "positive", "neutral")[i % 3]
        pool = {"negative": NEGATIVE, "positive": POSITIVE, "neutral": FILLER}[label]
        words = rng.sample(FILLER, 4) + rng.sample(pool, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def train_adapter(model_dir: Path, data: dict[str, Path], root: Path, name: str, labels) -> Path:
    """A local LoRA classifier run on the tiny BERT; its exported model folder."""
    from tether.config import validate_job
    from tether.run import run_training

    from .helpers import make_tiny_job

    job = make_tiny_job(
        model_dir,
        data,
        root,
        name=name,
        model={"name": str(model_dir), "label_names": labels, "adapter": {"r": 4, "alpha": 8.0}},
        optim={"lr": 1e-2, "warmup_ratio": 0.0},
        train={"epochs": 2, "eval_interval": 1000},
        scaling={"num_workers": 0},
        tracking={"enabled": False},
        storage={"run_name": name},
    )
    return Path(run_training(validate_job(job)).summary["model_dir"])


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, easy_csv, tmp_path_factory) -> dict[str, Path]:
    """Two adapters on the same base: a 2-label one and a 3-label one."""
    root = tmp_path_factory.mktemp("head-adapters")
    three = {
        split: write_csv(root / f"{split}3.csv", three_way_rows(n, seed))
        for split, n, seed in (("train", 300, 3), ("validation", 60, 4))
    }
    return {
        "two": train_adapter(tiny_model_dir, easy_csv, root, "two", ["negative", "positive"]),
        "three": train_adapter(
            tiny_model_dir, three, root, "three", ["negative", "positive", "neutral"]
        ),
    }


def merged_predictions(model_dir: Path) -> list[dict]:
    """The merged export's own predictions, through the ordinary predictor (offline)."""
    from tether.serving.model import load_served_model

    served = load_served_model(model_dir)
    return [p.model_dump() for p in served.predictor.predict(TEXTS)]


def assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"]
        assert list(g["probabilities"]) == list(w["probabilities"])
        for label, p in w["probabilities"].items():
            assert g["probabilities"][label] == pytest.approx(p, abs=1e-5)


def test_adapters_with_different_heads_share_one_base_and_equal_their_merged_models(
    tiny_model_dir, adapters
):
    """A 2-label and a 3-label adapter loaded on one base: each predicts exactly what its
    merged export predicts; unloading both gives the base its own modules back."""
    from peft import PeftModel

    pool = HeadAdapterPool(TASK, tiny_model_dir, 4096)
    assert not pool.has_head
    head_shape = pool.model.classifier.weight.shape

    async def load_all():
        return {
            name: await pool.load(AdapterSource(name, folder=str(path)), path)
            for name, path in adapters.items()
        }

    loaded = asyncio.run(load_all())
    for name, path in adapters.items():
        predictor = loaded[name].predictor
        got = [p.model_dump() for p in predictor.predict(TEXTS)]
        assert_same(got, merged_predictions(path))
    assert len(loaded["three"].predictor.labels) == 3 and len(loaded["two"].predictor.labels) == 2
    # interleaved: switching adapters between batches changes nothing
    again = [p.model_dump() for p in loaded["two"].predictor.predict(TEXTS)]
    assert_same(again, merged_predictions(adapters["two"]))
    assert loaded["three"].served.info.name == "three"
    assert loaded["three"].served.info.label_names == ["negative", "positive", "neutral"]
    assert pool.counters == {"base_loads": 1, "adapter_loads": 2, "adapter_unloads": 0}

    for adapter in loaded.values():
        pool._remove(adapter)
    assert not isinstance(pool.model, PeftModel)
    assert pool.model.classifier.weight.shape == head_shape  # the base's own head is back


def test_an_adapter_of_another_base_or_task_is_refused(tiny_model_dir, adapters, tmp_path):
    pool = HeadAdapterPool(TASK, tiny_model_dir, 4096)
    for field, value, message in (
        ("theta_star_sha256", "0" * 64, "trained on another base"),
        ("task", "token-classification", "is a token-classification adapter"),
    ):
        folder = shutil.copytree(adapters["two"] / "adapter", tmp_path / field)
        card = json.loads((folder / "tether.json").read_text())
        if field == "task":
            card["task"] = value
        else:
            card["objective"][field] = value
        (folder / "tether.json").write_text(json.dumps(card))
        with pytest.raises(AdapterMismatch, match=message):
            asyncio.run(pool.load(AdapterSource("x", folder=str(folder)), folder))
    assert pool.counters["adapter_loads"] == 0


@pytest.mark.ray
@pytest.mark.slow
def test_classifier_adapters_are_picked_by_header_on_a_real_serve(
    ray_cluster, tiny_model_dir, adapters
):
    """tether serve's deployment on a pretrained base with two adapters: the multiplexing
    header picks each one (its labels and probabilities equal its merged export's), also as
    the LRU of one unloads and reloads them; concurrent requests for one adapter share
    forward passes; no header is a 400 naming the header, an unknown id a 404."""
    from ray import serve

    from tether.serving.deploy import ServeOptions, application_config, deploy, http_options

    port = free_port()
    options = ServeOptions(
        task=TASK, port=port, app_name="head-adapters", extra_args={"max_adapters": 1}
    )
    user_config = {
        "model_dir": str(tiny_model_dir),
        "adapters": {"registered": [], "dirs": {k: str(v) for k, v in adapters.items()}},
    }
    config = {
        "http_options": http_options(options),
        "applications": [application_config(options, user_config)],
    }
    expected = {name: merged_predictions(path) for name, path in adapters.items()}
    serve.start(http_options=config["http_options"])
    try:
        deploy(config)
        url = f"http://127.0.0.1:{port}"

        async def ask(client, model_id):
            headers = {"serve_multiplexed_model_id": model_id} if model_id else {}
            return await client.post(
                "/v1/predict", json={"texts": TEXTS}, headers=headers, timeout=60
            )

        async def ask_all(ids):
            async with httpx.AsyncClient(base_url=url) as client:
                return await asyncio.gather(*(ask(client, i) for i in ids))

        # max_adapters = 1: each switch unloads the other adapter and loads this one again
        for name in ("two", "three", "two", "three"):
            (r,) = asyncio.run(ask_all([name]))
            assert r.status_code == 200, r.text
            assert r.json()["model"]["name"] == name
            assert_same(r.json()["predictions"], expected[name])
        for r in asyncio.run(ask_all(["three"] * 4)):  # concurrent items share batches
            assert_same(r.json()["predictions"], expected["three"])
        assert max(r.json()["batch_size"] for r in asyncio.run(ask_all(["two"] * 4))) > 3

        missing, unknown = asyncio.run(ask_all([None, "nope"]))
        assert missing.status_code == 400, missing.text
        assert missing.json()["error"] == "model_required"
        assert "serve_multiplexed_model_id" in missing.json()["message"]
        assert unknown.status_code == 404 and "nope" in unknown.json()["message"]
        info = httpx.get(f"{url}/v1/model").json()
        assert info["label_names"] == []  # a pretrained base: no head of its own
    finally:
        serve.shutdown()


def test_tether_serve_infers_the_task_of_classifier_adapters(tiny_model_dir, adapters, capsys):
    """--base on an encoder + classifier adapters → a sequence-classification app."""
    import yaml

    from tether.cli import main

    args = ["serve", "--base", str(tiny_model_dir), "--print-config"]
    assert main([*args, "--adapter", f"two={adapters['two']}"]) == 0
    app = yaml.safe_load(capsys.readouterr().out)["applications"][0]
    assert app["args"]["task"] == TASK
    assert app["deployments"][0]["user_config"]["adapters"]["dirs"] == {"two": str(adapters["two"])}
    # registered adapters alone do not say their task: an encoder base needs one folder
    assert main([*args, "--adapters-from", "reviews"]) == 2
    assert "is not a causal LM" in capsys.readouterr().err


def test_a_trained_base_answers_with_its_own_head_and_refuses_adapters_of_another(adapters):
    """A tether-trained classifier as the base: requests without an adapter get its own head
    and labels (as its folder serves alone); an adapter trained on the pretrained encoder is
    not this base's (another θ*) and is refused."""
    base_dir = adapters["two"]  # the merged export: a classifier with a card and a head
    pool = HeadAdapterPool(TASK, base_dir, 4096)
    assert pool.has_head
    served = pool.describe_base()
    assert served.info.label_names == ["negative", "positive"]
    got = [p.model_dump() for p in served.predictor.predict(TEXTS)]
    assert_same(got, merged_predictions(base_dir))
    with pytest.raises(AdapterMismatch, match="trained on another base"):
        folder = adapters["three"]
        asyncio.run(pool.load(AdapterSource("three", folder=str(folder)), folder))


def test_a_tagger_adapter_on_the_same_encoder_equals_its_merged_export(tiny_model_dir, tmp_path):
    """A token-classification LoRA adapter (its own tagging head and tag set) served from a
    pretrained base answers /v1/predict's entity schema exactly like its merged export."""
    from tether.config import validate_job
    from tether.run import run_training
    from tether.serving.model import load_served_model

    job = {
        "name": "tags",
        "model": {
            "name": str(tiny_model_dir),
            "task": "token-classification",
            "adapter": {"r": 4, "alpha": 8.0},
        },
        "data": {
            "train": "synthetic:entities",
            "max_train_samples": 200,
            "max_validation_samples": 40,
            "max_length": 48,
        },
        "objective": {"lambda": 0.01},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0},
        "train": {"epochs": 1, "batch_size": 16, "eval_interval": 1000},
        "scaling": {"num_workers": 0},
        "tracking": {"enabled": False},
        "storage": {"path": str(tmp_path / "runs"), "run_name": "tags"},
    }
    export = Path(run_training(validate_job(job)).summary["model_dir"])
    pool = HeadAdapterPool("token-classification", tiny_model_dir, 4096)
    adapter = asyncio.run(pool.load(AdapterSource("tags", folder=str(export)), export))
    texts = ["Anna flew from Paris to Berlin with Acme Corp", "nothing to see here"]
    merged = load_served_model(export).predictor
    got = adapter.predictor.predict(adapter.predictor.frame_items(texts))
    want = merged.predict(merged.frame_items(texts))
    assert adapter.predictor.labels == merged.labels and len(merged.labels) > 2
    # the tag scores themselves, not only the decoded entities (a briefly trained tagger may
    # tag nothing): the adapter's view and the merged model give the same logits
    features = merged.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        view_logits = adapter.predictor.model(**features).logits
        merged_logits = merged.model(**features).logits
    assert view_logits.shape[-1] == len(merged.labels)
    torch.testing.assert_close(view_logits, merged_logits, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        g, w = g.model_dump(), w.model_dump()
        assert [(e["type"], e["start"], e["end"]) for e in g["entities"]] == [
            (e["type"], e["start"], e["end"]) for e in w["entities"]
        ]
        for ge, we in zip(g["entities"], w["entities"], strict=True):
            assert ge["score"] == pytest.approx(we["score"], abs=1e-5)
