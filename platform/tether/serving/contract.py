"""The HTTP contract of the tether service: request bodies, limits, and errors.

Every request the parser, the schema or the tokenizer cannot take becomes a 4xx JSON body
that names the problem, before the replica's model sees it, never a 500:

    400 invalid_json            malformed JSON; a body that is not UTF-8; an empty body; NaN or
                                Infinity; a number too large to represent; a duplicate key;
                                nesting deeper than max_json_depth; a string holding an
                                unpaired surrogate (valid JSON escape, not valid Unicode)
    401 unauthorized            missing or wrong bearer token on /v1/* and the API docs
                                (/openapi.json, /docs, /redoc), when a key is set
    413 payload_too_large       over max_body_bytes (declared or actually sent)
    415 unsupported_media_type  not application/json (or a charset other than UTF-8)
    422 invalid_input           fields that do not fit the published schema (names the field):
                                wrong types, unknown fields, both or neither of text/texts,
                                blank texts, over max_items items or max_chars characters

Errors look like ``{"error": "invalid_input", "message": "texts[1]: ...", "request_id": "..."}``.
FastAPI's own body parsing is not used: it has no size limit and answers malformed JSON with 422.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, ValidationError


class RequestError(Exception):
    """A client mistake: an HTTP status, a short error code and a message naming the problem."""

    def __init__(self, status: int, error: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.param = param  # the offending field's path, e.g. "messages[0].role"


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold. The item and character limits are in the published schema."""

    max_items: int = 64  # texts (sentences, prompts) per request
    max_chars: int = 20_000  # characters per text
    max_body_bytes: int = 1_000_000  # bytes per request body
    max_json_depth: int = 32  # nesting of arrays/objects

    def __post_init__(self):
        for name in ("max_items", "max_chars", "max_body_bytes", "max_json_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- schemas


class ModelRef(BaseModel):
    name: str
    version: str | None
    alias: str | None


class ErrorResponse(BaseModel):
    error: str
    message: str
    request_id: str | None = None


ERROR_DESCRIPTIONS = {
    400: "malformed or unrepresentable JSON, or a body that is not UTF-8",
    401: "missing or wrong bearer token",
    413: "body over the byte limit",
    415: "not application/json",
    422: "the body does not fit the schema (the message names the field)",
    500: "unexpected error (see request_id in the server log)",
    503: "model not loaded, or the service is overloaded",
}
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ERROR_DESCRIPTIONS.items()
}


def response_model(prediction: type[BaseModel]) -> type[BaseModel]:
    """The POST /v1/predict response around a task's prediction model."""
    from pydantic import create_model

    return create_model(
        "PredictResponse",
        model=(ModelRef, ...),
        batch_size=(
            int,
            Field(description="items in the largest forward batch serving this request"),
        ),
        predictions=(list[prediction], ...),
    )


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with every $ref replaced by its definition.

    The request body schema is embedded in the OpenAPI document by hand (FastAPI does not
    parse the body), so refs into pydantic's local ``$defs`` would point nowhere.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]]))
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def request_body_openapi(model: type[BaseModel], example: dict[str, Any]) -> dict[str, Any]:
    schema = inline_schema(model)
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema, "example": example}},
        }
    }


# FastAPI's own schema and docs routes are turned off (``openapi_url=None``): each replica
# serves them itself, because only the replica knows its API key (it may come from the
# replica's environment), and a schema listing every route is not for anonymous callers.
OPENAPI_PATH = "/openapi.json"


def docs_page(request) -> Any:
    """What FastAPI would answer on the app's schema or docs path: the OpenAPI schema, the
    Swagger UI (``app.docs_url``) or ReDoc (``app.redoc_url``) page. The caller checks the
    key first."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import JSONResponse

    app = request.app
    # behind a route prefix (Serve's /ner, /qa apps) the pages must fetch the prefixed schema
    root_path = request.scope.get("root_path", "").rstrip("/")
    path = request.url.path
    if path.endswith(OPENAPI_PATH):
        schema = app.openapi()
        servers = schema.get("servers", [])
        listed = {server.get("url") for server in servers}
        if root_path and app.root_path_in_servers and root_path not in listed:
            schema = {**schema, "servers": [{"url": root_path}, *servers]}
        return JSONResponse(schema)
    if app.redoc_url and path.endswith(app.redoc_url):
        return get_redoc_html(openapi_url=root_path + OPENAPI_PATH, title=f"{app.title} - ReDoc")
    return get_swagger_ui_html(
        openapi_url=root_path + OPENAPI_PATH, title=f"{app.title} - Swagger UI"
    )


def model_ref(info) -> ModelRef:
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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]!r} is too large to represent")
    return value


def parse_json(body: bytes, max_depth: int) -> Any:
    """Decode and parse a body strictly; 400 naming the problem for anything Python's parser
    accepts that a JSON peer would not, or that would fail later inside the replica."""
    if not body:
        raise RequestError(400, "invalid_json", "empty body: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(
            400, "invalid_json", f"body is not valid UTF-8 (byte {e.start})"
        ) from None
    try:
        payload = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as e:
        raise RequestError(
            400, "invalid_json", f"malformed JSON: {e.msg} at position {e.pos}"
        ) from None
    except RecursionError:  # the C parser recursed past the interpreter's limit
        raise RequestError(
            400, "invalid_json", f"JSON nested deeper than {max_depth} levels"
        ) from None
    except ValueError as e:  # our hooks, and integers beyond Python's digit limit
        raise RequestError(400, "invalid_json", f"unrepresentable JSON: {e}") from None
    check_depth_and_text(payload, max_depth)
    return payload


def check_depth_and_text(payload: Any, max_depth: int) -> None:
    """400 for nesting beyond ``max_depth`` or a string that is not valid Unicode.

    Lone surrogates (``"\\ud800"``) are legal JSON escapes, but no UTF-8 text holds them: the
    tokenizer would fail on them inside the replica.
    """
    stack: list[tuple[Any, str, int]] = [(payload, "", 1)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth > max_depth:
            raise RequestError(400, "invalid_json", f"JSON nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                _check_text(key, f"{where}.{key!r}" if where else repr(key))
                stack.append((value, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, str):
            _check_text(node, where or "body")


def _check_text(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        raise RequestError(
            400,
            "invalid_json",
            f"{where}: holds an unpaired surrogate (\\u{ord(bad):04x}), which is not valid Unicode",
        ) from None


def validate_body(payload: Any, model: type[BaseModel]):
    """422 naming the field for a payload that does not fit ``model``."""
    if not isinstance(payload, dict):
        raise RequestError(
            422, "invalid_input", f"body must be a JSON object, got {type(payload).__name__}"
        )
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        problems = meant_problems(e, payload, model)
        raise RequestError(
            422,
            "invalid_input",
            describe_validation_error(e, payload, model),
            field_path(problems[0]["loc"]) or None if problems else None,
        ) from None


def field_path(loc: tuple) -> str:
    """('messages', 0, 'role') → 'messages[0].role'; the names pydantic gives the branches of
    a union ('constrained-str', 'list[str]') are not fields and are left out."""
    parts = [p for p in loc if isinstance(p, int) or FIELD_NAME.match(p)]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def union_branches(model: type[BaseModel]) -> dict[str, set[str]]:
    """For a body that is one of several shapes: each shape's title → its required keys."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    branches = {}
    for option in schema.get("anyOf", []):
        ref = option.get("$ref", "").rsplit("/", 1)[-1]
        if ref in defs:
            branches[defs[ref].get("title", ref)] = set(defs[ref].get("required", []))
    return branches


def meant_problems(error: ValidationError, payload: dict, model: type[BaseModel]):
    """The problems of the shape the body meant, located within it (a body of several shapes
    is judged by the one whose keys it sent); None when it sent no single shape's keys."""
    problems = error.errors()
    branches = union_branches(model)
    if not branches:
        return problems
    meant = [b for b, required in branches.items() if required & set(payload)]
    if len(meant) != 1:
        return None
    return [{**p, "loc": p["loc"][1:]} for p in problems if p["loc"][:1] == (meant[0],)]


def describe_validation_error(
    error: ValidationError, payload: Any, model: type[BaseModel], limit: int = 5
) -> str:
    """'texts[1]: empty or whitespace-only text; ...' for the first ``limit`` problems.

    A body of several shapes ({"text"} | {"texts"} | ...) is judged by the shape whose key it
    sent; with several such keys, or none, the message says which keys to choose from.
    """
    problems = meant_problems(error, payload, model)
    if problems is None:
        branches = union_branches(model)
        choices = ", ".join(repr(k) for b in branches for k in sorted(branches[b]))
        unknown = sorted(set(payload) - set().union(*branches.values()))
        extra = f" (unknown field(s): {', '.join(map(repr, unknown))})" if unknown else ""
        return f"send exactly one of {choices}{extra}"
    parts = []
    for problem in problems[:limit]:
        where = field_path(problem["loc"])
        parts.append(f"{where}: {_message(problem)}" if where else _message(problem))
    more = len(problems) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _message(problem: dict) -> str:
    if problem["type"] == "extra_forbidden":
        return "unknown field"
    if problem["loc"] and problem["loc"][0] in NEUTRAL_ONLY:
        field = problem["loc"][0]
        return f"not supported by this server: only {NEUTRAL_ONLY[field]} is accepted"
    if problem["type"] == "string_pattern_mismatch" or (
        problem["type"] == "string_too_short" and problem.get("ctx", {}).get("min_length") == 1
    ):
        return "empty or whitespace-only text"
    return problem["msg"]


# OpenAI request fields a client may send at their neutral value (SDKs and tools often do),
# with that value; anything else is refused naming the field, never silently ignored
NEUTRAL_ONLY = {
    "frequency_penalty": "0",
    "presence_penalty": "0",
    "logprobs": "false",
    "top_logprobs": "0",
    "logit_bias": "{}",
    "response_format": '{"type": "text"}',
    "tools": "[]",
    "tool_choice": '"none"',
    "store": "false",
}


def error_body(error: str, message: str, request_id: str | None) -> dict:
    return {"error": error, "message": message, "request_id": request_id}
