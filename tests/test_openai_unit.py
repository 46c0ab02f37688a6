"""The serving replicas in process, without Ray Serve: each deployment class's own FastAPI app
driven through httpx's ASGI transport, on the tiny Llama (and the tiny BERT for /v1/predict).
Chat-template failures are 400s naming messages, an unsent max_tokens fits the context the
prompt leaves, prompts render off the event loop, the docs need the key when one is set, and
a live deployment refuses to gain or lose its adapters."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tether.serving.deploy import model_user_config

# Serve's ingress wrapper has an async __del__ (its ASGI lifespan shutdown), which plain garbage
# collection outside a replica can only create, not await
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine .*ASGIIngressWrapper.__del__' was never awaited:RuntimeWarning"
)
KEY = "unit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEEP = "keep"  # causal_lm_dir: keep the tokenizer's own chat template
DOCS = ("/openapi.json", "/docs", "/redoc")


def causal_lm_dir(base: Path, out: Path, chat_template: str | None = KEEP) -> Path:
    """The tiny Llama with a causal-lm card; ``chat_template`` replaces the tokenizer's own
    (None: no template at all)."""
    from transformers import AutoTokenizer

    shutil.copytree(base, out)
    if chat_template != KEEP:
        tokenizer = AutoTokenizer.from_pretrained(out)
        (out / "chat_template.jinja").unlink(missing_ok=True)
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out)
    (out / "tether.json").write_text(json.dumps({"name": "tiny-chat", "task": "causal-lm"}))
    return out


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, tmp_path_factory) -> Path:
    return causal_lm_dir(tiny_llama_dir, tmp_path_factory.mktemp("llm") / "model")


@contextlib.asynccontextmanager
async def serving(monkeypatch, make, args, user_config: dict):
    """A replica of the deployment ``make(args)`` builds, configured with ``user_config``, and a
    client that reaches its routes as Serve's proxy would (no Ray started)."""
    import torch
    from ray import serve

    import tether.serving.app as app_module

    # Ray's CPU count for the replica would start Ray: keep this process's torch threads
    monkeypatch.setattr(app_module, "replica_threads", torch.get_num_threads)
    monkeypatch.delenv(app_module.API_KEY_ENV, raising=False)
    wrapper = make(args).func_or_class  # the class @serve.ingress made around ours
    replica = wrapper.__new__(wrapper)
    await replica.__init__(args)
    # Serve hands each route its replica through the replica context
    monkeypatch.setattr(
        serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica)
    )
    await replica.reconfigure(user_config)
    transport = httpx.ASGITransport(app=replica.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        yield replica, client


def generation_args(api_key: str | None = KEY, **overrides):
    from tether.serving.app import AppArgs

    key_sha256 = hashlib.sha256(api_key.encode()).hexdigest() if api_key else None
    return AppArgs(task="causal-lm", max_new_tokens=24, api_key_sha256=key_sha256, **overrides)


def generator(monkeypatch, model_dir: Path, api_key: str | None = KEY, adapters=None):
    from tether.serving.openai import make_generation_deployment

    config = model_user_config(model_dir) | ({"adapters": adapters} if adapters else {})
    return serving(monkeypatch, make_generation_deployment, generation_args(api_key), config)


def chat_body(content: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0} | extra


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "template, words",
    [
        (None, "has no chat template"),
        ("{{ raise_exception('roles must alternate user/assistant') }}", "roles must alternate"),
    ],
    ids=["no_template", "template_refuses"],
)
def test_messages_the_chat_template_cannot_render_are_a_400_naming_messages(
    tiny_llama_dir, tmp_path, monkeypatch, template, words
):
    """A model without a chat template, or one whose template raises on these messages, is
    the request's problem (400 invalid_request_error, param messages), not a 500."""
    model_dir = causal_lm_dir(tiny_llama_dir, tmp_path / "model", chat_template=template)

    async def ask():
        async with generator(monkeypatch, model_dir) as (_, client):
            return await client.post(
                "/v1/chat/completions", json=chat_body("hi", max_tokens=2), headers=AUTH
            )

    response = asyncio.run(ask())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages")
    assert words in error["message"]


def test_rendering_a_prompt_leaves_the_event_loop_free(llm, monkeypatch):
    """While one request's prompt is tokenized (~0.6 s for a 1 MB body), the replica's event
    loop goes on: other requests and streams are served meanwhile."""
    rendering, loop_ran, seen = threading.Event(), threading.Event(), []

    async def note_when_the_loop_runs():
        while not rendering.is_set():
            await asyncio.sleep(0.005)
        loop_ran.set()  # reached only if the loop runs while the prompt is being rendered

    async def ask():
        async with generator(monkeypatch, llm) as (replica, client):
            predictor = replica.model.predictor
            encode = predictor.encode

            def slow_encode(text):  # holds the render until the loop shows it still runs
                rendering.set()
                seen.append(loop_ran.wait(2))
                return encode(text)

            predictor.encode = slow_encode
            watcher = asyncio.create_task(note_when_the_loop_runs())
            response = await client.post(
                "/v1/chat/completions", json=chat_body("hi", max_tokens=2), headers=AUTH
            )
            await watcher
            return response

    response = asyncio.run(ask())
    assert response.status_code == 200, response.text
    assert seen == [True]


def test_without_max_tokens_a_long_prompt_gets_the_room_the_context_leaves(llm, monkeypatch):
    """As OpenAI and vLLM do: an unsent max_tokens is the default cut to the room the prompt
    leaves; only a prompt that leaves no room is refused, and without claiming a max_tokens
    nobody sent. A max_tokens that was sent is still checked as sent."""

    async def ask():
        async with generator(monkeypatch, llm) as (replica, client):
            predictor = replica.model.predictor
            limit = predictor.max_length

            def prompt_of(tokens: int) -> str:
                text = "hello" + " hello" * (tokens - 1)
                assert len(predictor.encode(text)) == tokens
                return text

            def complete(tokens: int, **extra):
                body = {"prompt": prompt_of(tokens), "temperature": 0} | extra
                return client.post("/v1/completions", json=body, headers=AUTH)

            # the default (max_new_tokens 24) would not fit beside a prompt 5 tokens short
            fits, full = await complete(limit - 5), await complete(limit)
            return limit, fits, full, await complete(limit - 5, max_tokens=8)

    limit, fits, full, asked = asyncio.run(ask())
    assert fits.status_code == 200, fits.text
    usage = fits.json()["usage"]
    assert usage["prompt_tokens"] == limit - 5 and 1 <= usage["completion_tokens"] <= 5
    assert full.status_code == 400
    error = full.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"maximum context length is {limit}" in error["message"]
    assert "max_tokens" not in error["message"]
    assert asked.status_code == 400
    assert "max_tokens asks for 8" in asked.json()["error"]["message"]


# --------------------------------------------------------------------------- docs and config


def test_the_generation_docs_need_the_key_when_one_is_set(llm, monkeypatch):
    """/openapi.json, /docs and /redoc answer 401 without the key like /v1/*, and the schema
    with it; with no key configured they stay open. /healthz is always open."""

    async def fetch(api_key):
        async with generator(monkeypatch, llm, api_key=api_key) as (_, client):
            anonymous = [(await client.get(path)).status_code for path in DOCS]
            keyed = [await client.get(path, headers=AUTH) for path in DOCS]
            return anonymous, keyed, (await client.get("/healthz")).status_code

    anonymous, keyed, health = asyncio.run(fetch(KEY))
    assert anonymous == [401, 401, 401] and health == 200
    assert [r.status_code for r in keyed] == [200, 200, 200]
    paths = keyed[0].json()["paths"]
    assert "/v1/chat/completions" in paths and not set(DOCS) & set(paths)
    assert "/openapi.json" in keyed[1].text and "/openapi.json" in keyed[2].text

    anonymous, _, _ = asyncio.run(fetch(None))
    assert anonymous == [200, 200, 200]


def test_the_predict_docs_need_the_key_when_one_is_set(tiny_model_dir, tmp_path, monkeypatch):
    """The same on the /v1/predict app: 401 in its own error shape without the key."""
    from tether.serving.app import AppArgs, make_deployment

    from .test_serve import build_model_dir

    model_dir = build_model_dir(tiny_model_dir, tmp_path / "model", "demo", seed=1)
    args = AppArgs(api_key_sha256=hashlib.sha256(KEY.encode()).hexdigest())

    async def fetch():
        async with serving(monkeypatch, make_deployment, args, model_user_config(model_dir)) as (
            _,
            client,
        ):
            anonymous = [await client.get(path) for path in DOCS]
            keyed = [(await client.get(path, headers=AUTH)).status_code for path in DOCS]
            schema = (await client.get("/openapi.json", headers=AUTH)).json()
            return anonymous, keyed, schema

    anonymous, keyed, schema = asyncio.run(fetch())
    assert [r.status_code for r in anonymous] == [401, 401, 401]
    assert anonymous[0].json()["error"] == "unauthorized"
    assert keyed == [200, 200, 200] and "/v1/predict" in schema["paths"]


def test_a_live_generation_deployment_refuses_to_gain_or_lose_its_adapters(llm, monkeypatch):
    """The base is loaded for adapters (a pool beside it) or not: a user_config that adds or
    removes ``adapters`` on the same model is refused (a new application), instead of 500s on
    every adapter request; changing which adapters are allowed is fine."""

    async def run():
        config = model_user_config(llm)
        async with generator(monkeypatch, llm) as (replica, _):
            with pytest.raises(ValueError, match="cannot be added to or removed"):
                await replica.reconfigure(config | {"adapters": {"registered": ["chat"]}})
            assert replica.catalog is None
        async with generator(monkeypatch, llm, adapters={"registered": ["chat"]}) as (replica, _):
            with pytest.raises(ValueError, match="cannot be added to or removed"):
                await replica.reconfigure(config)
            await replica.reconfigure(config | {"adapters": {"registered": ["chat", "bot"]}})
            assert replica.catalog.registered == ["chat", "bot"]

    asyncio.run(run())
