"""The Ray Serve application: a FastAPI ingress over a batching classifier replica.

    POST /v1/predict   {"texts": [...]} or {"text": "..."} → labels, probabilities, batch_size
    GET  /v1/model     name, version, alias, run id, objective (λ, mode), eval metrics
    GET  /healthz      200 once a model is loaded
    GET  /docs         OpenAPI

Texts from concurrent requests share forward passes: each text is one item of a
``@serve.batch`` queue (at most ``max_batch_size`` texts per pass), so a request of 3 texts
and five requests of 1 text can run as one batch of 8. The model is set by ``user_config``
({"model_dir", "model_uri"}); ``reconfigure`` loads a new one fully, then swaps one reference,
so requests in flight finish on the model they started with.

No ``from __future__ import annotations`` here: the replica class is pickled by value, and
FastAPI must resolve the route annotations (``Request``) from real objects, not strings.

Deploy it with ``tether serve`` or ``serve deploy serve/config.yaml`` (import path
``tether.serving.app:app_builder``).
"""

import asyncio
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
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from tether.serving.contract import (
    ERROR_RESPONSES,
    PREDICT_OPENAPI,
    PredictResponse,
    RequestError,
    RequestLimits,
    check_content_type,
    check_declared_length,
    error_body,
    model_ref,
    parse_texts,
    read_limited_body,
)
from tether.serving.deploy import DEPLOYMENT_NAME
from tether.serving.model import (
    DEFAULT_MAX_BATCH_TOKENS,
    ModelInfo,
    Prediction,
    ServedModel,
    load_served_model,
    resolve_model_dir,
)

API_KEY_ENV = "TETHER_API_KEY"
logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="tether",
    description="Text classification with models fine-tuned by tether (anchored, L2-SP).",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404/405 and friends in the same JSON shape as our own errors."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail), request.headers.get("x-request-id"))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


class AppArgs(BaseModel):
    """Builder arguments (``args:`` in serve/config.yaml). Fixed for the app's lifetime."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, description="texts per forward pass")
    batch_wait_ms: float = Field(5.0, ge=0, description="wait for a batch to fill, ms")
    max_texts: int = Field(64, ge=1, description="texts per request (413 above)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="request body bytes (413 above)")
    max_batch_tokens: int = Field(
        DEFAULT_MAX_BATCH_TOKENS, ge=1, description="padded tokens per pass"
    )
    api_key_sha256: str | None = Field(
        None,
        description=f"sha256 hex of the bearer token for /v1/*; else ${API_KEY_ENV}; else open",
    )


@dataclass(frozen=True)
class ModelSource:
    """The replica's user_config: which model to serve (hot-swapped by reconfigure)."""

    model_dir: str | None = None
    model_uri: str | None = None
    weights_sha256: str | None = None  # when set, the loaded weights must match
    quantize: bool = False
    test_delay_s: float = 0.0  # tests only: a slow model, to provoke overload
    test_fail: bool = False  # tests only: inference raises, to exercise the 500 path

    @classmethod
    def from_user_config(cls, config: dict[str, Any]) -> "ModelSource":
        known = {
            "model_dir",
            "model_uri",
            "weights_sha256",
            "quantize",
            "_test_delay_s",
            "_test_fail",
        }
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"user_config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(
            model_dir=config.get("model_dir"),
            model_uri=config.get("model_uri"),
            weights_sha256=config.get("weights_sha256"),
            quantize=bool(config.get("quantize", False)),
            test_delay_s=float(config.get("_test_delay_s", 0.0)),
            test_fail=bool(config.get("_test_fail", False)),
        )


@dataclass(frozen=True)
class BatchItem:
    text: str
    model: ServedModel  # captured when the request arrived: one request, one model


@dataclass(frozen=True)
class BatchResult:
    prediction: Prediction
    batch_size: int


# --------------------------------------------------------------------------- helpers
# Above the deployment on purpose: @serve.deployment pickles the class when this module is
# imported, and names defined below it would be missing in the replica (NameError).


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


def _same_model(a: ModelSource | None, b: ModelSource) -> bool:
    keys = ("model_dir", "model_uri", "weights_sha256", "quantize")
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


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=32,
    max_queued_requests=64,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress(api)
class TetherClassifier:
    def __init__(self, args: AppArgs):
        self._limits = RequestLimits(args.max_texts, args.max_body_bytes)
        self._max_batch_tokens = args.max_batch_tokens
        key_sha256 = args.api_key_sha256 or _env_key_sha256()
        self._api_key_sha256 = key_sha256.lower() if key_sha256 else None
        self._model: ServedModel | None = None
        self._source: ModelSource | None = None
        threads = replica_threads()
        # one inference thread: forward passes run one at a time, off the event loop, so
        # requests keep arriving (and filling the next batch) while a batch computes
        self._inference = ThreadPoolExecutor(1, "tether-inference", _set_torch_threads, (threads,))
        _set_torch_threads(threads)
        self.classify_batch.set_max_batch_size(args.max_batch_size)
        self.classify_batch.set_batch_wait_timeout_s(args.batch_wait_ms / 1000)

    # ------------------------------------------------------------------- model lifecycle

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the model user_config names, then swap it in with one assignment."""
        source = ModelSource.from_user_config(user_config)
        if self._model is not None and _same_model(self._source, source):
            self._source = source  # only the test knobs changed
            return
        model = await asyncio.to_thread(self._load, source)  # the old model keeps serving
        # the swap: one assignment; in-flight requests hold their own reference to the old one
        self._model, self._source = model, source
        logger.info(f"tether: serving {model.info.name} from {model.info.model_dir}")

    def _load(self, source: ModelSource) -> ServedModel:
        model_dir = resolve_model_dir(source.model_dir, source.model_uri)
        model = load_served_model(
            model_dir,
            source.model_uri,
            quantize=source.quantize,
            max_batch_tokens=self._max_batch_tokens,
        )
        expected = source.weights_sha256
        if expected and model.info.weights_sha256 != expected:
            raise ValueError(
                f"{model_dir}: weights sha256 {model.info.weights_sha256[:12]} differs from the "
                f"deployed {expected[:12]}: this node has a different copy of the model"
            )
        return model

    def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError("no model loaded: set user_config.model_dir or model_uri")

    # ------------------------------------------------------------------- batching

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify_batch(self, items: list[BatchItem]) -> list[BatchResult]:
        """One forward pass per model present (two only while a swap is in progress)."""
        results: list[BatchResult | None] = [None] * len(items)
        for model, indices in _group_by_model(items).items():
            texts = [items[i].text for i in indices]
            predictions = await asyncio.get_running_loop().run_in_executor(
                self._inference, self._classify, model, texts
            )
            for i, prediction in zip(indices, predictions, strict=True):
                results[i] = BatchResult(prediction, batch_size=len(texts))
        return results

    def _classify(self, model: ServedModel, texts: list[str]) -> list[Prediction]:
        source = self._source
        if source and source.test_delay_s:
            time.sleep(source.test_delay_s)  # blocks the inference thread like a slow model would
        if source and source.test_fail:
            raise RuntimeError("test fault: _test_fail is set in user_config")
        return model.classify(texts)

    # ------------------------------------------------------------------- routes

    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=PREDICT_OPENAPI,
    )
    async def predict(self, request: Request) -> JSONResponse:
        """Classify {"texts": [...]} or {"text": "..."}; see the error table in the docs."""
        request_id = _request_id(request)
        try:
            self._authorize(request)
            check_content_type(request.headers.get("content-type"))
            check_declared_length(
                request.headers.get("content-length"), self._limits.max_body_bytes
            )
            body = await read_limited_body(request.stream(), self._limits.max_body_bytes)
            texts = parse_texts(body, self._limits)
            model = self._loaded_model()
            results = await asyncio.gather(
                *(self.classify_batch(BatchItem(t, model)) for t in texts)
            )
            response = PredictResponse(
                model=model_ref(model.info),
                batch_size=max(r.batch_size for r in results),
                predictions=[r.prediction for r in results],
            )
            return JSONResponse(response.model_dump(mode="json"))
        except RequestError as e:
            return _error_response(e, request_id)
        except Exception:
            return _internal_error(request_id)

    @api.get("/v1/model", response_model=ModelInfo, responses=ERROR_RESPONSES)
    async def model_info(self, request: Request) -> JSONResponse:
        """The served model: identity, source, objective (λ, mode) and eval metrics."""
        request_id = _request_id(request)
        try:
            self._authorize(request)
            return JSONResponse(self._loaded_model().info.to_dict())
        except RequestError as e:
            return _error_response(e, request_id)
        except Exception:
            return _internal_error(request_id)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when a model is loaded (no token needed: load balancers probe it)."""
        if self._model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self._model.info.name})

    def _loaded_model(self) -> ServedModel:
        if self._model is None:
            raise RequestError(503, "model_not_loaded", "no model is loaded yet")
        return self._model

    def _authorize(self, request: Request) -> None:
        """401 unless the bearer token hashes to the configured key (when one is set)."""
        if self._api_key_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self._api_key_sha256):
            raise RequestError(
                401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer KEY)"
            )


def app_builder(args: dict[str, Any] | AppArgs | None = None) -> serve.Application:
    """Serve app builder (``import_path: tether.serving.app:app_builder``); args: AppArgs."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    return TetherClassifier.bind(args)
