"""OpenAI-compatible generation on Ray Serve: chat and text completions, streamed or not.

    POST /v1/chat/completions   messages → an assistant message (or SSE chunks with stream)
    POST /v1/completions        prompt → text
    GET  /v1/models             the served model (its registry name, version and alias)
    GET  /v1/model              tether's view: task, objective, metrics (no server paths)
    GET  /v1/engine             batching counters (requests, decode steps, batch sizes)
    GET  /openapi.json, /docs, /redoc   the schema and its pages (behind the key, when set)
    GET  /healthz

Many LoRA adapters on one base (``user_config.adapters``): the request's ``model`` field
picks one (``NAME/VERSION`` or ``NAME@ALIAS`` of an allowed registered model, or a configured
id); the base is loaded once per replica, adapters on demand through Serve model multiplexing
(an LRU of ``max_adapters``), and requests for different adapters decode in the same batch
(``tether.serving.adapters``). Send the id in the ``serve_multiplexed_model_id`` header too
and Serve routes the request to a replica that already holds the adapter.

The official ``openai`` client works unchanged (``base_url=http://127.0.0.1:8000/v1``).
Prompts are rendered with the model's own chat template, as in training. Concurrent requests
share decode steps (``tether.serving.engine``: continuous batching, per-request sampling).
Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the same
4xx classes as OpenAI: 400 unparseable JSON, a prompt over the context limit, messages the
model's chat template cannot render (or a model without one) or a field that does not fit the
schema (``param`` names it; unknown fields are rejected, as OpenAI does), 401 no/wrong key,
404 an unknown model or route, 413 body too large, 415 not JSON, 503 overloaded. OpenAI fields this server does not implement (penalties, logprobs, logit_bias,
tools, JSON mode) are accepted at their neutral values, which SDKs send, and refused otherwise.

No ``from __future__ import annotations``: the replica class is pickled by value and FastAPI
must resolve route annotations from real objects.
"""

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tether.errors import ModelSourceError
from tether.serving.adapters import (
    AdapterCatalog,
    AdapterPool,
    adapter_for_request,
    load_adapter,
    refuse_adapter_toggle,
    refuse_base_swap,
)
from tether.serving.contract import (
    OPENAPI_PATH,
    RequestError,
    check_content_type,
    check_declared_length,
    docs_page,
    parse_json,
    read_limited_body,
    request_body_openapi,
    validate_body,
)
from tether.serving.engine import Delta, Failed, Finished, Overloaded, Sampling, TransformersEngine

ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}


# --------------------------------------------------------------------------- schemas


def _integral(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds):
    """An integer as JSON Schema means it (2.0 included; strict pydantic would refuse it).
    The bounds come before the validator, or pydantic drops them from the published schema."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def request_models(max_items: int, max_chars: int, max_tokens: int):
    """The chat and completion request bodies, with the server's limits in the schema."""
    Text = Annotated[str, StringConstraints(max_length=max_chars)]
    Prompt = Annotated[str, StringConstraints(min_length=1, max_length=max_chars)]
    Stop = Annotated[str, StringConstraints(min_length=1, max_length=64)]
    Tokens = json_int(ge=1, le=max_tokens)

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        type: Literal["text"]
        text: Text  # type: ignore[valid-type]

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        role: Literal["system", "developer", "user", "assistant"]
        content: Text | Annotated[list[TextPart], Field(max_length=max_items)]  # type: ignore[valid-type]
        name: str | None = None

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        include_usage: bool = False

    class ResponseFormat(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        type: Literal["text"]

    class Common(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        model: str | None = Field(None, description="the served model's id (GET /v1/models)")
        max_tokens: Tokens | None = None  # type: ignore[valid-type]
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        # the item limit on the list itself: on the union it would bind strings, not arrays
        stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None  # type: ignore[valid-type]
        seed: json_int(ge=0, le=2**63 - 1) | None = None  # type: ignore[valid-type]
        n: json_int(ge=1, le=1) | None = Field(None, description="one choice per request")  # type: ignore[valid-type]
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = Field(None, max_length=256)
        metadata: (
            Annotated[
                dict[str, Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)
            ]
            | None
        ) = None  # type: ignore[valid-type]
        # accepted at their neutral values only (see contract.NEUTRAL_ONLY)
        frequency_penalty: float | None = Field(None, ge=0, le=0)
        presence_penalty: float | None = Field(None, ge=0, le=0)
        logprobs: Literal[False] | None = None
        top_logprobs: json_int(ge=0, le=0) | None = None  # type: ignore[valid-type]
        logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
        response_format: ResponseFormat | None = None
        tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
        tool_choice: Literal["none"] | None = None
        parallel_tool_calls: bool | None = None
        store: Literal[False] | None = None

    class ChatCompletionRequest(Common):
        messages: list[Message] = Field(min_length=1, max_length=max_items)
        max_completion_tokens: Tokens | None = None  # type: ignore[valid-type]

    class CompletionRequest(Common):
        prompt: Prompt  # type: ignore[valid-type]

    return ChatCompletionRequest, CompletionRequest


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    tether: dict[str, Any] = Field(default_factory=dict, description="batch size seen, time-out")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    tether: dict[str, Any] = Field(default_factory=dict)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tether"
    version: str | None = None
    alias: str | None = None
    parent: str | None = None  # an adapter's base


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: OpenAIError
    request_id: str | None = None


ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "unparseable JSON, a prompt over the model's context length, messages the chat "
        "template cannot render, or a body that does not fit the schema (param names the field)",
        401: "missing or wrong bearer token",
        404: "unknown model",
        413: "body over the byte limit",
        415: "not application/json",
        500: "unexpected error (see request_id in the server log)",
        503: "model not loaded, or the service is overloaded",
    }.items()
}


def openai_error(
    status: int, code: str, message: str, request_id: str, param: str | None = None
) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {
        "error": {"message": message, "type": kind, "param": param, "code": code},
        "request_id": request_id,
    }
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _openai_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404/405 and friends in OpenAI's error shape, like every other error of these routes."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = openai_error(
        exc.status_code, code, str(exc.detail), request.headers.get("x-request-id") or ""
    )
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------- requests → prompts


def message_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def chat_prompt_ids(predictor, messages: list[dict[str, str]]) -> list[int]:
    """The messages rendered with the model's chat template, as token ids. A model without a
    template, or a template that refuses these messages (``raise_exception``: roles that do not
    alternate, say), is the request's fault: a 400 naming ``messages``, not a 500."""
    try:
        return predictor.chat_prompt(messages)
    except ModelSourceError as e:  # no chat template
        raise RequestError(400, "chat_template_missing", str(e), "messages") from None
    except TemplateError as e:
        raise RequestError(
            400,
            "chat_template_error",
            f"the model's chat template cannot render these messages: {e}",
            "messages",
        ) from None


def requested_max_tokens(body) -> tuple[str, int] | None:
    """The completion length the client sent, and the field it sent it in (None: unsent)."""
    for field in ("max_completion_tokens", "max_tokens"):
        tokens = getattr(body, field, None)
        if tokens is not None:
            return field, tokens
    return None


def completion_budget(
    asked: tuple[str, int] | None,
    prompt_tokens: int,
    context_tokens: int,
    default_tokens: int,
    prompt_param: str,
) -> int:
    """Tokens to generate: what the client asked for (``requested_max_tokens``), if prompt and
    completion fit the context; else (nothing asked) the default cut to the room the prompt
    leaves, as OpenAI and vLLM do. A 400 context_length_exceeded when they do not fit or no
    room is left."""
    room = context_tokens - prompt_tokens
    if asked is None:
        if room < 1:
            raise RequestError(
                400,
                "context_length_exceeded",
                f"this model's maximum context length is {context_tokens} tokens and the "
                f"prompt has {prompt_tokens} tokens: no room is left for a completion",
                prompt_param,
            )
        return min(default_tokens, room)
    field, tokens = asked
    if tokens > room:
        raise RequestError(
            400,
            "context_length_exceeded",
            f"this model's maximum context length is {context_tokens} tokens; the prompt has "
            f"{prompt_tokens} tokens and {field} asks for {tokens}",
            field if room > 0 else prompt_param,  # the prompt alone is too long
        )
    return tokens


def sampling_from(body, max_new_tokens: int, timeout_s: float) -> Sampling:
    stop = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
    return Sampling(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(stop),
        seed=body.seed,
        timeout_s=timeout_s,
    )


# --------------------------------------------------------------------------- the deployment


def make_generation_deployment(args):
    """The Serve deployment for a causal LM (``args``: tether.serving.app.AppArgs)."""
    from tether.serving.app import (
        _env_key_sha256,
        _set_torch_threads,
        authorize,
        replica_threads,
    )
    from tether.serving.deploy import DEPLOYMENT_NAME
    from tether.serving.model import ServedModel

    limits = args.limits()
    ChatRequest, CompletionRequest = request_models(
        limits.max_items, limits.max_chars, args.max_new_tokens
    )
    api = FastAPI(
        title="tether",
        description="OpenAI-compatible generation with a model fine-tuned by tether.",
        openapi_url=None,  # the replica serves the schema and docs, behind its key
    )
    api.add_exception_handler(StarletteHTTPException, _openai_http_error)
    chat_example = {
        "messages": [{"role": "user", "content": "What is the sentiment of: a gripping film?"}],
        "max_tokens": 16,
    }
    completion_example = {"prompt": "The capital of France is", "max_tokens": 8}

    @serve.deployment(
        name=DEPLOYMENT_NAME,
        max_ongoing_requests=64,
        max_queued_requests=64,
        ray_actor_options={"num_cpus": 1},
        health_check_period_s=10,
    )
    @serve.ingress(api)
    class TetherGenerator:
        def __init__(self, app_args):
            from tether.serving.app import ModelSource  # noqa: F401  (user_config schema)

            self.args = app_args
            key = app_args.api_key_sha256 or _env_key_sha256()
            self.api_key_sha256 = key.lower() if key else None
            self.model: ServedModel | None = None
            self.engine: TransformersEngine | None = None
            self.source = None
            self.catalog: AdapterCatalog | None = None
            _set_torch_threads(replica_threads())

        async def reconfigure(self, user_config: dict[str, Any]) -> None:
            from tether.serving.app import ModelSource, _same_model

            source = ModelSource.from_user_config(user_config)
            catalog = AdapterCatalog.from_config(source.adapters)
            if self.model is not None:
                refuse_adapter_toggle(self.engine.pool is not None, catalog)
            if self.model is not None and _same_model(self.source, source):
                self.source, self.catalog = source, catalog  # the allowed adapters may change
                return
            refuse_base_swap(self.catalog is not None)
            model = await asyncio.to_thread(self._load, source)
            pool = AdapterPool(model.predictor) if catalog is not None else None
            engine = TransformersEngine(
                model.predictor, self.args.max_batch_size, self.args.max_waiting, pool=pool
            )
            from tether.serving.app import discard_download

            old, old_model = self.engine, self.model
            # the swap: new requests go to the new engine; running ones finish on the old
            self.model, self.engine, self.source = model, engine, source
            self.catalog = catalog
            if old is not None:
                old.retire()
                discard_download(old_model)

        @serve.multiplexed(max_num_models_per_replica=args.max_adapters)
        async def get_adapter(self, model_id: str):
            """One adapter on this replica's base (Serve keeps the last ``max_adapters``)."""
            return await load_adapter(
                self.engine.pool, self.catalog, model_id, self.source.tracking_uri
            )

        async def _adapter(self, model_id: str):
            """The loaded adapter for ``model_id``, as a RequestError when it cannot be."""
            return await adapter_for_request(
                self.engine.pool,
                self.catalog,
                self.get_adapter,
                model_id,
                "model",
                self.source.tracking_uri,
            )

        def _load(self, source) -> ServedModel:
            from tether.serving.app import load_source

            return load_source(source, self.args.task)

        def check_health(self) -> None:
            if self.model is None:
                raise RuntimeError("no model loaded")

        # ------------------------------------------------------------- request path

        def _loaded(self) -> tuple[ServedModel, TransformersEngine]:
            if self.model is None or self.engine is None:
                raise RequestError(503, "model_not_loaded", "no model is loaded yet")
            return self.model, self.engine

        async def _body(self, request: Request, schema):
            authorize(request, self.api_key_sha256)
            check_content_type(request.headers.get("content-type"))
            check_declared_length(request.headers.get("content-length"), limits.max_body_bytes)
            raw = await read_limited_body(request.stream(), limits.max_body_bytes)
            return validate_body(parse_json(raw, limits.max_json_depth), schema)

        async def _check_model(self, model: ServedModel, requested: str | None):
            """The name a response reports and the adapter to decode with (None: the model)."""
            info = model.info
            if requested is None or requested in info.names():
                return info.name, None
            if self.catalog is None:
                raise RequestError(
                    404,
                    "model_not_found",
                    f"model {requested!r} is not served here (serving {info.name!r})",
                    "model",
                )
            return requested, await self._adapter(requested)

        async def _submit(self, engine, prompt, sampling, adapter, model_id):
            """Queue the sequence; an adapter evicted since it was fetched is fetched again."""
            for _ in range(3):
                try:
                    return engine.submit(prompt, sampling, adapter=adapter)
                except RuntimeError:  # unloaded by the LRU in between: load it again
                    adapter = await self._adapter(model_id)
            return engine.submit(prompt, sampling, adapter=adapter)

        def _max_new_tokens(self, model: ServedModel, body, prompt: list[int], kind: str) -> int:
            default = min(model.predictor.default_max_tokens, self.args.max_new_tokens)
            prompt_param = "messages" if kind == "chat" else "prompt"
            limit = model.predictor.max_length
            asked = requested_max_tokens(body)
            return completion_budget(asked, len(prompt), limit, default, prompt_param)

        async def _generate(self, request: Request, schema, render, kind: str):
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            try:
                body = await self._body(request, schema)
                model, engine = self._loaded()
                name, adapter = await self._check_model(model, body.model)
                # off the event loop: a 1 MB body takes ~0.6 s to tokenize, and every stream
                # of this replica would stall for it
                prompt = await asyncio.to_thread(render, model, body)
                sampling = sampling_from(
                    body,
                    self._max_new_tokens(model, body, prompt, kind),
                    self.args.request_timeout_s,
                )
                try:
                    sequence = await self._submit(engine, prompt, sampling, adapter, body.model)
                except Overloaded as e:
                    raise RequestError(
                        503, "overloaded", f"the server is busy ({e}); retry shortly"
                    ) from None
            except RequestError as e:
                # OpenAI answers a body that does not fit its schema with 400, naming the param
                status = 400 if e.status == 422 else e.status
                return openai_error(status, e.error, e.message, request_id, e.param)
            except ClientDisconnect:
                return openai_error(
                    400, "client_disconnected", "request body incomplete", request_id
                )
            except Exception:
                from tether.serving.app import logger

                logger.exception(f"tether: request {request_id} failed")
                return openai_error(
                    500,
                    "internal_error",
                    "unexpected server error; quote the request_id",
                    request_id,
                )
            created, rid = (
                int(time.time()),
                f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}",
            )
            if body.stream:
                usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(
                    stream_events(sequence, kind, rid, created, name, usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Request-ID": request_id},
                )
            try:
                text, finished = await collect(sequence)
            except asyncio.CancelledError:
                sequence.cancel()  # the client left: stop decoding for it
                raise
            if isinstance(finished, Failed):
                return openai_error(
                    500, "internal_error", "generation failed; quote the request_id", request_id
                )
            return JSONResponse(complete_body(kind, rid, created, name, text, finished))

        @api.post(
            "/v1/chat/completions",
            response_model=ChatCompletion,
            responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
            openapi_extra=request_body_openapi(ChatRequest, chat_example),
        )
        async def chat_completions(self, request: Request):
            """An assistant reply to ``messages``, rendered with the model's chat template."""

            def render(model, body):
                messages = [
                    {
                        "role": "system" if m.role == "developer" else m.role,
                        "content": message_text(m.content),
                    }
                    for m in body.messages
                ]
                return chat_prompt_ids(model.predictor, messages)

            return await self._generate(request, ChatRequest, render, "chat")

        @api.post(
            "/v1/completions",
            response_model=Completion,
            responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
            openapi_extra=request_body_openapi(CompletionRequest, completion_example),
        )
        async def completions(self, request: Request):
            """A continuation of ``prompt`` (plain text, no chat template)."""
            return await self._generate(
                request,
                CompletionRequest,
                lambda model, body: model.predictor.encode(body.prompt),
                "text",
            )

        @api.get("/v1/models", response_model=ModelList, responses=ERRORS)
        async def models(self, request: Request):
            """The served model, as OpenAI's model list."""
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            try:
                authorize(request, self.api_key_sha256)
                model, _ = self._loaded()
            except RequestError as e:
                # OpenAI answers a body that does not fit its schema with 400, naming the param
                status = 400 if e.status == 422 else e.status
                return openai_error(status, e.error, e.message, request_id, e.param)
            info = model.info
            card = {
                "id": info.name,
                "created": int(info.loaded_at),
                "version": info.version,
                "alias": info.alias,
            }
            data = [ModelCard(**card).model_dump()]
            if self.catalog is not None:  # the configured adapters; registered ones by request
                data += [
                    ModelCard(id=i, created=int(info.loaded_at), parent=info.name).model_dump()
                    for i in sorted(self.catalog.dirs)
                ]
            return JSONResponse({"object": "list", "data": data})

        @api.get("/v1/model", responses=ERRORS)
        async def model_info(self, request: Request):
            """tether's description of the served model: task, objective, eval metrics."""
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            try:
                authorize(request, self.api_key_sha256)
                model, _ = self._loaded()
            except RequestError as e:
                # OpenAI answers a body that does not fit its schema with 400, naming the param
                status = 400 if e.status == 422 else e.status
                return openai_error(status, e.error, e.message, request_id, e.param)
            return JSONResponse(model.info.public())

        @api.get("/v1/engine", responses=ERRORS)
        async def engine_stats(self, request: Request):
            """Batching counters: requests, decode steps, the largest batch, cancellations."""
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            try:
                authorize(request, self.api_key_sha256)
                _, engine = self._loaded()
            except RequestError as e:
                # OpenAI answers a body that does not fit its schema with 400, naming the param
                status = 400 if e.status == 422 else e.status
                return openai_error(status, e.error, e.message, request_id, e.param)
            return JSONResponse(engine.stats())

        @api.get(OPENAPI_PATH, include_in_schema=False)
        @api.get(api.docs_url, include_in_schema=False)
        @api.get(api.redoc_url, include_in_schema=False)
        async def api_docs(self, request: Request):
            """The OpenAPI schema and its Swagger UI and ReDoc pages, behind the key as /v1/*."""
            try:
                authorize(request, self.api_key_sha256)
            except RequestError as e:
                request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
                return openai_error(e.status, e.error, e.message, request_id, e.param)
            return docs_page(request)

        @api.get("/healthz")
        async def healthz(self):
            """200 when a model is loaded (no token needed)."""
            if self.model is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            return JSONResponse({"status": "ok", "model": self.model.info.name})

    return TetherGenerator


async def collect(sequence) -> tuple[str, Finished | Failed]:
    text = []
    async for event in sequence.events():
        if isinstance(event, Delta):
            text.append(event.text)
        else:
            return "".join(text), event
    raise RuntimeError("the engine ended a sequence without finishing it")


def usage_of(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def complete_body(
    kind: str, rid: str, created: int, name: str, text: str, finished: Finished
) -> dict:
    reason = "length" if finished.reason == "length" else "stop"
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": name,
        "choices": [choice],
        "usage": usage_of(finished),
        "tether": {"max_batch": finished.max_batch, "timed_out": finished.timed_out},
    }


async def stream_events(
    sequence, kind: str, rid: str, created: int, name: str, include_usage: bool
):
    """Server-Sent Events as OpenAI sends them; a client that leaves cancels the sequence."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: dict | None, text: str | None, reason: str | None) -> dict:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        if kind == "chat":
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice]}

    try:
        if kind == "chat":
            yield sse(chunk({"role": "assistant", "content": ""}, None, None))
        async for event in sequence.events():
            if isinstance(event, Delta):
                yield sse(chunk({"content": event.text}, event.text, None))
                continue
            if isinstance(event, Failed):  # OpenAI streams an error as one event
                yield sse(
                    {
                        "error": {
                            "message": "generation failed",
                            "type": "server_error",
                            "param": None,
                            "code": "internal_error",
                        }
                    }
                )
                break
            reason = "length" if event.reason == "length" else "stop"
            yield sse(chunk({}, "", reason))
            if include_usage:
                yield sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": name,
                        "choices": [],
                        "usage": usage_of(event),
                    }
                )
        yield "data: [DONE]\n\n"
    finally:
        sequence.cancel()  # a no-op when it finished; stops decoding when the client left
