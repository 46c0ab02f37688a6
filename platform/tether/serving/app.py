"""The Ray Serve application: a FastAPI ingress over a batching replica, for any task.

    POST /v1/predict   the task's request body → the task's predictions (+ model, batch_size)
    GET  /v1/model     name, version, alias, run id, task, objective (λ, mode), eval metrics
    GET  /healthz      200 once a model is loaded
    GET  /docs         OpenAPI: the request and prediction schemas of the served task
                       (/docs, /redoc, /openapi.json need the API key too, when one is set)

Items from concurrent requests (texts, sentences) share forward passes: each item is one entry
of a ``@serve.batch`` queue (at most ``max_batch_size`` per pass), so a request of 3 texts and
five requests of 1 text can run as one batch of 8. The model is set by ``user_config``
({"model_dir", "model_uri"}); ``reconfigure`` loads a new one fully, then swaps one reference,
so requests in flight finish on the model they started with.

The app is built per task (``AppArgs.task``, read from the model card by ``tether serve``), so
the published schema is exactly what the server enforces.

No ``from __future__ import annotations`` here: the replica class is pickled by value, and
FastAPI must resolve the route annotations (``Request``) from real objects, not strings.

Deploy it with ``tether serve`` or ``serve deploy serve/config.yaml`` (import path
``tether.serving.app:app_builder``).
"""

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tether.card import read_card
from tether.serving.adapters import (
    AdapterCatalog,
    HeadAdapterPool,
    adapter_for_request,
    load_adapter,
    refuse_adapter_toggle,
    refuse_base_swap,
)
from tether.serving.contract import (
    ERROR_RESPONSES,
    OPENAPI_PATH,
    RequestError,
    RequestLimits,
    check_content_type,
    check_declared_length,
    docs_page,
    error_body,
    model_ref,
    parse_json,
    read_limited_body,
    request_body_openapi,
    response_model,
    validate_body,
)
from tether.serving.deploy import DEPLOYMENT_NAME
from tether.serving.model import (
    ServedModel,
    base_card,
    card_task,
    load_served_model,
    resolve_model_dir,
)
from tether.tasks import TASKS, task_class
from tether.tasks.predict import DEFAULT_MAX_BATCH_TOKENS, ItemsRefused

API_KEY_ENV = "TETHER_API_KEY"
# Serve's model multiplexing header: it picks the adapter, and Serve routes the request to a
# replica that holds it already
ADAPTER_HEADER = "serve_multiplexed_model_id"
logger = logging.getLogger("ray.serve")


class AppArgs(BaseModel):
    """Builder arguments (``args:`` in serve/config.yaml). Fixed for the app's lifetime."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field("sequence-classification", description=f"one of {sorted(TASKS)}")
    max_batch_size: int = Field(16, ge=1, description="items per forward pass")
    batch_wait_ms: float = Field(5.0, ge=0, description="wait for a batch to fill, ms")
    max_texts: int = Field(64, ge=1, description="items (texts, sentences) per request")
    max_chars: int = Field(20_000, ge=1, description="characters per text")
    max_body_bytes: int = Field(1_000_000, ge=1, description="request body bytes (413 above)")
    max_json_depth: int = Field(32, ge=1, description="nesting of the JSON body (400 above)")
    max_batch_tokens: int = Field(
        DEFAULT_MAX_BATCH_TOKENS, ge=1, description="padded tokens per pass"
    )
    api_key_sha256: str | None = Field(
        None,
        description=f"sha256 hex of the bearer token for /v1/*; else ${API_KEY_ENV}; else open",
    )
    # generation (causal-lm) only
    max_new_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask")
    max_waiting: int = Field(64, ge=1, description="requests waiting for a batch slot (503 above)")
    request_timeout_s: float = Field(120.0, gt=0, description="generation time per request")
    max_adapters: int = Field(
        8, ge=1, description="LoRA adapters held per replica (least recently used unloaded)"
    )
    text_pair: bool = Field(
        False,
        description="sequence-classification: the model reads text pairs (its card says so); "
        'requests send {"text", "text_pair"}',
    )

    @model_validator(mode="after")
    def _pairs_are_classification(self) -> "AppArgs":
        if self.text_pair and self.task != "sequence-classification":
            raise ValueError(
                f"text_pair: only a sequence-classification app reads pairs, not {self.task}"
            )
        return self

    def served_task(self):
        """The task the app's schemas come from (a pair classifier reads text and text_pair)."""
        task = task_class(self.task)()
        return dataclasses.replace(task, pair_column="text_pair") if self.text_pair else task

    def limits(self) -> RequestLimits:
        return RequestLimits(
            self.max_texts, self.max_chars, self.max_body_bytes, self.max_json_depth
        )


@dataclass(frozen=True)
class ModelSource:
    """The replica's user_config: which model to serve (hot-swapped by reconfigure).

    ``model_uri`` is pinned to a version (``models:/NAME/7``) by whoever deploys, so every
    replica, started now or later on any node, loads the same weights even after the alias
    moves; ``alias`` only says which alias it was resolved from. ``tracking_uri`` lets a
    replica on a node without the deployer's folder fetch the model from the same registry.
    """

    model_dir: str | None = None
    model_uri: str | None = None
    weights_sha256: str | None = None  # when set, the loaded weights must match
    quantize: bool = False
    tracking_uri: str | None = None
    alias: str | None = None
    # LoRA adapters this base may serve (causal LMs): {"registered": [NAME...], "dirs": {ID: DIR}}
    adapters: dict[str, Any] | None = None

    @classmethod
    def from_user_config(cls, config: dict[str, Any]) -> "ModelSource":
        known = {
            "model_dir",
            "model_uri",
            "weights_sha256",
            "quantize",
            "tracking_uri",
            "alias",
            "adapters",
        }
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"user_config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(
            model_dir=config.get("model_dir"),
            model_uri=config.get("model_uri"),
            weights_sha256=config.get("weights_sha256"),
            quantize=bool(config.get("quantize", False)),
            tracking_uri=config.get("tracking_uri"),
            alias=config.get("alias"),
            adapters=config.get("adapters"),
        )


# Fault injection for tests, outside the production contract (args and user_config): read
# once per replica from its environment, e.g. ray_actor_options.runtime_env.env_vars.
FAULTS_ENV = "TETHER_TEST_FAULTS"  # "delay=0.5" (seconds per batch), "fail" (inference raises)


def injected_faults() -> dict[str, float]:
    faults = {}
    for part in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        key, _, value = part.partition("=")
        faults[key.strip()] = float(value or 1)
    return faults


@dataclass(frozen=True)
class BatchItem:
    item: Any  # a text, a sentence: what the task's predictor takes
    model: ServedModel  # captured when the request arrived: one request, one model


@dataclass(frozen=True)
class BatchResult:
    prediction: BaseModel
    batch_size: int


# --------------------------------------------------------------------------- helpers
# Above the deployment on purpose: @serve.deployment pickles the class when it is built, and
# names it needs must already be defined.


def replica_threads() -> int:
    """Torch threads = the CPUs Ray assigned this replica (all cores would oversubscribe)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _env_key_sha256() -> str | None:
    key = os.environ.get(API_KEY_ENV)
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def _same_model(a: "ModelSource | None", b: ModelSource) -> bool:
    keys = ("model_dir", "model_uri", "weights_sha256", "quantize", "tracking_uri")
    return a is not None and all(getattr(a, k) == getattr(b, k) for k in keys)


def _group_by_model(items: list[BatchItem]) -> dict[ServedModel, list[int]]:
    groups: dict[ServedModel, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.model, []).append(i)
    return groups


def _request_id(request: Request) -> str:
    # Serve's proxy sets x-request-id and echoes it as the X-Request-ID response header
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def _error_response(error: RequestError, request_id: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    body = error_body(error.error, error.message, request_id)
    return JSONResponse(body, status_code=error.status, headers=headers)


def _internal_error(request_id: str) -> JSONResponse:
    """500 without a traceback for the client; the traceback goes to the replica log."""
    logger.exception(f"tether: request {request_id} failed")
    body = error_body("internal_error", "unexpected server error; quote the request_id", request_id)
    return JSONResponse(body, status_code=500)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404/405 and friends in the same JSON shape as our own errors."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail), request.headers.get("x-request-id"))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def authorize(request: Request, key_sha256: str | None) -> None:
    """401 unless the bearer token hashes to the configured key (when one is set)."""
    if key_sha256 is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = hashlib.sha256(token.strip().encode("utf-8", "replace")).hexdigest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented, key_sha256):
        raise RequestError(
            401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer KEY)"
        )


class ModelInfoResponse(BaseModel):
    name: str
    version: str | None
    alias: str | None
    run_id: str | None
    model_uri: str | None
    task: str
    label_names: list[str]
    max_length: int
    objective: dict[str, Any]
    metrics: dict[str, Any]
    step: int | None
    weights_sha256: str
    loaded_at: float


class Health(BaseModel):
    status: str
    model: str | None = None


def build_api(args: AppArgs) -> tuple[FastAPI, type[BaseModel]]:
    """The FastAPI app for ``args.task``: its request schema published as enforced."""
    task = args.served_task()
    limits = args.limits()
    request_model = task.request_model(limits.max_items, limits.max_chars)
    api = FastAPI(
        title="tether",
        description=f"{args.task} with a model fine-tuned by tether (anchored, L2-SP).",
        openapi_url=None,  # the replica serves the schema and docs, behind its key
    )
    api.add_exception_handler(StarletteHTTPException, _http_error)
    return api, request_model


class Replica:
    """The replica's state and request path, apart from the routes (composition, no base class)."""

    def __init__(self, args: AppArgs, request_model: type[BaseModel]):
        self.limits = args.limits()
        self.request_model = request_model
        self.task = args.task
        self.text_pair = args.text_pair
        self.max_batch_tokens = args.max_batch_tokens
        key_sha256 = args.api_key_sha256 or _env_key_sha256()
        self.api_key_sha256 = key_sha256.lower() if key_sha256 else None
        self.model: ServedModel | None = None
        self.source: ModelSource | None = None
        # many LoRA adapters on one base (user_config.adapters): the base and its adapters
        self.pool: HeadAdapterPool | None = None
        self.catalog: AdapterCatalog | None = None
        self.faults = injected_faults()
        threads = replica_threads()
        # one inference thread: forward passes run one at a time, off the event loop, so
        # requests keep arriving (and filling the next batch) while a batch computes
        self.inference = ThreadPoolExecutor(1, "tether-inference", _set_torch_threads, (threads,))
        _set_torch_threads(threads)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the model user_config names, then swap it in with one assignment."""
        source = ModelSource.from_user_config(user_config)
        catalog = AdapterCatalog.from_config(source.adapters)
        if self.model is not None:
            refuse_adapter_toggle(self.pool is not None, catalog)
        if self.model is not None and _same_model(self.source, source):
            self.source, self.catalog = source, catalog  # the allowed adapters may change
            return
        refuse_base_swap(self.pool is not None)
        if catalog is not None:
            self.pool = await asyncio.to_thread(self._load_base, source)
            base = self.pool.describe_base(source.model_uri, source.alias)
            self.model, self.source, self.catalog = base, source, catalog
            return
        model = await asyncio.to_thread(self._load, source)  # the old model keeps serving
        # the swap: one assignment; in-flight requests hold their own reference to the old one
        old, self.model, self.source = self.model, model, source
        if old is not None:
            discard_download(old)  # its weights stay in memory for requests in flight
        logger.info(f"tether: serving {model.info.name} from {model.info.model_dir}")

    def _load(self, source: ModelSource) -> ServedModel:
        return load_source(source, self.task, self.max_batch_tokens, self.text_pair)

    def _load_base(self, source: ModelSource) -> HeadAdapterPool:
        """A base for adapters; injections run on the inference thread, between batches."""
        if source.quantize:
            raise ValueError("user_config: quantize and adapters do not combine")
        model_dir = resolve_model_dir(
            source.model_dir, source.model_uri, source.tracking_uri, need_card=False
        )
        found = card_task(model_dir, base_card(model_dir, self.task))
        if found != self.task:
            raise ValueError(f"{model_dir} is a {found} model but this app serves {self.task}")
        pool = HeadAdapterPool(self.task, model_dir, self.max_batch_tokens, self.inference)
        if source.weights_sha256 and pool.describe_base().info.weights_sha256 != (
            source.weights_sha256
        ):
            raise ValueError(f"{model_dir}: this node holds another copy of the base model")
        return pool

    def loaded_model(self) -> ServedModel:
        if self.model is None:
            raise RequestError(503, "model_not_loaded", "no model is loaded yet")
        return self.model

    def base_for(self, model_id: str) -> ServedModel | None:
        """The served model itself when ``model_id`` (the multiplexing header) names nothing
        else; None when it names an adapter to load."""
        model = self.loaded_model()
        info = model.info
        if model_id and model_id not in info.names():
            if self.catalog is None:
                raise RequestError(
                    404,
                    "model_not_found",
                    f"model {model_id!r} is not served here (serving {info.name!r})",
                    ADAPTER_HEADER,
                )
            return None
        if self.pool is not None and not self.pool.has_head:
            raise RequestError(
                400,
                "model_required",
                f"{info.name} is a pretrained base without a head: name an adapter in the "
                f"{ADAPTER_HEADER} header ({self.catalog.describe()})",
                ADAPTER_HEADER,
            )
        return model

    async def read_body(self, request: Request) -> BaseModel:
        """Auth, content type, size, JSON, schema: the validated body, or a RequestError."""
        authorize(request, self.api_key_sha256)
        check_content_type(request.headers.get("content-type"))
        check_declared_length(request.headers.get("content-length"), self.limits.max_body_bytes)
        body = await read_limited_body(request.stream(), self.limits.max_body_bytes)
        payload = parse_json(body, self.limits.max_json_depth)
        return validate_body(payload, self.request_model)

    async def items_for(self, model: ServedModel, validated: BaseModel) -> list[Any]:
        """The body's items as ``model`` reads them (an adapter's own predictor: it may read
        pairs where the base does not). On the inference thread: counting QA windows
        tokenizes, and a tokenizer must not change its settings under a running forward."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.inference, model.predictor.items, validated)
        except ItemsRefused as e:  # QA contexts that need too many windows, say
            raise RequestError(422, "invalid_input", str(e), e.param) from None

    def predict(self, model: ServedModel, items: list[Any]) -> list[BaseModel]:
        if "delay" in self.faults:
            time.sleep(self.faults["delay"])  # blocks the inference thread like a slow model
        if "fail" in self.faults:
            raise RuntimeError(f"test fault: {FAULTS_ENV} asks inference to fail")
        return model.predictor.predict(items)


def load_source(
    source: ModelSource,
    task: str,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    text_pair: bool = False,
) -> ServedModel:
    """Resolve and load a user_config's model; refuse another task, another input shape (a
    pair classifier on a single-text app, or the reverse) or other weights.

    A base serving adapters may be a pretrained folder without a tether card."""
    is_base = source.adapters is not None
    model_dir = resolve_model_dir(
        source.model_dir, source.model_uri, source.tracking_uri, need_card=not is_base
    )
    card = base_card(model_dir, task) if is_base else read_card(model_dir)
    found = card_task(model_dir, card)
    if found != task:
        raise ValueError(
            f"{model_dir} is a {found} model but this app serves {task}: "
            "deploy it as a new application"
        )
    if not is_base and bool(card.get("text_pair")) != text_pair:
        shapes = ("text pairs", "single texts")
        reads, serves = shapes if card.get("text_pair") else shapes[::-1]
        raise ValueError(
            f"{model_dir} reads {reads} but this app serves {serves}: "
            "deploy it as a new application"
        )
    if is_base and source.quantize:
        raise ValueError(
            "user_config: quantize and adapters do not combine (LoRA needs fp32 Linear)"
        )
    model = load_served_model(
        model_dir,
        source.model_uri,
        quantize=source.quantize,
        max_batch_tokens=max_batch_tokens,
        alias=source.alias,
        card=card,
    )
    expected = source.weights_sha256
    if expected and model.info.weights_sha256 != expected:
        raise ValueError(
            f"{model_dir}: weights sha256 {model.info.weights_sha256[:12]} differs from the "
            f"deployed {expected[:12]}: this node has a different copy of the model"
        )
    return model


def discard_download(model: ServedModel) -> None:
    """Delete a replaced model's registry download (a private temp copy), not a user folder."""
    from tether.registry import discard_download as discard

    discard(model.info.model_dir)


def make_deployment(args: AppArgs):
    """The Serve deployment class for ``args`` (its routes carry the task's schemas)."""
    api, request_model = build_api(args)
    served_task = args.served_task()
    predict_response = response_model(served_task.prediction_model())
    example = served_task.request_example()

    @serve.deployment(
        name=DEPLOYMENT_NAME,
        max_ongoing_requests=32,
        max_queued_requests=64,
        ray_actor_options={"num_cpus": 1},
        health_check_period_s=10,
    )
    @serve.ingress(api)
    class TetherServer:
        def __init__(self, app_args: AppArgs):
            self.replica = Replica(app_args, request_model)
            self.predict_batch.set_max_batch_size(app_args.max_batch_size)
            self.predict_batch.set_batch_wait_timeout_s(app_args.batch_wait_ms / 1000)

        async def reconfigure(self, user_config: dict[str, Any]) -> None:
            await self.replica.reconfigure(user_config)

        def check_health(self) -> None:
            if self.replica.model is None:
                raise RuntimeError("no model loaded: set user_config.model_dir or model_uri")

        @serve.multiplexed(max_num_models_per_replica=args.max_adapters)
        async def get_adapter(self, model_id: str):
            """One adapter on this replica's base (Serve keeps the last ``max_adapters``)."""
            replica = self.replica
            return await load_adapter(
                replica.pool, replica.catalog, model_id, replica.source.tracking_uri
            )

        async def _served(self):
            """The model the request asks for (its multiplexing header) and, for an adapter,
            the adapter itself, acquired: release it when the request is done."""
            model_id = serve.get_multiplexed_model_id()
            base = self.replica.base_for(model_id)
            if base is not None:
                return base, None
            for attempt in range(3):
                replica = self.replica
                adapter = await adapter_for_request(
                    replica.pool,
                    replica.catalog,
                    self.get_adapter,
                    model_id,
                    ADAPTER_HEADER,
                    replica.source.tracking_uri,
                )
                try:
                    adapter.acquire()
                    return adapter.served, adapter
                except RuntimeError:  # unloaded by the LRU in between: load it again
                    if attempt == 2:
                        raise

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def predict_batch(self, items: list[BatchItem]) -> list[BatchResult]:
            """One forward pass per model present: two while a swap is in progress, one per
            adapter when adapters are served (their heads differ)."""
            results: list[BatchResult | None] = [None] * len(items)
            loop = asyncio.get_running_loop()
            for model, indices in _group_by_model(items).items():
                batch = [items[i].item for i in indices]
                predictions = await loop.run_in_executor(
                    self.replica.inference, self.replica.predict, model, batch
                )
                for i, prediction in zip(indices, predictions, strict=True):
                    results[i] = BatchResult(prediction, batch_size=len(batch))
            return results

        @api.post(
            "/v1/predict",
            response_model=predict_response,
            responses=ERROR_RESPONSES,
            openapi_extra=request_body_openapi(request_model, example),
        )
        async def predict(self, request: Request) -> JSONResponse:
            """The task's predictions for the request's items; errors as in the table."""
            request_id = _request_id(request)
            adapter = None
            try:
                validated = await self.replica.read_body(request)
                model, adapter = await self._served()
                items = await self.replica.items_for(model, validated)
                results = await asyncio.gather(
                    *(self.predict_batch(BatchItem(i, model)) for i in items)
                )
                body = {
                    "model": model_ref(model.info).model_dump(),
                    "batch_size": max(r.batch_size for r in results),
                    "predictions": [r.prediction.model_dump(mode="json") for r in results],
                }
                return JSONResponse(body)
            except RequestError as e:
                return _error_response(e, request_id)
            except ClientDisconnect:  # the client left while sending: nobody to answer
                return _error_response(
                    RequestError(400, "client_disconnected", "request body incomplete"), request_id
                )
            except Exception:
                return _internal_error(request_id)
            finally:
                if adapter is not None:
                    adapter.release()

        @api.get("/v1/model", response_model=ModelInfoResponse, responses=ERROR_RESPONSES)
        async def model_info(self, request: Request) -> JSONResponse:
            """The served model: identity, task, objective (λ, mode) and eval metrics."""
            request_id = _request_id(request)
            try:
                authorize(request, self.replica.api_key_sha256)
                return JSONResponse(self.replica.loaded_model().info.public())
            except RequestError as e:
                return _error_response(e, request_id)
            except Exception:
                return _internal_error(request_id)

        @api.get(OPENAPI_PATH, include_in_schema=False)
        @api.get(api.docs_url, include_in_schema=False)
        @api.get(api.redoc_url, include_in_schema=False)
        async def api_docs(self, request: Request):
            """The OpenAPI schema and its Swagger UI and ReDoc pages, behind the key as /v1/*."""
            try:
                authorize(request, self.replica.api_key_sha256)
            except RequestError as e:
                return _error_response(e, _request_id(request))
            return docs_page(request)

        @api.get("/healthz", response_model=Health, responses={503: {"model": Health}})
        async def healthz(self) -> JSONResponse:
            """200 when a model is loaded (no token needed: load balancers probe it)."""
            if self.replica.model is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            return JSONResponse({"status": "ok", "model": self.replica.model.info.name})

    return TetherServer


def app_builder(args: dict[str, Any] | AppArgs | None = None) -> serve.Application:
    """Serve app builder (``import_path: tether.serving.app:app_builder``); args: AppArgs."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    if args.task not in TASKS:
        raise ValueError(f"args.task: unknown task {args.task!r} (known: {sorted(TASKS)})")
    if getattr(task_class(args.task), "generates", False):  # served behind OpenAI's routes
        from tether.serving.openai import make_generation_deployment

        return make_generation_deployment(args).bind(args)
    return make_deployment(args).bind(args)
