"""The OpenAI-compatible generation endpoint on a real local Ray Serve (tiny Llama): answers
equal offline greedy generate, streaming, the openai client, batching, disconnects, bad input,
hot swap and fuzzing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest

from tether.serving.deploy import (
    ServeOptions,
    application_config,
    deploy,
    http_options,
    model_user_config,
)

from .helpers import free_port

pytestmark = [pytest.mark.ray]
API_KEY = "gen-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_NEW = 24


def llm_dir(base: Path, out: Path, name: str, seed: int) -> Path:
    """The tiny Llama, reseeded, with a causal-lm card (no training needed)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, out, dirs_exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    card = {
        "name": name,
        "task": "causal-lm",
        "max_length": 128,
        "generation": {"max_new_tokens": 16},
    }
    (out / "tether.json").write_text(json.dumps(card))
    return out


@pytest.fixture(scope="module")
def llm_a(tiny_llama_dir, tmp_path_factory):
    return llm_dir(tiny_llama_dir, tmp_path_factory.mktemp("llm-a"), "tiny-chat", 1)


@pytest.fixture(scope="module")
def llm_b(tiny_llama_dir, tmp_path_factory):
    return llm_dir(tiny_llama_dir, tmp_path_factory.mktemp("llm-b"), "tiny-chat-v2", 2)


@pytest.fixture(scope="module")
def offline(llm_a):
    """Plain transformers generate on the same folder: the reference."""
    from tether.tasks.causal_lm import CausalLM

    return CausalLM().predictor(llm_a, {"task": "causal-lm"})


@pytest.fixture(scope="module")
def server(ray_cluster, llm_a):
    from ray import serve

    port = free_port()
    options = ServeOptions(
        task="causal-lm",
        port=port,
        app_name="llm",
        max_batch_size=8,
        max_new_tokens=MAX_NEW,
        max_texts=8,
        max_chars=5000,
        max_body_bytes=40_000,
        num_cpus=1,
        request_timeout_s=120,
        api_key_sha256=hashlib.sha256(API_KEY.encode()).hexdigest(),
    )
    config = {
        "http_options": http_options(options),
        "applications": [application_config(options, model_user_config(llm_a))],
    }
    serve.start(http_options=config["http_options"])
    try:
        deploy(config)
        yield type(
            "Server", (), {"url": f"http://127.0.0.1:{port}", "config": config, "options": options}
        )
    finally:
        serve.shutdown()


def chat(client, content: str, **extra) -> httpx.Response:
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 12,
    } | extra
    return client.post("/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def reference(offline, content: str, max_tokens: int = 12) -> str:
    prompt = offline.chat_prompt([{"role": "user", "content": content}])
    return offline.decode(offline.offline_greedy(prompt, max_tokens)), len(prompt)


def test_chat_answers_equal_offline_greedy_generate_with_right_usage(server, offline):
    """Non-streamed and streamed answers equal transformers' generate on the same prompt."""
    with httpx.Client(base_url=server.url) as c:
        response = chat(c, "Tell me about tea.")
        assert response.status_code == 200, response.text
        body = response.json()
        want, prompt_tokens = reference(offline, "Tell me about tea.")
        assert body["object"] == "chat.completion" and body["model"] == "tiny-chat"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
        assert body["usage"]["prompt_tokens"] == prompt_tokens
        # the same token count as generate's ids, and "length" exactly when it hit the cap
        prompt = offline.chat_prompt([{"role": "user", "content": "Tell me about tea."}])
        ids = offline.offline_greedy(prompt, 12)
        assert body["usage"]["completion_tokens"] == len(ids)
        assert body["choices"][0]["finish_reason"] == ("length" if len(ids) == 12 else "stop")
        assert body["usage"]["total_tokens"] == prompt_tokens + body["usage"]["completion_tokens"]
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Tell me about tea."}],
                "temperature": 0,
                "max_tokens": 12,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers=AUTH,
            timeout=120,
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in stream.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
        text = "".join(
            ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]
        )
        assert text == want
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["usage"] == body["usage"] and chunks[-2]["choices"][0][
            "finish_reason"
        ] in ("stop", "length")


def test_completions_route_continues_plain_text(server, offline):
    with httpx.Client(base_url=server.url) as c:
        r = c.post(
            "/v1/completions",
            json={"prompt": "The sky is", "max_tokens": 8, "temperature": 0},
            headers=AUTH,
            timeout=120,
        )
    assert r.status_code == 200, r.text
    want = offline.decode(offline.offline_greedy(offline.encode("The sky is"), 8))
    assert r.json()["choices"][0]["text"] == want and r.json()["object"] == "text_completion"


def test_the_official_openai_client_works_unchanged(server, offline):
    """openai.OpenAI(base_url=.../v1): chat and completions, streamed and not, and models."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(
        model="tiny-chat",
        messages=messages,
        temperature=0,
        max_tokens=10,
        # what SDKs and tools send at their neutral values: accepted, no effect
        frequency_penalty=0,
        presence_penalty=0,
        logprobs=False,
        response_format={"type": "text"},
        metadata={"team": "tests"},
    )
    want, _ = reference(offline, "Name a colour.", 10)
    assert reply.choices[0].message.content == want
    streamed = client.chat.completions.create(
        model="tiny-chat", messages=messages, temperature=0, max_tokens=10, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == want
    text = client.completions.create(model="tiny-chat", prompt="Once", max_tokens=6, temperature=0)
    once = offline.decode(offline.offline_greedy(offline.encode("Once"), 6))
    assert text.choices[0].text == once
    chunks = client.completions.create(
        model="tiny-chat", prompt="Once", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == once
    with pytest.raises(Exception) as err:
        client.chat.completions.create(model="gpt-4", messages=messages)
    assert getattr(err.value, "status_code", None) == 404
    with pytest.raises(Exception) as err:  # a bad field: 400 naming it, as OpenAI answers
        client.chat.completions.create(model="tiny-chat", messages=messages, presence_penalty=1)
    assert (err.value.status_code, err.value.body["param"]) == (400, "presence_penalty")
    with httpx.Client(base_url=server.url, headers=AUTH) as c:  # unknown routes too
        r = c.get("/v1/embeddings")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_requests_decode_together_and_answer_as_alone(server, offline):
    """Eight greedy requests at once share decode steps, and each text equals its solo text."""
    questions = [f"Question {i}: what do you think of item {i}?" for i in range(8)]

    async def ask_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=AUTH) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/v1/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": q}],
                            "temperature": 0,
                            "max_tokens": 16,
                        },
                    )
                    for q in questions
                )
            )

    with httpx.Client(base_url=server.url, headers=AUTH) as c:
        before = c.get("/v1/engine").json()
    responses = asyncio.run(ask_all())
    assert all(r.status_code == 200 for r in responses)
    for q, r in zip(questions, responses):
        assert r.json()["choices"][0]["message"]["content"] == reference(offline, q, 16)[0]
    assert max(r.json()["tether"]["max_batch"] for r in responses) > 1
    with httpx.Client(base_url=server.url, headers=AUTH) as c:
        after = c.get("/v1/engine").json()
    assert after["batched_steps"] > before["batched_steps"]


def test_sampling_is_per_request_and_reproducible_with_a_seed(server):
    """A seeded sampled request repeats itself, beside greedy requests in the same batch."""
    with httpx.Client(base_url=server.url) as c:
        one = chat(c, "Say something.", temperature=1.2, seed=7, max_tokens=10).json()
        two = chat(c, "Say something.", temperature=1.2, seed=7, max_tokens=10).json()
        greedy = chat(c, "Say something.", max_tokens=10).json()
    assert one["choices"][0]["message"] == two["choices"][0]["message"]
    assert one["choices"][0]["message"] != greedy["choices"][0]["message"]


def test_stop_strings_end_the_answer_before_them(server, offline):
    with httpx.Client(base_url=server.url) as c:
        full = chat(c, "Count.", max_tokens=16).json()["choices"][0]["message"]["content"]
        word = full.split()[1] if len(full.split()) > 1 else full[2:4]
        cut = chat(c, "Count.", max_tokens=16, stop=[word]).json()
    assert cut["choices"][0]["message"]["content"] == full[: full.find(word)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    """Closing the stream after two chunks cancels the sequence: the counter moves and no
    decode steps are spent on it afterwards."""
    with httpx.Client(base_url=server.url, headers=AUTH) as c:
        before = c.get("/v1/engine").json()
        body = {
            "messages": [{"role": "user", "content": "A long story please."}],
            "temperature": 0,
            "max_tokens": MAX_NEW,
            "stream": True,
        }
        with c.stream("POST", "/v1/chat/completions", json=body, timeout=120) as stream:
            for i, _ in enumerate(stream.iter_lines()):
                if i >= 2:
                    break
        deadline = time.monotonic() + 30
        while True:
            after = c.get("/v1/engine").json()
            if after["cancelled"] > before["cancelled"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens"] - before["tokens"] < MAX_NEW


BAD = {
    # name: (body or raw bytes, status, words)
    "malformed_json": (b'{"messages": [', 400, "malformed JSON"),
    "not_an_object": ([1, 2], 400, "JSON object"),
    "no_messages": ({"model": "tiny-chat"}, 400, "messages"),
    "empty_messages": ({"messages": []}, 400, "messages"),
    "unknown_role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    "content_not_text": ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    "image_part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        400,
        "type",
    ),
    "negative_max_tokens": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
        400,
        "max_tokens",
    ),
    "huge_max_tokens": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
        400,
        f"less than or equal to {MAX_NEW}",
    ),
    "temperature_high": (
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 3},
        400,
        "temperature",
    ),
    "top_p_zero": ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    "n_two": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    "unknown_field": (
        {"messages": [{"role": "user", "content": "hi"}], "temprature": 0.5},
        400,
        "temprature: unknown field",
    ),
    "penalty_not_neutral": (
        {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5},
        400,
        "frequency_penalty: not supported by this server: only 0 is accepted",
    ),
    "tools_given": (
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        400,
        "tools: not supported by this server",
    ),
    "json_mode": (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
    "stop_five": (
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
    ),
    "wrong_model": (
        {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "'gpt-4' is not served",
    ),
    "over_context": (
        {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4},
        400,
        "maximum context length is 512",
    ),
    "over_context_no_max_tokens": (  # no max_tokens was sent: the message claims none
        {"messages": [{"role": "user", "content": "word " * 600}]},
        400,
        "no room is left for a completion",
    ),
    "nan_temperature": (
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        "NaN",
    ),
    "surrogate": (
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "unpaired surrogate",
    ),
    "too_large": ({"messages": [{"role": "user", "content": "x" * 1900}] * 25}, 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_in_openai_error_shape(server, case):
    body, status, words = BAD[case]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        if isinstance(body, bytes):
            r = c.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
        else:
            r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] and error["code"]
    if case in PARAM:  # a field error names the field, as OpenAI's do
        assert (error["type"], error["param"]) == ("invalid_request_error", PARAM[case])


PARAM = {
    "unknown_role": "messages[0].role",
    "negative_max_tokens": "max_tokens",
    "temperature_high": "temperature",
    "top_p_zero": "top_p",
    "n_two": "n",
    "unknown_field": "temprature",
    "penalty_not_neutral": "frequency_penalty",
    "tools_given": "tools",
    "stop_five": "stop",
    "over_context_no_max_tokens": "messages",
}


def test_wrong_content_type_and_missing_key_are_refused(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert (
            c.post(
                "/v1/chat/completions", content=b"{}", headers=AUTH | {"Content-Type": "text/plain"}
            ).status_code
            == 415
        )
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models").status_code == 401 and c.get("/healthz").status_code == 200
        for path in ("/openapi.json", "/docs", "/redoc"):  # the docs are behind the key too
            assert c.get(path).status_code == 401
            assert c.get(path, headers=AUTH).status_code == 200


def test_hot_swap_to_a_new_model_fails_no_request(server, llm_b):
    """A new user_config swaps the model in place while requests keep coming."""

    async def load():
        results = []
        stop = asyncio.Event()

        async def keep_asking(c):
            while not stop.is_set():
                results.append(
                    await c.post(
                        "/v1/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": "hi"}],
                            "temperature": 0,
                            "max_tokens": 4,
                        },
                    )
                )

        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=AUTH) as c:
            tasks = [asyncio.create_task(keep_asking(c)) for _ in range(3)]
            await asyncio.sleep(0.5)
            app = server.config["applications"][0]
            swapped = {
                **app,
                "deployments": [{**app["deployments"][0], "user_config": model_user_config(llm_b)}],
            }
            await asyncio.to_thread(
                deploy, {"http_options": server.config["http_options"], "applications": [swapped]}
            )
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
        return results

    try:
        results = asyncio.run(load())
    finally:
        deploy(server.config)  # back to model A for the other tests
    assert results and all(r.status_code == 200 for r in results)
    names = [r.json()["model"] for r in results]
    assert names[0] == "tiny-chat" and names[-1] == "tiny-chat-v2"


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_generation_requests_never_get_a_5xx(server, mode):
    """schemathesis on every generation route, from the app's own published schema."""
    from .test_serve import fuzz_routes

    seen = fuzz_routes(server.url, AUTH, mode, examples=15, error_keys={"error", "request_id"})
    assert any(k.startswith("POST /v1/chat/completions") for k in seen), seen


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(offline):
    """An exception in a model step ends the sequences in that step with Failed (a 500), and
    the next request is served normally: no request hangs."""
    from tether.serving.engine import Failed, Finished, Sampling, TransformersEngine

    engine = TransformersEngine(offline, max_batch=4)
    real, calls = engine.model, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step after a prefill
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    engine.model = flaky
    prompt = offline.chat_prompt([{"role": "user", "content": "hi"}])

    async def run():
        first = [e async for e in engine.submit(prompt, Sampling(max_new_tokens=6)).events()]
        second = [e async for e in engine.submit(prompt, Sampling(max_new_tokens=6)).events()]
        return first, second

    first, second = asyncio.run(run())
    assert isinstance(first[-1], Failed) and "boom" in first[-1].message
    assert isinstance(second[-1], Finished) and second[-1].completion_tokens > 0


def test_the_engine_times_out_sheds_load_and_samples_per_request_in_one_batch(offline):
    """A request past its time limit ends with length and timed_out; a full waiting queue
    refuses at once (the 503); greedy and seeded sampled requests decoding in the same batch
    each give what they give alone."""
    import time as clock

    from tether.serving.engine import Delta, Finished, Overloaded, Sampling, TransformersEngine

    prompt = offline.chat_prompt([{"role": "user", "content": "Tell me a story."}])

    async def text_of(engine, sampling):
        parts, end = [], None
        async for event in engine.submit(prompt, sampling).events():
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                end = event
        return "".join(parts), end

    async def timed_out():
        engine = TransformersEngine(offline, max_batch=2)
        real = engine.model

        def slow(*args, **kwargs):  # every step takes 50 ms
            clock.sleep(0.05)
            return real(*args, **kwargs)

        engine.model = slow
        return await text_of(engine, Sampling(max_new_tokens=200, timeout_s=0.2))

    _, end = asyncio.run(timed_out())
    assert isinstance(end, Finished) and end.reason == "length" and end.timed_out
    assert 0 < end.completion_tokens < 200

    async def overloaded():
        engine = TransformersEngine(offline, max_batch=1, max_waiting=2)
        engine.submit(prompt, Sampling(max_new_tokens=2))
        engine.submit(prompt, Sampling(max_new_tokens=2))
        with pytest.raises(Overloaded):
            engine.submit(prompt, Sampling(max_new_tokens=2))

    asyncio.run(overloaded())

    greedy = Sampling(max_new_tokens=10, temperature=0.0)
    sampled = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)

    async def alone(sampling):
        return await text_of(TransformersEngine(offline, max_batch=4), sampling)

    async def together():
        engine = TransformersEngine(offline, max_batch=4)
        results = await asyncio.gather(text_of(engine, greedy), text_of(engine, sampled))
        return results, engine.stats()

    (g, s), stats = asyncio.run(together())
    assert stats["batched_steps"] > 0  # they did share decode steps
    assert g[0] == asyncio.run(alone(greedy))[0]
    assert s[0] == asyncio.run(alone(sampled))[0]
    assert g[0] != s[0]
