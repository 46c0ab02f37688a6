"""A sequence-pair classifier (NLI: premise + hypothesis) served as it was trained: its card
says it reads pairs, its request schema takes {"text", "text_pair"} or {"items": [...]}, and
its predictor (alone, as a pyfunc, or as an adapter in a HeadAdapterPool) answers exactly as
the training encoding scores the same pairs offline."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from tether.tasks.classification import SequenceClassification

TASK = "sequence-classification"
LABELS = ("entailment", "neutral", "contradiction")
MAX_LENGTH = 24
LONG = " ".join(["remarkably"] * 40)  # far over MAX_LENGTH tokens
ROWS = [
    {"premise": "A man plays a guitar on stage.", "hypothesis": "Someone makes music."},
    {"premise": "Two dogs run on the beach.", "hypothesis": "The animals are asleep."},
    {"premise": "a fine film", "hypothesis": "ok"},
    {"premise": LONG, "hypothesis": "The text before this one is long."},
    {"premise": "¡qué película! 映画", "hypothesis": LONG},
]
for _row in ROWS:
    _row["label"] = "neutral"


def pair_task(**changes) -> SequenceClassification:
    """The task as a pair job trains it (its own column names)."""
    settings = dict(pair_column="hypothesis", max_length=MAX_LENGTH, labels=LABELS)
    return SequenceClassification("premise", **settings | changes)


def as_request(rows: list[dict]) -> dict:
    return {"items": [{"text": r["premise"], "text_pair": r["hypothesis"]} for r in rows]}


def offline_probabilities(model, task: SequenceClassification, tokenizer) -> torch.Tensor:
    """Softmax of the logits evaluation computes: the training encoding, collated into one
    batch, through ``model_inputs`` (as ``score_split`` feeds ``eval_counts``)."""
    from tether.tasks import model_inputs

    encoded, _ = task.encode(ROWS, tokenizer, "validation")
    batch = encoded.collate(range(len(ROWS)), tokenizer.pad_token_id)
    with torch.inference_mode():
        return torch.softmax(model.eval()(**model_inputs(batch)).logits.float(), dim=-1)


def served_probabilities(predictions) -> torch.Tensor:
    return torch.tensor([[p.probabilities[n] for n in LABELS] for p in predictions])


@pytest.fixture(scope="module")
def pair_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a random, wide 3-label head and the card a pair job exports."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("pair-model")
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS))
    )
    with torch.no_grad():  # confident enough that a wrong encoding shows in the probabilities
        model.classifier.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    (out / "tether.json").write_text(json.dumps(pair_task().card() | {"name": "nli"}))
    return out


def served(model_dir: Path, max_batch_tokens: int = 64):
    """The task rebuilt from the folder's card, and its predictor (as the server loads them)."""
    from tether.card import read_card
    from tether.tasks import task_for_card

    card = read_card(model_dir)
    task = task_for_card(card)
    return task, task.predictor(model_dir, card, max_batch_tokens)


# --------------------------------------------------------------------------- the card


def test_the_card_records_pairs_and_the_served_task_reads_them():
    """A pair job's card says text_pair; the task rebuilt from it reads pairs, a single-text
    card (or one written before the key existed) does not."""
    from tether.tasks import task_for_card

    card = pair_task().card()
    assert card["text_pair"] is True
    served = task_for_card(card)
    assert (served.text_column, served.pair_column) == ("text", "text_pair")
    assert served.card() == card
    single = SequenceClassification(labels=LABELS).card()
    assert single["text_pair"] is False
    assert task_for_card(single).pair_column is None
    assert task_for_card({k: v for k, v in single.items() if k != "text_pair"}).pair_column is None


# --------------------------------------------------------------------------- predictions


def test_pair_predictions_equal_offline_evaluation_of_the_training_encoding(pair_model):
    """The predictor's probabilities are the training encoding's (segments, longest-first
    truncation at the card's max_length, right padding across several chunks)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task, predictor = served(pair_model, max_batch_tokens=64)  # several forward passes
    request = task.request_model(max_items=16, max_chars=1000)
    items = predictor.items(request.model_validate(as_request(ROWS)))
    predictions = predictor.predict(items)

    tokenizer = AutoTokenizer.from_pretrained(pair_model)
    model = AutoModelForSequenceClassification.from_pretrained(pair_model)
    want = offline_probabilities(model, pair_task(), tokenizer)
    torch.testing.assert_close(served_probabilities(predictions), want, atol=1e-5, rtol=0)
    assert [p.label_id for p in predictions] == want.argmax(dim=-1).tolist()
    assert [p.truncated for p in predictions] == [False, False, False, True, True]
    # the hypothesis is read: the first text alone is answered otherwise
    alone = offline_probabilities(model, pair_task(pair_column=None), tokenizer)
    assert (want - alone).abs().max() > 1e-2


def test_a_pyfunc_frame_of_text_and_text_pair_columns_gets_the_served_answers(pair_model):
    """MLflow's pyfunc takes a DataFrame with text and text_pair columns (its logged input
    example has them) and answers as the predictor does; a frame without text_pair is refused."""
    import pandas as pd

    from tether.registry.pyfunc import TetherModel, example_frame

    _, predictor = served(pair_model)
    assert predictor.frame_columns == ("text", "text_pair")
    wrapper = TetherModel()
    wrapper.predictor = predictor
    body = as_request(ROWS)["items"]
    frame = wrapper.predict(None, pd.DataFrame(body))
    want = predictor.predict(predictor.frame_items(body))
    assert list(frame.label) == [p.label for p in want]
    for name in LABELS:
        assert list(frame[f"p_{name}"]) == pytest.approx([p.probabilities[name] for p in want])
    with pytest.raises(ValueError, match="text_pair"):
        wrapper.predict(None, pd.DataFrame({"text": ["only one text"]}))
    example, output = example_frame(pair_model)
    assert list(example.columns) == ["text", "text_pair"] and len(output) == len(example)


# --------------------------------------------------------------------------- the request


def rejection(payload: dict, model) -> tuple[str, str]:
    """The 422 message and param the server answers ``payload`` with."""
    from tether.serving.contract import RequestError, validate_body

    with pytest.raises(RequestError) as caught:
        validate_body(payload, model)
    assert caught.value.status == 422
    return caught.value.message, caught.value.param


def test_pair_requests_are_validated_naming_text_pair():
    """A pair model's body without text_pair is a 422 naming it (alone or in items), items and
    characters are limited; a single-text model's body with text_pair is a 422 too."""
    pair = pair_task().request_model(max_items=2, max_chars=10)
    assert pair.model_validate({"text": "a", "text_pair": "b"})
    assert pair.model_validate({"items": [{"text": "a", "text_pair": "b"}]})
    message, param = rejection({"text": "a premise"}, pair)
    assert message == "text_pair: Field required" and param.endswith("text_pair")
    message, _ = rejection({"items": [{"text": "a", "text_pair": "b"}, {"text": "c"}]}, pair)
    assert message == "items[1].text_pair: Field required"
    message, _ = rejection({"text": "a", "text_pair": " "}, pair)
    assert message == "text_pair: empty or whitespace-only text"
    message, _ = rejection({"text": "a", "text_pair": "x" * 11}, pair)
    assert message.startswith("text_pair:") and "at most 10 characters" in message
    message, _ = rejection({"items": [{"text": "a", "text_pair": "b"}] * 3}, pair)
    assert "at most 2 items" in message
    message, _ = rejection({"texts": ["a", "b"]}, pair)
    assert "'text', 'text_pair', 'items'" in message

    single = SequenceClassification(labels=LABELS).request_model(max_items=2, max_chars=10)
    message, param = rejection({"text": "a", "text_pair": "b"}, single)
    assert message == "text_pair: unknown field" and param.endswith("text_pair")
    message, _ = rejection({"items": [{"text": "a", "text_pair": "b"}]}, single)
    assert "unknown field(s): 'items'" in message


def test_a_predictor_refuses_the_other_input_form_naming_text_pair(pair_model, tiny_model_dir):
    """Behind a schema that took the other form, the predictor answers a 422 naming
    text_pair, never a silently wrong answer: a pair model given texts, a single-text model
    given pairs."""
    from tether.tasks.predict import ItemsRefused  # what the serving core answers as a 422

    _, pair_predictor = served(pair_model)
    single_task = SequenceClassification(labels=LABELS)
    texts = single_task.request_model(4, 100).model_validate({"text": "a premise"})
    with pytest.raises(ItemsRefused, match="this model classifies text pairs") as caught:
        pair_predictor.items(texts)
    assert caught.value.param == "text_pair"

    card = single_task.card()
    single_predictor = single_task.predictor(pair_model, card, 4096)
    pairs = pair_task().request_model(4, 100).model_validate(as_request(ROWS[:2]))
    with pytest.raises(ItemsRefused, match="this model classifies single texts") as caught:
        single_predictor.items(pairs)
    assert caught.value.param == "text_pair"
    assert single_predictor.frame_columns is None


def test_the_published_schema_describes_text_pair():
    """The pair model's request schema (as /openapi.json embeds it) lists text and text_pair,
    both required and limited; the single-text schema is unchanged and has no text_pair."""
    from tether.serving.contract import inline_schema

    schema = inline_schema(pair_task().request_model(max_items=8, max_chars=100))
    one, many = schema["anyOf"]
    assert (one["title"], many["title"]) == ("TextPair", "ManyPairs")
    assert set(one["required"]) == {"text", "text_pair"}
    assert one["properties"]["text_pair"]["maxLength"] == 100
    assert many["properties"]["items"]["maxItems"] == 8
    assert many["properties"]["items"]["items"]["required"] == ["text", "text_pair"]
    pair_task().request_model(8, 100).model_validate(pair_task().request_example())

    single = inline_schema(SequenceClassification().request_model(max_items=8, max_chars=100))
    assert [b["title"] for b in single["anyOf"]] == ["OneText", "ManyTexts"]
    assert "text_pair" not in json.dumps(single)


# --------------------------------------------------------------------------- adapters


def pair_adapter(pool, tiny_model_dir: Path, tmp_path: Path):
    """A LoRA pair classifier (random factors and head) on the pool's pretrained base, loaded
    into the pool; and its own peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tether.serving.adapters import AdapterSource

    torch.manual_seed(6)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=len(LABELS)
    )
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # factors that change the answers (B starts at zero)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.normal_(0.0, 0.5)
    folder = tmp_path / "nli-adapter"
    peft_model.save_pretrained(folder)
    card = pair_task().card() | {"objective": {"theta_star_sha256": pool.base_sha256}}
    (folder / "tether.json").write_text(json.dumps(card))
    adapter = asyncio.run(pool.load(AdapterSource("nli", folder=str(folder)), folder))
    return peft_model, adapter


def test_the_app_reads_a_request_as_the_adapter_it_names_does(
    tiny_model_dir, tmp_path, monkeypatch
):
    """On a pretrained base (single texts) serving a pair adapter, the app reads the body with
    the adapter's predictor: its pairs are taken; the base would refuse them."""
    import tether.serving.app as app_module
    from tether.serving.adapters import HeadAdapterPool
    from tether.serving.contract import RequestError

    monkeypatch.setattr(app_module, "replica_threads", lambda: 1)
    args = app_module.AppArgs(text_pair=True)
    request_model = args.served_task().request_model(16, 1000)
    replica = app_module.Replica(args, request_model)
    pool = HeadAdapterPool(TASK, tiny_model_dir, 64)
    _, adapter = pair_adapter(pool, tiny_model_dir, tmp_path)
    body = request_model.model_validate(as_request(ROWS[:2]))
    assert len(asyncio.run(replica.items_for(adapter.served, body))) == 2
    with pytest.raises(RequestError, match="single texts") as refused:
        asyncio.run(replica.items_for(pool.describe_base(), body))
    assert refused.value.status == 422 and refused.value.param == "text_pair"


def test_a_pair_adapter_in_a_head_adapter_pool_reads_pairs(tiny_model_dir, tmp_path):
    """A LoRA pair classifier loaded into a pool on its pretrained base answers the pairs as
    its own peft model scores their training encoding."""
    from transformers import AutoTokenizer

    from tether.serving.adapters import HeadAdapterPool

    pool = HeadAdapterPool(TASK, tiny_model_dir, 64)
    peft_model, adapter = pair_adapter(pool, tiny_model_dir, tmp_path)
    body = pair_task().request_model(16, 1000).model_validate(as_request(ROWS))
    predictions = adapter.predictor.predict(adapter.predictor.items(body))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    want = offline_probabilities(peft_model, pair_task(), tokenizer)
    torch.testing.assert_close(served_probabilities(predictions), want, atol=1e-5, rtol=0)


def test_a_single_text_app_refuses_a_pair_model_and_the_reverse(pair_model, tiny_model_dir):
    """A model whose input shape is not the app's is refused when it loads, saying so."""
    from tether.serving.app import ModelSource, load_source

    with pytest.raises(ValueError, match="reads text pairs but this app serves single texts"):
        load_source(ModelSource(model_dir=str(pair_model)), TASK)
    assert load_source(ModelSource(model_dir=str(pair_model)), TASK, text_pair=True)


@pytest.mark.ray
@pytest.mark.slow
def test_a_pair_model_is_served_with_its_pairs_over_http(ray_cluster, pair_model):
    """`tether serve`'s path: the card says pairs, so the app's schema takes text + text_pair;
    HTTP answers equal the predictor's offline answers; a missing text_pair is a 422."""
    import httpx
    from ray import serve

    from tether.serving.cli import reads_pairs
    from tether.serving.deploy import ServeOptions, application_config, deploy, http_options

    from .helpers import free_port

    user_config = {"model_dir": str(pair_model)}
    options = ServeOptions(
        port=free_port(), app_name="pairs", num_cpus=0.5, text_pair=reads_pairs(user_config)
    )
    assert options.text_pair
    config = {
        "http_options": http_options(options),
        "applications": [application_config(options, user_config)],
    }
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(pair_model)
    offline = offline_probabilities(model, pair_task(), AutoTokenizer.from_pretrained(pair_model))
    serve.start(http_options=config["http_options"])
    try:
        deploy(config)
        with httpx.Client(base_url=f"http://127.0.0.1:{options.port}", timeout=60) as client:
            r = client.post("/v1/predict", json=as_request(ROWS))
            assert r.status_code == 200, r.text
            got = torch.tensor(
                [[p["probabilities"][n] for n in LABELS] for p in r.json()["predictions"]]
            )
            torch.testing.assert_close(got, offline, rtol=1e-4, atol=1e-5)
            one = client.post("/v1/predict", json={"text": "a fine film", "text_pair": "ok"})
            assert one.status_code == 200, one.text
            missing = client.post("/v1/predict", json={"text": "a fine film"})
            assert missing.status_code == 422 and "text_pair" in missing.json()["message"]
            schema = client.get("/openapi.json").text
            assert "text_pair" in schema
    finally:
        serve.shutdown()
