"""Many LoRA adapters on one base: mixed-adapter batches equal each merged model, an evicted
adapter waits for its running requests, lineage is checked; and on a real Ray Serve, two
tether-trained adapters (one from the MLflow registry, one from a folder) answer through the
OpenAI routes with the base loaded once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from tether.serving.adapters import (
    AdapterCatalog,
    AdapterMismatch,
    AdapterPool,
    AdapterSource,
    UnknownAdapter,
)
from tether.serving.engine import Delta, Finished, Sampling, TransformersEngine
from tether.tasks.causal_lm import CausalLM

from .helpers import free_port


def random_adapter(base_dir: Path, out: Path, seed: int, targets: list[str], r: int) -> Path:
    """A LoRA adapter with random (non-zero) factors and the card tether's export writes:
    θ*'s hash computed as training computes it."""
    from peft import LoraConfig, get_peft_model

    from tether.adapters import frozen_base
    from tether.anchor import weights_hash

    torch.manual_seed(seed)
    model = CausalLM().load_model(str(base_dir), None, False).model
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(out)
    card = {
        "name": out.name,
        "task": "causal-lm",
        "objective": {
            "base_model": str(base_dir),
            "theta_star_sha256": weights_hash(frozen_base(peft, set())),
        },
    }
    (out / "tether.json").write_text(json.dumps(card))
    merged = peft.merge_and_unload()
    merged.save_pretrained(out / "merged")
    CausalLM().load_tokenizer(str(base_dir), None, False).save_pretrained(out / "merged")
    (out / "merged" / "tether.json").write_text(json.dumps({"task": "causal-lm"}))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = random_adapter(tiny_llama_dir, root / "a", 1, ["q_proj", "v_proj", "down_proj"], 4)
    b = random_adapter(tiny_llama_dir, root / "b", 2, ["k_proj", "o_proj", "up_proj"], 8)
    return a, b


def base_lm(model_dir: Path):
    return CausalLM().predictor(model_dir, {"task": "causal-lm"})


def with_adapter(base_dir: Path, adapter_dir: Path):
    """The base with the adapter applied by peft, offline: the served path's reference."""
    from peft import PeftModel

    lm = base_lm(base_dir)
    lm.model = PeftModel.from_pretrained(lm.model, str(adapter_dir)).eval()
    return lm


def greedy(lm, prompt: list[int], n: int) -> str:
    return lm.decode(lm.offline_greedy(prompt, n))


async def answer(engine, prompt, adapter=None, n=10) -> tuple[str, Finished]:
    parts, end = [], None
    async for event in engine.submit(prompt, Sampling(max_new_tokens=n), adapter=adapter).events():
        if isinstance(event, Delta):
            parts.append(event.text)
        else:
            end = event
    return "".join(parts), end


def test_requests_for_two_adapters_and_the_base_share_steps_and_equal_each_merged_model(
    tiny_llama_dir, adapters
):
    """Three rows in one batch — adapter a, adapter b, the base — each decode what their
    own merged model decodes alone; the base weights are held once."""
    lm = base_lm(tiny_llama_dir)
    prompt = lm.chat_prompt([{"role": "user", "content": "Tell me something."}])
    expected = [greedy(base_lm(d / "merged"), prompt, 10) for d in adapters] + [
        greedy(lm, prompt, 10)
    ]
    assert len(set(expected)) == 3  # the adapters do change the answer

    async def run():
        pool = AdapterPool(lm)
        engine = TransformersEngine(lm, max_batch=4, pool=pool)
        loaded = [await pool.load(AdapterSource(d.name, folder=str(d)), d) for d in adapters]
        texts = await asyncio.gather(
            answer(engine, prompt, loaded[0]),
            answer(engine, prompt, loaded[1]),
            answer(engine, prompt),
        )
        return [t for t, _ in texts], engine.stats()

    texts, stats = asyncio.run(run())
    assert texts == expected
    assert stats["batched_steps"] > 0 and stats["max_batch"] == 3
    assert stats["base_loads"] == 1 and stats["adapter_loads"] == 2


def test_an_evicted_adapter_stays_until_its_request_ends_then_leaves(tiny_llama_dir, adapters):
    """Serve's LRU evicts (calls __del__) while a request still decodes with the adapter: the
    request finishes with the adapter's answer, then the factors are removed; removing the
    last adapter gives back the plain base model."""
    from peft import PeftModel

    lm = base_lm(tiny_llama_dir)
    prompt = lm.chat_prompt([{"role": "user", "content": "Tell me something."}])
    expected = greedy(base_lm(adapters[0] / "merged"), prompt, 12)

    async def run():
        pool = AdapterPool(lm)
        engine = TransformersEngine(lm, max_batch=4, pool=pool)
        adapter = await pool.load(AdapterSource("a", folder=str(adapters[0])), adapters[0])
        running = asyncio.create_task(answer(engine, prompt, adapter, n=12))
        await asyncio.sleep(0)  # submitted, not finished
        adapter.__del__()  # what Serve's LRU does on eviction
        assert pool.loaded  # still there: a request holds it
        text, end = await running
        await asyncio.get_running_loop().run_in_executor(engine.executor, lambda: None)  # drain
        with pytest.raises(RuntimeError, match="unloaded"):
            engine.submit(prompt, Sampling(max_new_tokens=2), adapter=adapter)
        return text, end, pool

    text, end, pool = asyncio.run(run())
    assert text == expected and end.completion_tokens > 0
    assert not pool.loaded and pool.counters["adapter_unloads"] == 1
    assert not isinstance(pool.model, PeftModel)  # the base's own modules are back


def test_a_load_cancelled_while_injecting_leaves_no_adapter_behind(tiny_llama_dir, adapters):
    """A client that goes away while its adapter is being injected cancels the load before
    Serve's LRU holds the adapter: once the injection is done, the factors are removed again
    (nothing else would ever evict them)."""
    import threading

    from peft import PeftModel

    lm = base_lm(tiny_llama_dir)

    async def run():
        pool = AdapterPool(lm)
        engine = TransformersEngine(lm, max_batch=4, pool=pool)
        injecting, proceed = threading.Event(), threading.Event()
        inject = pool._inject

        def slow_inject(adapter, folder):
            injecting.set()
            proceed.wait(30)
            inject(adapter, folder)

        pool._inject = slow_inject
        load = asyncio.create_task(
            pool.load(AdapterSource("a", folder=str(adapters[0])), adapters[0])
        )
        await asyncio.to_thread(injecting.wait, 30)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        proceed.set()
        for _ in range(2):  # the injection, then the removal it queues
            await asyncio.get_running_loop().run_in_executor(engine.executor, lambda: None)
        return pool

    pool = asyncio.run(run())
    assert pool.counters["adapter_loads"] == 1 and pool.counters["adapter_unloads"] == 1
    assert not pool.loaded and not isinstance(pool.model, PeftModel)


def test_a_download_cancelled_before_it_lands_is_deleted(tiny_llama_dir, adapters, monkeypatch):
    """A client that goes away while its registered adapter is being downloaded cancels the
    load, but not the download thread: the folder it lands in is deleted all the same."""
    import shutil
    import tempfile
    import threading

    import tether.serving.adapters as serving_adapters

    download = Path(tempfile.mkdtemp(prefix="tether-model-"))  # what the registry fetch makes
    shutil.copytree(adapters[0], download / "adapter")
    fetching, proceed = threading.Event(), threading.Event()

    def slow_fetch(source, tracking_uri):
        fetching.set()
        proceed.wait(30)
        return download / "adapter"

    monkeypatch.setattr(serving_adapters, "fetch_adapter", slow_fetch)

    async def run():
        pool = AdapterPool(base_lm(tiny_llama_dir))
        catalog = AdapterCatalog(registered=["chat"])
        load = asyncio.create_task(serving_adapters.load_adapter(pool, catalog, "chat/3", None))
        await asyncio.to_thread(fetching.wait, 30)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        proceed.set()
        for _ in range(200):  # the download lands, then its folder goes
            if not download.exists():
                break
            await asyncio.sleep(0.01)
        return pool

    try:
        pool = asyncio.run(run())
        assert not download.exists() and not pool.loaded
    finally:
        shutil.rmtree(download, ignore_errors=True)


def test_a_cancelled_row_is_ended_on_the_event_loop_not_the_model_thread(tiny_llama_dir, adapters):
    """A client that leaves mid-decode: its sequence's end (an asyncio.Queue put) and its
    adapter's release happen on the event loop, never on the decode thread (neither is
    thread-safe); the row decoding beside it answers as it would alone."""
    import threading

    lm = base_lm(tiny_llama_dir)
    prompt = lm.chat_prompt([{"role": "user", "content": "Tell me something."}])
    alone = greedy(lm, prompt, 12)  # before any adapter is injected into lm's modules
    released_on = []

    async def run():
        pool = AdapterPool(lm)
        engine = TransformersEngine(lm, max_batch=4, pool=pool)
        adapter = await pool.load(AdapterSource("a", folder=str(adapters[0])), adapters[0])
        release = adapter.release

        def recording_release():
            released_on.append(threading.current_thread())
            release()

        adapter.release = recording_release
        beside = asyncio.create_task(answer(engine, prompt, n=12))
        leaving = engine.submit(prompt, Sampling(max_new_tokens=200), adapter=adapter)
        while len(leaving.generated) < 2 and not leaving.finish:
            await asyncio.sleep(0.005)
        leaving.cancel()
        events = [e async for e in leaving.events()]
        return events[-1], await beside, engine.stats()

    end, (text, _), stats = asyncio.run(run())
    assert isinstance(end, Finished) and end.reason == "cancelled"
    assert released_on == [threading.main_thread()]  # asyncio.run's loop thread
    assert stats["cancelled"] == 1
    assert text == alone


def test_a_failed_prefill_fails_its_own_request_only(tiny_llama_dir):
    """A prompt whose prefill fails (out of memory on a long prompt, say) ends its own
    request with an error; the request admitted beside it answers as it would alone."""
    from tether.serving.engine import Failed

    lm = base_lm(tiny_llama_dir)
    prompt = lm.chat_prompt([{"role": "user", "content": "Tell me something."}])
    doomed = lm.chat_prompt([{"role": "user", "content": "This prompt is far too long."}])
    alone = greedy(lm, prompt, 10)

    async def run():
        engine = TransformersEngine(lm, max_batch=4)
        model = engine.model

        def failing_on_doomed(**inputs):
            if inputs["input_ids"][0].tolist() == doomed:
                raise RuntimeError("out of memory (simulated)")
            return model(**inputs)

        engine.model = failing_on_doomed
        good = asyncio.create_task(answer(engine, prompt))
        bad = engine.submit(doomed, Sampling(max_new_tokens=10))
        events = [e async for e in bad.events()]
        return events[-1], await good, engine.stats()

    end, (text, finished), stats = asyncio.run(run())
    assert isinstance(end, Failed) and "out of memory" in end.message
    assert text == alone and finished.reason == "length"
    assert stats["failed_prefills"] == 1 and stats.get("failed_steps", 0) == 0


def adapter_of_another_base(adapter: Path, out: Path) -> Path:
    """``adapter``'s files with a card naming another θ* (another base)."""
    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    card = json.loads((adapter / "tether.json").read_text())
    card["objective"]["theta_star_sha256"] = "0" * 64
    (out / "tether.json").write_text(json.dumps(card))
    return out


def test_an_adapter_of_another_base_or_an_unknown_id_is_refused(tiny_llama_dir, adapters, tmp_path):
    lm = base_lm(tiny_llama_dir)
    pool = AdapterPool(lm)
    other = adapter_of_another_base(adapters[0], tmp_path / "other")
    with pytest.raises(AdapterMismatch, match="another base"):
        asyncio.run(pool.load(AdapterSource("other", folder=str(other)), other))
    assert not pool.loaded

    catalog = AdapterCatalog(registered=["chat"], dirs={"support": str(adapters[0])})
    assert catalog.locate("support").folder == str(adapters[0])
    assert catalog.locate("chat/3").model_uri == "models:/chat/3"
    assert catalog.locate("models:/chat@champion").model_uri == "models:/chat@champion"
    for unknown in ("other/1", "chat", "support/1", "../chat/1"):
        with pytest.raises(UnknownAdapter, match="not served here"):
            catalog.locate(unknown)
    with pytest.raises(ValueError, match="unknown keys"):
        AdapterCatalog.from_config({"registred": ["chat"]})
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        AdapterCatalog.from_config({"dirs": {"x": str(tmp_path)}})


def test_an_adapter_bound_to_fail_is_refused_before_the_multiplexed_loader(
    tiny_llama_dir, adapters, tmp_path
):
    """Serve's multiplexed loader evicts its least recently used adapter before it loads: an
    adapter of another base is refused (400) before the loader is called; a good one is
    loaded once, and a request for it while it is loaded goes straight to the loader's cache."""
    from tether.serving.adapters import adapter_for_request
    from tether.serving.contract import RequestError

    other = adapter_of_another_base(adapters[0], tmp_path / "other")
    pool = AdapterPool(base_lm(tiny_llama_dir))
    catalog = AdapterCatalog(dirs={"other": str(other), "a": str(adapters[0])})
    asked: list[str] = []

    async def get_adapter(model_id):  # what @serve.multiplexed wraps
        asked.append(model_id)
        source = catalog.locate(model_id)
        return await pool.load(source, Path(source.folder))

    async def request(model_id):
        return await adapter_for_request(pool, catalog, get_adapter, model_id, "model", None)

    with pytest.raises(RequestError) as refused:
        asyncio.run(request("other"))
    assert refused.value.status == 400 and "another base" in refused.value.message
    assert asked == []
    assert asyncio.run(request("a")).model_id == "a" and pool.holds("a")
    assert asked == ["a"]


# --------------------------------------------------------------------------- on Ray Serve


def trained_adapter(tiny_llama_dir: Path, root: Path, name: str, reply: str, db: Path | None):
    """A tether LoRA run on the tiny Llama that teaches one reply (registered when ``db``)."""
    from tether.config import validate_job
    from tether.run import run_training

    from .test_causal_lm import lm_job, write_jsonl

    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": reply},
            ]
        }
        for i in range(48)
    ]
    job = lm_job(
        tiny_llama_dir,
        str(write_jsonl(root / f"{name}.jsonl", chats)),
        root / "runs",
        model={"adapter": {"r": 8, "alpha": 16.0}},
        objective={"lambda": 0.01},
        optim={"lr": 1e-2},
        train={"epochs": 6, "eval_interval": 1000},
        eval={"generate_examples": 4},
        storage={"run_name": name},
    )
    job["name"] = name
    if db is not None:
        job["tracking"] = {
            "uri": f"sqlite:///{db}",
            "experiment": "adapters",
            "registered_model": name,
        }
    return Path(run_training(validate_job(job), register=db is not None).summary["model_dir"])


@pytest.mark.ray
@pytest.mark.slow
def test_two_trained_adapters_are_served_on_one_base_through_the_openai_routes(
    ray_cluster, tiny_llama_dir, tmp_path
):
    """A registered adapter (models:/chat-hi/1, only its adapter/ folder fetched) and a
    folder adapter, on the tiny base: concurrent requests for both and the base decode
    together, each equal to its merged export offline; the base is loaded once; an unknown
    or unallowed model is a 404 naming it; the LRU (max 1) unloads and reloads correctly."""
    from ray import serve

    from tether.serving.deploy import ServeOptions, application_config, deploy, http_options

    db = tmp_path / "mlflow.db"
    hi = trained_adapter(tiny_llama_dir, tmp_path, "chat-hi", "tether says hi.", db)
    bye = trained_adapter(tiny_llama_dir, tmp_path, "chat-bye", "goodbye from two.", None)
    question = "Question number 7?"
    lm = base_lm(tiny_llama_dir)
    prompt = lm.chat_prompt([{"role": "user", "content": question}])
    expected = {
        "chat-hi/1": greedy(with_adapter(tiny_llama_dir, hi / "adapter"), prompt, 8),
        "bye": greedy(with_adapter(tiny_llama_dir, bye / "adapter"), prompt, 8),
        tiny_llama_dir.name: greedy(lm, prompt, 8),
    }
    # the merged exports say the taught replies too (their untaught tails may differ by
    # rounding: W + s·B·A folded vs applied apart, on a tiny random model's near-ties)
    assert expected["chat-hi/1"].startswith("tether says hi.")
    assert greedy(base_lm(hi), prompt, 8).startswith("tether says hi.")
    assert expected["bye"].startswith("goodbye from two.")
    assert greedy(base_lm(bye), prompt, 8).startswith("goodbye from two.")

    port = free_port()
    options = ServeOptions(
        task="causal-lm",
        port=port,
        app_name="adapters",
        max_new_tokens=16,
        request_timeout_s=120,
        extra_args={"max_adapters": 1},
    )
    user_config = {
        "model_dir": str(tiny_llama_dir),
        "tracking_uri": f"sqlite:///{db}",
        "adapters": {"registered": ["chat-hi"], "dirs": {"bye": str(bye)}},
    }
    config = {
        "http_options": http_options(options),
        "applications": [application_config(options, user_config)],
    }
    serve.start(http_options=config["http_options"])
    try:
        deploy(config)
        url = f"http://127.0.0.1:{port}"

        async def ask(client, model):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 8,
                "temperature": 0,  # greedy: OpenAI's default samples
            }
            r = await client.post("/v1/chat/completions", json=body, timeout=120)
            return r

        async def ask_all(models):
            async with httpx.AsyncClient(base_url=url) as client:
                return await asyncio.gather(*(ask(client, m) for m in models))

        with httpx.Client(base_url=url) as client:
            # max_adapters = 1: hi, then bye (hi evicted), then hi again (reloaded)
            for model in ("chat-hi/1", "bye", "chat-hi@champion", tiny_llama_dir.name):
                r = asyncio.run(ask_all([model]))[0]
                assert r.status_code == 200, r.text
                key = "chat-hi/1" if model.startswith("chat-hi") else model
                got = r.json()["choices"][0]["message"]["content"]
                assert got == expected[key], (model, client.get("/v1/engine").json())
                assert r.json()["model"] == model
            stats = client.get("/v1/engine").json()
            assert stats["base_loads"] == 1
            assert stats["adapter_loads"] == 3 and stats["adapter_unloads"] == 2

            before = stats["batched_steps"]
            together = asyncio.run(ask_all(["chat-hi/1", "chat-hi/1", tiny_llama_dir.name]))
            for model, r in zip(
                ["chat-hi/1", "chat-hi/1", tiny_llama_dir.name], together, strict=True
            ):
                assert r.json()["choices"][0]["message"]["content"] == expected[model]
            assert client.get("/v1/engine").json()["batched_steps"] > before

            kept = client.get("/v1/engine").json()
            for unknown in ("chat-bye/1", "nope", "chat-hi/9"):
                r = asyncio.run(ask_all([unknown]))[0]
                assert r.status_code == 404, (unknown, r.text)
                assert (
                    r.json()["error"]["param"] == "model"
                    and unknown in r.json()["error"]["message"]
                )
            # refused before Serve's loader, which evicts first: the loaded adapter stays
            after = client.get("/v1/engine").json()
            assert after["adapters_loaded"] == kept["adapters_loaded"] == ["chat-hi/1"]
            assert after["adapter_unloads"] == kept["adapter_unloads"]
            listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert listed == [tiny_llama_dir.name, "bye"]
    finally:
        serve.shutdown()


def test_tether_serve_builds_an_adapter_deployment_and_refuses_bad_adapter_flags(
    tiny_llama_dir, adapters, tmp_path, capsys
):
    """--base + --adapter print the Serve config with user_config.adapters (the base needs
    no tether card); a malformed or missing adapter, or --base alone, exit 2 before Ray."""
    import yaml

    from tether.cli import main

    base = ["serve", "--base", str(tiny_llama_dir), "--print-config"]
    assert main([*base, "--adapter", f"a={adapters[0]}", "--max-adapters", "3"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    app = config["applications"][0]
    assert app["args"]["task"] == "causal-lm" and app["args"]["max_adapters"] == 3
    user_config = app["deployments"][0]["user_config"]
    assert user_config["model_dir"] == str(tiny_llama_dir.resolve())
    assert user_config["adapters"] == {"registered": [], "dirs": {"a": str(adapters[0])}}

    for flags, message in (
        (["--adapter", "a"], "expected ID=DIR"),
        (["--adapter", f"a={tmp_path}"], "no LoRA adapter"),
        ([], "--base serves LoRA adapters"),
        (["--adapter", f"a={adapters[0]}", "--quantize"], "does not combine"),
    ):
        assert main([*base, *flags]) == 2, flags
        assert message in capsys.readouterr().err
