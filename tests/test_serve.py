"""tether serve on a real local Ray Serve: HTTP contract, batching, overload, hot swap, auth.

One Serve instance per module (on a free loopback port) runs two applications built from
tiny BERT model directories: "tether" (batching, API key, small body limits) and "slow"
(a 0.5 s model with a one-request queue, to provoke 503s).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tether.serving.deploy import (
    DEPLOYMENT_NAME,
    ServeOptions,
    application_config,
    deploy,
    http_options,
    model_user_config,
)

from .helpers import free_port, stop_server, wait_until_healthy

REPO = Path(__file__).resolve().parents[1]
API_KEY = "s3cret-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BATCH_SIZE = 8
MAX_TEXTS = 8
MAX_BODY_BYTES = 4096
MAX_CHARS = 2000
MAX_DEPTH = 8
MAX_LENGTH = 32
LONG_TEXT = " ".join(["remarkably"] * 80)  # far over max_length tokens
TEXTS = ["a fine film", "dull and far too long", "¡qué película! 映画", LONG_TEXT, "ok"]


# --------------------------------------------------------------------------- model directories


def build_model_dir(base: Path, out: Path, name: str, seed: int) -> Path:
    """The tiny BERT with a fresh 2-label head (seeded) and a tether.json card: no training."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=2,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    with torch.no_grad():  # a wider head than the 0.02 init, so the two models disagree visibly
        model.classifier.weight.normal_(0.0, 0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    card = {
        "name": name,
        "task": "sequence-classification",
        "label_names": labels,
        "max_length": MAX_LENGTH,
        "objective": {"base_model": str(base), "lambda": 0.01, "mode": "coupled"},
        "metrics": {"eval/accuracy": 0.75, "train/fine_loss": 0.3},
        "step": 40,
    }
    (out / "tether.json").write_text(json.dumps(card))
    return out


NER_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER", "B-MISC", "I-MISC"]


def build_ner_dir(base: Path, out: Path) -> Path:
    """The tiny BERT with a random 9-tag head and a token-classification card."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    torch.manual_seed(3)
    model = AutoModelForTokenClassification.from_pretrained(
        base, num_labels=len(NER_LABELS), id2label=dict(enumerate(NER_LABELS))
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)  # confident random tags: entities appear
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    card = {
        "name": "ner",
        "task": "token-classification",
        "label_names": NER_LABELS,
        "max_length": MAX_LENGTH,
    }
    (out / "tether.json").write_text(json.dumps(card))
    return out


QA_CARD = {
    "name": "qa",
    "task": "question-answering",
    "label_names": [],
    "max_length": 48,
    "doc_stride": 12,
    "max_question_length": 16,
    "unanswerable": False,
    "max_answer_length": 8,
    "null_score_threshold": 0.0,
}


def build_qa_dir(base: Path, out: Path) -> Path:
    """The tiny BERT with a random span head and a question-answering card (short windows)."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    torch.manual_seed(4)
    AutoModelForQuestionAnswering.from_pretrained(base).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "tether.json").write_text(json.dumps(QA_CARD))
    return out


@pytest.fixture(scope="module")
def qa_model(tiny_model_dir, tmp_path_factory) -> Path:
    return build_qa_dir(tiny_model_dir, tmp_path_factory.mktemp("qa"))


@pytest.fixture(scope="module")
def ner_model(tiny_model_dir, tmp_path_factory) -> Path:
    return build_ner_dir(tiny_model_dir, tmp_path_factory.mktemp("ner"))


@pytest.fixture(scope="module")
def model_a(tiny_model_dir, tmp_path_factory) -> Path:
    return build_model_dir(tiny_model_dir, tmp_path_factory.mktemp("model-a"), "demo", seed=1)


@pytest.fixture(scope="module")
def model_b(tiny_model_dir, tmp_path_factory) -> Path:
    return build_model_dir(tiny_model_dir, tmp_path_factory.mktemp("model-b"), "demo-v2", seed=2)


def offline_predictions(model_dir: Path, texts: list[str]) -> list[dict]:
    """Each text alone through plain transformers: the reference the service must match."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    results = []
    for text in texts:
        features = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model.eval()(**features).logits[0], dim=-1).tolist()
        full_length = len(tokenizer(text)["input_ids"])
        results.append({"probs": probs, "truncated": full_length > MAX_LENGTH})
    return results


# --------------------------------------------------------------------------- the server


@dataclass
class Server:
    url: str
    http: dict
    apps: dict[str, dict]  # application name → its entry in the Serve config

    def redeploy(self, app_name: str, user_config: dict) -> None:
        """Deploy the same apps with one app's user_config changed (what --reload does)."""
        app = self.apps[app_name]
        deployment = {**app["deployments"][0], "user_config": user_config}
        self.apps[app_name] = {**app, "deployments": [deployment]}
        deploy({"http_options": self.http, "applications": list(self.apps.values())})


def with_faults(app: dict, faults: str) -> dict:
    """The app with test faults in its replicas' environment (not in its contract)."""
    from tether.serving.app import FAULTS_ENV

    deployment = app["deployments"][0]
    options = {**deployment["ray_actor_options"], "runtime_env": {"env_vars": {FAULTS_ENV: faults}}}
    return {**app, "deployments": [{**deployment, "ray_actor_options": options}]}


@pytest.fixture(scope="module")
def server(ray_cluster, model_a, ner_model, qa_model) -> Server:
    from ray import serve

    port = free_port()
    main = ServeOptions(
        port=port,
        max_batch_size=MAX_BATCH_SIZE,
        batch_wait_ms=30,
        max_texts=MAX_TEXTS,
        max_chars=MAX_CHARS,
        max_body_bytes=MAX_BODY_BYTES,
        max_json_depth=MAX_DEPTH,
        num_cpus=1,
        api_key_sha256=hashlib.sha256(API_KEY.encode()).hexdigest(),
    )
    slow = ServeOptions(
        port=port,
        app_name="slow",
        route_prefix="/slow",
        max_batch_size=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        num_cpus=0.5,
    )
    ner = ServeOptions(
        task="token-classification", port=port, app_name="ner", route_prefix="/ner", num_cpus=0.5
    )
    qa = ServeOptions(
        task="question-answering", port=port, app_name="qa", route_prefix="/qa", num_cpus=0.5
    )
    apps = {
        "tether": application_config(main, model_user_config(model_a)),
        "qa": application_config(qa, model_user_config(qa_model)),
        "slow": with_faults(application_config(slow, model_user_config(model_a)), "delay=0.5"),
        "ner": application_config(ner, model_user_config(ner_model)),
    }
    s = Server(url=f"http://127.0.0.1:{port}", http=http_options(main), apps=apps)
    serve.start(http_options=s.http)
    try:
        deploy({"http_options": s.http, "applications": list(apps.values())})
        yield s
    finally:
        serve.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def predict(client: httpx.Client, **kwargs) -> httpx.Response:
    return client.post("/v1/predict", **kwargs)


# --------------------------------------------------------------------------- predictions


@pytest.mark.ray
def test_http_predictions_equal_offline_predictions(client, model_a):
    """Labels, probabilities and truncation flags over HTTP equal plain transformers, per text."""
    response = predict(client, json={"texts": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "demo", "version": None, "alias": None}
    expected = offline_predictions(model_a, TEXTS)
    for served, reference in zip(body["predictions"], expected, strict=True):
        probs = [served["probabilities"]["negative"], served["probabilities"]["positive"]]
        assert probs == pytest.approx(reference["probs"], abs=1e-5)
        assert served["label_id"] == max(range(2), key=lambda i: reference["probs"][i])
        assert served["label"] == ["negative", "positive"][served["label_id"]]
        assert served["truncated"] is reference["truncated"]
    assert [p["truncated"] for p in body["predictions"]] == [False, False, False, True, False]
    single = predict(client, json={"text": TEXTS[0]}).json()["predictions"]
    assert single[0]["probabilities"] == pytest.approx(
        body["predictions"][0]["probabilities"], abs=1e-5
    )


@pytest.mark.ray
def test_model_endpoint_and_health_report_the_card(client, model_a):
    """/v1/model reports the card's name, objective and eval metrics; /healthz says ok."""
    info = client.get("/v1/model").json()
    assert info["name"] == "demo" and info["run_id"] is None and info["version"] is None
    assert info["objective"]["lambda"] == 0.01 and info["objective"]["mode"] == "coupled"
    assert info["metrics"] == {"eval/accuracy": 0.75}  # train/* metrics are not eval metrics
    assert info["max_length"] == MAX_LENGTH and info["task"] == "sequence-classification"
    assert "model_dir" not in info, "server paths are not for callers"
    assert info["objective"]["base_model"] == Path(info["objective"]["base_model"]).name
    assert client.get("/healthz").json() == {"status": "ok", "model": "demo"}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(paths)
    assert client.get("/docs").status_code == 200


@pytest.mark.ray
def test_concurrent_requests_share_forward_passes(server):
    """Texts from concurrent clients are batched together, never above max_batch_size."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=AUTH) as c:
            requests = [c.post("/v1/predict", json={"text": f"film number {i}"}) for i in range(24)]
            return await asyncio.gather(*requests)

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= MAX_BATCH_SIZE


# --------------------------------------------------------------------------- the input contract

TOO_BIG = b'{"texts": ["' + b"x" * MAX_BODY_BYTES + b'"]}'
JSON = {"Content-Type": "application/json"}

BAD_REQUESTS = {
    # name: (request kwargs, status, words the message must contain)
    "malformed_json": (dict(content=b'{"texts": [', headers=JSON), 400, "malformed JSON"),
    "not_utf8": (dict(content=b'{"text": "caf\xe9"}', headers=JSON), 400, "not valid UTF-8"),
    "empty_body": (dict(content=b"", headers=JSON), 400, "empty body"),
    "text_plain": (
        dict(content=b'{"text": "hi"}', headers={"Content-Type": "text/plain"}),
        415,
        "application/json",
    ),
    "no_content_type": (dict(content=b'{"text": "hi"}'), 415, "Content-Type"),
    "latin1_charset": (
        dict(
            content=b'{"text": "hi"}', headers={"Content-Type": "application/json; charset=latin-1"}
        ),
        415,
        "utf-8",
    ),
    "top_level_list": (dict(json=["hi"]), 422, "JSON object"),
    "no_text_field": (dict(json={}), 422, "exactly one of 'text', 'texts'"),
    "both_fields": (dict(json={"text": "a", "texts": ["b"]}), 422, "exactly one of"),
    "texts_not_list": (dict(json={"texts": "hi"}), 422, "texts: Input should be a valid list"),
    "empty_list": (dict(json={"texts": []}), 422, "at least 1 item"),
    "number_item": (
        dict(json={"texts": ["ok", 3]}),
        422,
        "texts[1]: Input should be a valid string",
    ),
    "null_item": (dict(json={"texts": ["ok", None]}), 422, "texts[1]"),
    "empty_text": (dict(json={"text": ""}), 422, "empty or whitespace"),
    "whitespace_item": (
        dict(json={"texts": ["ok", " \n\t"]}),
        422,
        "texts[1]: empty or whitespace",
    ),
    "text_number": (dict(json={"text": 5}), 422, "text: Input should be a valid string"),
    "unknown_field": (dict(json={"txt": "hi"}), 422, "unknown field(s): 'txt'"),
    "unknown_extra_field": (dict(json={"text": "hi", "top_k": 2}), 422, "top_k: unknown field"),
    "too_many_texts": (
        dict(json={"texts": ["a"] * (MAX_TEXTS + 1)}),
        422,
        f"at most {MAX_TEXTS} items",
    ),
    "text_too_long": (
        dict(json={"text": "x" * (MAX_CHARS + 1)}),
        422,
        f"at most {MAX_CHARS} characters",
    ),
    # the classes of input a fuzzer found behind 500s: parser limits and unencodable strings
    "deeply_nested": (
        dict(content=b'{"texts": ' + b"[" * 1500 + b"]" * 1500 + b"}", headers=JSON),
        400,
        "nested deeper",
    ),
    "nested_past_limit": (
        dict(content=b'{"texts": [[[[[[[[[[[[["a"]]]]]]]]]]]]]}', headers=JSON),
        400,
        "nested deeper than 8",
    ),
    "lone_surrogate": (
        dict(content=b'{"texts": ["ok", "bad \\ud800 text"]}', headers=JSON),
        400,
        "texts[1]: holds an unpaired surrogate",
    ),
    "surrogate_in_key": (dict(content=b'{"\\udfff": 1}', headers=JSON), 400, "unpaired surrogate"),
    "nan": (dict(content=b'{"text": NaN}', headers=JSON), 400, "NaN is not JSON"),
    "infinite_number": (
        dict(content=b'{"text": 1e999}', headers=JSON),
        400,
        "too large to represent",
    ),
    "duplicate_key": (
        dict(content=b'{"text": "a", "text": "b"}', headers=JSON),
        400,
        "duplicate key 'text'",
    ),
    "control_character": (dict(content=b'{"text": "a\x01b"}', headers=JSON), 400, "malformed JSON"),
    "declared_too_large": (dict(content=TOO_BIG, headers=JSON), 413, f"{len(TOO_BIG)} bytes"),
    "chunked_too_large": (
        dict(content=iter([TOO_BIG[:100], TOO_BIG[100:]]), headers=JSON),
        413,
        f"{MAX_BODY_BYTES}-byte limit",
    ),
}


@pytest.mark.ray
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_naming_the_problem(client, case):
    """Each malformed request gets its specific 4xx and a JSON message naming the problem."""
    kwargs, status, words = BAD_REQUESTS[case]
    response = predict(client, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] and body["request_id"]
    assert words in body["message"], body["message"]
    assert "Traceback" not in response.text


@pytest.mark.ray
def test_unknown_route_and_method_get_json_errors(client):
    """Routing errors use the same JSON error shape as the contract's own errors."""
    assert client.get("/v1/nope").json()["error"] == "not_found"
    response = client.get("/v1/predict")
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"


@pytest.mark.ray
def test_api_key_is_required_on_v1_routes(server):
    """/v1/* answer 401 without the right bearer token; /healthz stays open for probes."""
    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        wrong = {"Authorization": "Bearer not-the-key"}
        basic = {"Authorization": f"Basic {API_KEY}"}
        for headers in ({}, wrong, basic):
            response = anonymous.post("/v1/predict", json={"text": "hi"}, headers=headers)
            assert response.status_code == 401
            assert "bearer token" in response.json()["message"]
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/v1/model").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.post("/v1/predict", json={"text": "hi"}, headers=AUTH).status_code == 200
        # the schema and docs pages list every route: behind the key as well
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert anonymous.get(path).status_code == 401
            assert anonymous.get(path, headers=AUTH).status_code == 200
        # an app without a key keeps them open, under its route prefix
        schema = anonymous.get("/ner/openapi.json")
        assert schema.status_code == 200 and "/v1/predict" in schema.json()["paths"]
        assert "/ner/openapi.json" in anonymous.get("/ner/docs").text


# --------------------------------------------------------------------------- overload, hot swap


@pytest.mark.ray
def test_overload_is_rejected_quickly_with_503(server):
    """Beyond max_ongoing + max_queued requests a slow model sheds load with fast 503s."""

    async def timed(c: httpx.AsyncClient, i: int) -> tuple[int, float, httpx.Headers]:
        start = time.monotonic()
        r = await c.post("/slow/v1/predict", json={"text": f"text {i}"})
        return r.status_code, time.monotonic() - start, r.headers

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(timed(c, i) for i in range(10)))

    results = asyncio.run(flood())
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}
    rejected = [(elapsed, headers) for status, elapsed, headers in results if status == 503]
    # 10 requests served one at a time would take 5 s; a rejection does not wait for any
    assert max(elapsed for elapsed, _ in rejected) < 2.0
    assert all(headers.get("retry-after") == "1" for _, headers in rejected)


@pytest.mark.ray
def test_unexpected_error_is_500_with_request_id_and_no_traceback(server, model_a):
    """An exception inside inference becomes a 500 naming the request id, not a traceback."""
    slow = server.apps["slow"]
    try:
        server.apps["slow"] = with_faults(slow, "fail")
        deploy({"http_options": server.http, "applications": list(server.apps.values())})
        with httpx.Client(base_url=server.url, timeout=60) as c:
            response = c.post("/slow/v1/predict", json={"text": "hi"})
    finally:
        server.apps["slow"] = slow
        deploy({"http_options": server.http, "applications": list(server.apps.values())})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal_error" and "request_id" in body["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text and "test fault" not in response.text


def replica_actor_names(app_name: str) -> set[str]:
    """Names of the app's live replica actors (Serve names each one with its unique id)."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in actors if a["name"].startswith(f"SERVE_REPLICA::{app_name}#")}


@pytest.mark.ray
def test_hot_swap_under_load_fails_no_request(server, client, model_a, model_b):
    """Swapping the model via user_config loses no request and each answer is one model's."""
    probe = "a fine film"
    reference = {
        "demo": offline_predictions(model_a, [probe])[0]["probs"],
        "demo-v2": offline_predictions(model_b, [probe])[0]["probs"],
    }
    replicas_before = replica_actor_names("tether")
    assert len(replicas_before) == 1

    async def load_during_swap() -> list[httpx.Response]:
        responses: list[httpx.Response] = []
        stop = asyncio.Event()

        async def keep_asking(c: httpx.AsyncClient):
            while not stop.is_set():
                responses.append(await c.post("/v1/predict", json={"texts": [probe]}))

        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=AUTH) as c:
            clients = [asyncio.create_task(keep_asking(c)) for _ in range(4)]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.redeploy, "tether", model_user_config(model_b))
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*clients)
        return responses

    try:
        responses = asyncio.run(load_during_swap())
        info = client.get("/v1/model").json()
    finally:
        server.redeploy("tether", model_user_config(model_a))  # the other tests expect model A

    assert [r.status_code for r in responses if r.status_code != 200] == []
    names = [r.json()["model"]["name"] for r in responses]
    assert names[0] == "demo" and names[-1] == "demo-v2", names
    for r in responses:  # weights, tokenizer and card change together
        served = r.json()["predictions"][0]["probabilities"]
        expected = reference[r.json()["model"]["name"]]
        assert [served["negative"], served["positive"]] == pytest.approx(expected, abs=1e-5)
    assert info["name"] == "demo-v2"
    assert replica_actor_names("tether") == replicas_before  # reconfigured in place, not restarted


@pytest.mark.ray
def test_champion_alias_move_and_reload_serves_the_new_version(
    server, client, model_a, model_b, tmp_path, monkeypatch
):
    """Serve models:/svc@champion; promote v2 and reload: /v1/model reports v2, no request fails."""
    from mlflow.tracking import MlflowClient

    from tether.registry import log_model, register_version
    from tether.serving.model import resolve_model_dir

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow_client = MlflowClient(tracking_uri=uri)
    exp = mlflow_client.create_experiment("serve", artifact_location=(tmp_path / "art").as_uri())
    for model_dir in (model_a, model_b):
        run_id = mlflow_client.create_run(exp).info.run_id
        register_version(mlflow_client, log_model(uri, run_id, model_dir), "svc", run_id, {})
    mlflow_client.set_registered_model_alias("svc", "champion", "1")
    champion = "models:/svc@champion"
    try:
        first = model_user_config(resolve_model_dir(None, champion), champion)
        assert (first["model_uri"], first["alias"]) == ("models:/svc/1", "champion")  # pinned
        assert first["tracking_uri"] == uri  # replicas on other nodes fetch from the same store
        server.redeploy("tether", first)
        before = client.get("/v1/model").json()
        mlflow_client.set_registered_model_alias("svc", "champion", "2")  # the alias moves

        async def ask_while_reloading() -> list[httpx.Response]:
            responses: list[httpx.Response] = []
            stop = asyncio.Event()

            async def keep_asking(c: httpx.AsyncClient):
                while not stop.is_set():
                    responses.append(await c.post("/v1/predict", json={"texts": ["fine"]}))

            async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=AUTH) as c:
                tasks = [asyncio.create_task(keep_asking(c)) for _ in range(3)]
                await asyncio.sleep(0.3)
                reloaded = model_user_config(resolve_model_dir(None, champion), champion)
                await asyncio.to_thread(server.redeploy, "tether", reloaded)
                await asyncio.sleep(0.3)
                stop.set()
                await asyncio.gather(*tasks)
            return responses

        responses = asyncio.run(ask_while_reloading())
        after = client.get("/v1/model").json()
    finally:
        server.redeploy("tether", model_user_config(model_a))  # the other tests expect model A
    assert (before["name"], before["version"], before["alias"]) == ("svc", "1", "champion")
    assert (after["name"], after["version"], after["alias"]) == ("svc", "2", "champion")
    assert after["run_id"] and after["run_id"] != before["run_id"]
    assert responses and all(r.status_code == 200 for r in responses)
    assert {r.json()["model"]["version"] for r in responses} <= {"1", "2"}
    assert not Path(first["model_dir"]).exists(), "the replaced download is cleaned up"


@pytest.mark.ray
def test_deploy_on_a_running_serve_with_another_port_is_refused(server):
    """Serve keeps its address: deploying for another port says so instead of lying."""
    from tether.serving.deploy import DeployError

    other = {**server.http, "port": free_port()}
    with pytest.raises(DeployError, match="already running on this cluster"):
        deploy({"http_options": other, "applications": list(server.apps.values())})


@pytest.mark.ray
def test_deploy_refuses_to_delete_apps_it_does_not_list(server):
    """Deploying a config without the cluster's other apps fails instead of deleting them."""
    from ray import serve

    from tether.serving.deploy import DeployError

    with pytest.raises(DeployError, match="ner.*slow|slow.*ner"):
        deploy({"http_options": server.http, "applications": [server.apps["tether"]]})
    assert {"tether", "slow", "ner"} <= set(serve.status().applications)


# --------------------------------------------------------------------------- config and CLI


def test_shipped_serve_config_builds_the_application():
    """serve/config.yaml validates as a Serve config and its import path builds an Application."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from tether.serving.app import ModelSource

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module_name, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    assert isinstance(builder(app["args"]), serve.Application)
    (deployment,) = app["deployments"]
    assert deployment["name"] == DEPLOYMENT_NAME
    ModelSource.from_user_config(deployment["user_config"])  # only keys the replica knows
    with pytest.raises(ValueError, match="unknown keys"):  # test switches are not part of it
        ModelSource.from_user_config({"model_dir": "x", "_test_fail": True})


def test_cli_print_config_matches_the_shipped_shape(model_a, capsys):
    """`tether serve --print-config` emits a deployable config with the resolved model."""
    from ray.serve.schema import ServeDeploySchema

    from tether.cli import main

    assert main(["serve", "--model-dir", str(model_a), "--autoscale", "1,3", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(config)
    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (app,), (shipped_app,) = config["applications"], shipped["applications"]
    assert app["import_path"] == shipped_app["import_path"]
    assert set(app["args"]) == set(shipped_app["args"])
    deployment = app["deployments"][0]
    assert deployment["autoscaling_config"]["max_replicas"] == 3
    assert deployment["user_config"]["model_dir"] == str(model_a.resolve())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model-uri", "runs:/abc/model"], "is not models:/NAME@ALIAS"),
        (["--model-dir", "/no/such/dir"], "is not a directory"),
        (["--model-dir", ".", "--autoscale", "3,1"], "autoscale"),
        (["--model-dir", ".", "--api-key-file", "/no/such/key"], "--api-key-file /no/such/key"),
    ],
)
def test_cli_rejects_unusable_models_before_starting_ray(argv, message, capsys):
    """Bad flags and unresolvable models exit 2 with a one-line reason, before any Ray work."""
    from tether.cli import main

    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_api_key_comes_from_a_file_or_the_environment_never_argv(tmp_path, monkeypatch):
    """`ps` shows argv to every local user: the key is read from --api-key-file (or
    TETHER_API_KEY) and only its hash reaches the app's config; there is no --api-key flag."""
    from tether.cli import build_parser
    from tether.serving.cli import options_from_args

    parser = build_parser()
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    monkeypatch.delenv("TETHER_API_KEY", raising=False)
    args = parser.parse_args(["serve", "--model-dir", ".", "--api-key-file", str(key_file)])
    assert options_from_args(args).api_key_sha256 == hashlib.sha256(b"k3y").hexdigest()
    monkeypatch.setenv("TETHER_API_KEY", "from-env")
    args = parser.parse_args(["serve", "--model-dir", "."])
    assert options_from_args(args).api_key_sha256 == hashlib.sha256(b"from-env").hexdigest()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model-dir", ".", "--api-key", "k3y"])


def test_cli_without_registry_module_says_to_use_model_dir(monkeypatch, capsys):
    """Without tether.registry, --model-uri exits 2 with the 'use --model-dir' message."""
    from tether.cli import main

    monkeypatch.setitem(sys.modules, "tether.registry", None)  # import now fails: not installed
    assert main(["serve", "--model-uri", "models:/demo@champion"]) == 2
    assert "MLflow registry support not installed yet; use --model-dir" in capsys.readouterr().err


def test_registry_identity_comes_from_uri_and_card():
    """Name/alias come from models:/NAME@ALIAS, version and run id from the card's registry block."""
    from tether.serving.model import registry_identity

    card = {"name": "demo", "registry": {"version": "7", "run_id": "abc123"}}
    assert registry_identity("models:/sentiment@champion", card, "dir") == {
        "name": "sentiment",
        "version": "7",
        "alias": "champion",
        "run_id": "abc123",
    }
    assert registry_identity(None, {"name": "demo"}, "dir") == {
        "name": "demo",
        "version": None,
        "alias": None,
        "run_id": None,
    }
    assert registry_identity("models:/sentiment/3", {}, "dir")["version"] == "3"


def test_cli_refuses_a_model_that_does_not_load(model_a, tmp_path, capsys):
    """Corrupt weights exit 2 in the CLI: deployed, they would take every replica down."""
    import shutil

    from tether.cli import main

    broken = shutil.copytree(model_a, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    assert main(["serve", "--model-dir", str(broken)]) == 2
    assert "does not load" in capsys.readouterr().err


def test_length_sorted_chunks_cover_every_text_within_the_token_budget():
    """Chunks hold every index once and pad to at most max_batch_tokens (unless one text is over)."""
    from tether.tasks.predict import length_sorted_chunks

    lengths = [5, 2, 90, 3, 40, 7, 2, 64]
    chunks = length_sorted_chunks([[0] * n for n in lengths], max_batch_tokens=64)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        padded = len(chunk) * max(lengths[i] for i in chunk)
        assert padded <= 64 or len(chunk) == 1
    assert [lengths[i] for i in chunks[0]] == [2, 2, 3, 5, 7]  # shortest first, together


# --------------------------------------------------------------------------- throughput mode


def _direct_ingress_ports(low: int = 30000, high: int = 31000) -> list[int]:
    """Loopback ports in Ray's direct-ingress range where a tether replica answers /healthz."""
    found = []
    for port in range(low, high + 1):
        with socket.socket() as s:
            s.settimeout(0.05)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                continue
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except httpx.HTTPError:
            continue
        if reply.status_code == 200 and reply.json().get("status") == "ok":
            found.append(port)
    return found


@pytest.mark.slow
def test_throughput_optimized_serve_runs_its_cluster_in_that_mode(model_a, tmp_path):
    """`tether serve --throughput-optimized --address local` starts its own cluster in Ray
    Serve's high-throughput mode: answers equal plain transformers through the usual port, and
    the replica also serves HTTP itself (direct ingress), on loopback only."""
    import os
    import subprocess

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TETHER_API_KEY")}
    argv = [sys.executable, "-m", "tether.cli", "serve", "--model-dir", str(model_a)]
    argv += ["--port", str(port), "--address", "local", "--throughput-optimized"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, tmp_path / "serve.log")
        response = httpx.post(f"{url}/v1/predict", json={"texts": TEXTS}, timeout=60)
        assert response.status_code == 200, response.text
        expected = offline_predictions(model_a, TEXTS)
        for served, reference in zip(response.json()["predictions"], expected, strict=True):
            probs = [served["probabilities"]["negative"], served["probabilities"]["positive"]]
            assert probs == pytest.approx(reference["probs"], abs=1e-5)
        assert _direct_ingress_ports(), "no replica serves HTTP directly: the mode is off"
    finally:
        stop_server(proc)
        log.close()


# --------------------------------------------------------------------------- fuzzing


def unicode_text(value) -> bool:
    """Every string in a JSON value is encodable UTF-8 (no unpaired surrogate)."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def fuzz_routes(
    url: str,
    headers: dict,
    mode: str,
    examples: int,
    error_keys=frozenset({"error", "message", "request_id"}),
) -> dict[str, int]:
    """Requests generated from the server's own /openapi.json, checked by schemathesis.

    Every route, schema-valid (``positive``) or schema-invalid (``negative``) bodies: no 5xx,
    every error has the JSON error shape, valid requests are accepted, invalid ones rejected,
    responses match their schema. Pinned seed (derandomize) and a bounded number of cases.
    Returns the status codes seen.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    raw = httpx.get(f"{url}/openapi.json", headers=headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    seen: dict[str, int] = {}
    for path, methods in raw["paths"].items():
        for method in methods:
            operation = schema[path][method.upper()]
            if mode == "negative" and not operation.body:  # nothing to get wrong in a GET
                continue

            @settings(
                max_examples=examples,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            @given(case=operation.as_strategy(generation_mode=generation))
            def check(case):
                if mode == "positive" and not unicode_text(case.body):
                    return  # lone surrogates fit "type: string" but are no Unicode text: a 400
                response = case.call(base_url=url, headers=headers, timeout=60)
                key = f"{case.method} {case.path} {response.status_code}"
                seen[key] = seen.get(key, 0) + 1
                assert response.status_code < 500, (case.body, response.text)
                if response.status_code >= 400 and response.status_code != 503:
                    body = response.json()
                    assert set(body) == set(error_keys), body
                if response.status_code == 413:  # over the byte limit: rejected, as it should be
                    return
                case.validate_response(response, headers=headers)

            check()
    return seen


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_from_the_published_schema_never_get_a_5xx(server, mode):
    """schemathesis on every route of the classification app (and the NER app below)."""
    seen = fuzz_routes(server.url, AUTH, mode, examples=40)
    print(mode, seen)
    if mode == "positive":
        assert seen.get("POST /v1/predict 200", 0) > 10, seen
        # the schema tells the truth: a body it allows is answered (or over the byte limit)
        refused = {k: n for k, n in seen.items() if k.split()[-1] not in ("200", "413")}
        assert refused == {}, refused
    else:
        assert any(k.startswith("POST /v1/predict 4") for k in seen), seen


@pytest.mark.ray
def test_ner_app_returns_entities_whose_offsets_slice_the_text(server, ner_model):
    """The token-classification app: entities with offsets into the original text (accents,
    CJK), the same tags for raw and pre-tokenized input, and its own schema published."""
    text = "Zoë Müller flew from 東京 to São Paulo with ACME Corp."
    with httpx.Client(base_url=f"{server.url}/ner", timeout=60) as c:
        raw = c.post("/v1/predict", json={"texts": [text, "plain words here"]})
        assert raw.status_code == 200, raw.text
        body = raw.json()
        assert body["model"]["name"] == "ner" and len(body["predictions"]) == 2
        entities = body["predictions"][0]["entities"]
        assert entities, "a confident random head tags something"
        for e in entities:
            assert text[e["start"] : e["end"]] == e["text"]
            assert e["type"] in {"LOC", "ORG", "PER", "MISC"} and 0 < e["score"] <= 1
        from tether.tasks.token_serving import WORD

        words = WORD.findall(text)
        pre = c.post("/v1/predict", json={"tokens": [words]}).json()["predictions"][0]["entities"]
        assert [(e["type"], e["word_start"], e["word_end"]) for e in pre] == [
            (e["type"], e["word_start"], e["word_end"]) for e in entities
        ]
        joined = " ".join(words)
        assert all(joined[e["start"] : e["end"]] == e["text"] for e in pre)
        assert c.post("/v1/predict", json={"tokens": [[]]}).status_code == 422
        schema = c.get("/openapi.json").json()
        body_schema = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"][
            "application/json"
        ]["schema"]
        assert {"Pretokenized", "OneText", "ManyTexts"} == {
            b["title"] for b in body_schema["anyOf"]
        }
        assert c.get("/v1/model").json()["task"] == "token-classification"


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("app, examples", [("ner", 30), ("qa", 25)])
def test_fuzzed_task_app_requests_never_get_a_5xx(server, app, examples, mode):
    """schemathesis on the NER and QA apps' routes, each from its own published schema."""
    seen = fuzz_routes(f"{server.url}/{app}", {}, mode, examples=examples)
    assert any(k.startswith("POST /v1/predict") for k in seen), seen
    if mode == "positive":  # every schema-valid body is answered (or over the byte limit)
        refused = {k: n for k, n in seen.items() if k.split()[-1] not in ("200", "413")}
        assert refused == {}, refused


@pytest.mark.ray
def test_qa_app_answers_with_offsets_that_slice_the_context(server, qa_model):
    """The question-answering app: one question or several, answers equal the offline
    predictor's, offsets slice the context (accents, CJK), a context longer than one window is
    read in several, a missing context is a 422 naming it, and its own schema is published."""
    from tether.tasks import task_for_card
    from tether.tasks.qa_serving import QAItem

    context = "Zoë Müller was born in Tarsk in 1871. Her brother moved to 東京 in 1902. " * 3
    items = [
        {"question": "Where was Zoë born?", "context": context},
        {"question": "When?", "context": "In 1871."},
    ]
    predictor = task_for_card(QA_CARD).predictor(qa_model, QA_CARD, 4096)
    offline = predictor.predict([QAItem(**i) for i in items])
    with httpx.Client(base_url=f"{server.url}/qa", timeout=60) as c:
        many = c.post("/v1/predict", json={"items": items})
        assert many.status_code == 200, many.text
        answers = many.json()["predictions"]
        one = c.post("/v1/predict", json=items[0]).json()["predictions"]
        assert one == answers[:1]
        for item, answer, reference in zip(items, answers, offline, strict=True):
            assert item["context"][answer["start"] : answer["end"]] == answer["answer"]
            assert answer["answer"] == reference.answer
            assert answer["score"] == pytest.approx(reference.score, rel=1e-4)
        assert answers[0]["windows"] > 1 and answers[1]["windows"] == 1
        missing = c.post("/v1/predict", json={"question": "Where?"})
        assert missing.status_code == 422 and "context" in missing.json()["message"]
        huge = [{"question": "Where?", "context": context * 25}] * 8  # ~370 windows
        refused = c.post("/v1/predict", json={"items": huge})
        assert refused.status_code == 422 and "windows" in refused.json()["message"]
        schema = c.get("/openapi.json").json()
        body_schema = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"][
            "application/json"
        ]["schema"]
        assert {"Question", "ManyQuestions"} == {b["title"] for b in body_schema["anyOf"]}
        assert c.get("/v1/model").json()["task"] == "question-answering"
