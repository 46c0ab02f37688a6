"""The HTTP contract of the tether service: request bodies, limits, and errors.

Every bad request becomes a 4xx JSON body that names the problem, never a 500:

    400 invalid_json            malformed JSON, a body that is not UTF-8, an empty body
    401 unauthorized            missing or wrong bearer token on /v1/*
    413 payload_too_large       over max_body_bytes (declared or actually sent), over max_texts
    415 unsupported_media_type  not application/json (or a charset other than UTF-8)
    422 invalid_input           wrong or missing fields, empty list, blank or non-string texts

Errors look like ``{"error": "invalid_input", "message": "texts[1]: ...", "request_id": "..."}``.
FastAPI's own body parsing is not used: it has no size limit and answers malformed JSON with 422.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from tether.serving.model import ModelInfo, Prediction


class RequestError(Exception):
    """A client mistake: an HTTP status, a short error code and a message naming the problem."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


@dataclass(frozen=True)
class RequestLimits:
    max_texts: int = 64  # texts per request
    max_body_bytes: int = 1_000_000  # bytes per request body

    def __post_init__(self):
        for name in ("max_texts", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- schemas


class PredictRequest(BaseModel):
    """POST /v1/predict: one text, or a list of texts classified independently."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(default=None, description="one text", examples=["a fine film"])
    texts: list[str] | None = Field(
        default=None, min_length=1, description="several texts", examples=[["great", "dull"]]
    )

    @model_validator(mode="after")
    def _exactly_one_non_blank_source(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise PydanticCustomError("text_or_texts", "send exactly one of 'text' or 'texts'")
        if self.text is not None and not self.text.strip():
            raise PydanticCustomError("blank_text", "text is empty or whitespace-only")
        blank = [i for i, t in enumerate(self.texts or []) if not t.strip()]
        if blank:
            where = ", ".join(f"texts[{i}]" for i in blank[:5])
            raise PydanticCustomError("blank_text", f"{where}: empty or whitespace-only text")
        return self

    def as_list(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class ModelRef(BaseModel):
    name: str
    version: str | None
    alias: str | None


class PredictResponse(BaseModel):
    model: ModelRef
    batch_size: int = Field(description="texts in the largest forward batch serving this request")
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str
    message: str
    request_id: str | None = None


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "malformed JSON or non-UTF-8 body",
        401: "missing or wrong bearer token",
        413: "body or number of texts over the limit",
        415: "not application/json",
        422: "wrong fields, empty list, blank or non-string text",
        500: "unexpected error (see request_id in the server log)",
        503: "model not loaded, or the service is overloaded",
    }.items()
}

PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    }
}


def model_ref(info: ModelInfo) -> ModelRef:
    return ModelRef(name=info.name, version=info.version, alias=info.alias)


# --------------------------------------------------------------------------- checks, in order


def check_content_type(content_type: str | None) -> None:
    """415 unless the body is declared JSON (in UTF-8, the only charset we decode)."""
    media_type, *params = [part.strip().lower() for part in (content_type or "").split(";")]
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, got {content_type or 'none'!r}",
        )
    for param in params:
        key, _, value = param.partition("=")
        if key.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            raise RequestError(
                415, "unsupported_media_type", f"charset must be utf-8, got {value!r}"
            )


def check_declared_length(content_length: str | None, max_body_bytes: int) -> None:
    """413 before reading anything when Content-Length already says the body is too big."""
    if content_length is not None and content_length.isdigit():
        if int(content_length) > max_body_bytes:
            raise RequestError(
                413,
                "payload_too_large",
                f"body of {content_length} bytes is over the {max_body_bytes}-byte limit",
            )


async def read_limited_body(chunks: AsyncIterator[bytes], max_body_bytes: int) -> bytes:
    """The body, counted as it arrives: a chunked or mis-declared body cannot exceed the limit."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_body_bytes:
            raise RequestError(
                413, "payload_too_large", f"body is over the {max_body_bytes}-byte limit"
            )
    return bytes(body)


def parse_texts(body: bytes, limits: RequestLimits) -> list[str]:
    """Decode, parse and validate a predict body into the texts to classify."""
    if not body:
        raise RequestError(400, "invalid_json", 'empty body: send {"texts": ["..."]}')
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(
            400, "invalid_json", f"body is not valid UTF-8 (byte {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise RequestError(
            400, "invalid_json", f"malformed JSON: {e.msg} at position {e.pos}"
        ) from None
    if not isinstance(payload, dict):
        raise RequestError(
            422,
            "invalid_input",
            f'body must be a JSON object like {{"texts": [...]}}, got {type(payload).__name__}',
        )
    texts = payload.get("texts")
    if isinstance(texts, list) and len(texts) > limits.max_texts:
        raise RequestError(
            413, "payload_too_large", f"{len(texts)} texts is over max_texts={limits.max_texts}"
        )
    try:
        return PredictRequest.model_validate(payload).as_list()
    except ValidationError as e:
        raise RequestError(422, "invalid_input", describe_validation_error(e)) from None


def describe_validation_error(error: ValidationError, limit: int = 5) -> str:
    """'texts[1]: Input should be a valid string; ...' for the first ``limit`` problems."""
    parts = []
    for problem in error.errors()[:limit]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem["loc"])
        where = where.lstrip(".")
        parts.append(f"{where}: {problem['msg']}" if where else problem["msg"])
    more = len(error.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def error_body(error: str, message: str, request_id: str | None) -> dict:
    return {"error": error, "message": message, "request_id": request_id}
