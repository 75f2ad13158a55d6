"""The OpenAPI document the gateway serves: the shape of every answer, errors included.

Handlers return plain dicts, ``JSONResponse`` or an event stream, so FastAPI cannot infer what they
send; each endpoint family declares its answers' shapes beside its request body (``api/``), and
the few that belong to no family (models, health) are declared here. FastAPI's automatic 422 is
dropped, since validation errors are answered with 400 in OpenAI's envelope; the ``/v1`` routes are
marked as needing a bearer key, and the limit on ``n`` is the deployment's.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel

from api.errors import ErrorResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    engine: str
    """What generates: ``vllm``, or ``sim`` for the simulated engine of capacity tests."""


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unready"]
    reason: str | None = None


_RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "required": True,
    "schema": {"type": "string"},
}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if retry_after:
        out["headers"] = {"retry-after": _RETRY_AFTER}
    return out


_REQUEST_ID = {
    "description": "The request's id, also in the gateway's logs.",
    "required": True,
    "schema": {"type": "string"},
}
_STREAM_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A JSON chunk of the response (or an error envelope); the last event is [DONE].",
        }
    },
}

MODEL_NOT_FOUND = _error("No such model.")
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("Missing or unknown API key."),
    503: _error("Redis, which holds keys and queues, is unreachable.", retry_after=True),
}
COMPLETION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request, e.g. a parameter out of range or a prompt too long for the model."),
    401: AUTH_ERRORS[401],
    404: MODEL_NOT_FOUND,
    413: _error("Request body over the gateway's size limit."),
    429: _error("Over the tenant's rate, concurrency or backlog limit.", retry_after=True),
    502: _error("The worker failed the request."),
    503: _error(
        "No live worker serves the model, the system is at capacity, or Redis is unreachable.",
        retry_after=True,
    ),
    409: _error(
        "This Idempotency-Key was sent with another request, or the request it names (or the "
        "stream Last-Event-ID takes up) was stopped before it ended."
    ),
    504: _error("The request timed out in the queue or while generating."),
}
RESUMPTION_HEADERS = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "The same request sent again with the same key gets the first one's answer.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 256},
    },
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "Take up a resumable stream where this event left off (send the same request).",
        "schema": {"type": "string"},
    },
]

BATCH_IDEMPOTENCY = {
    **RESUMPTION_HEADERS[0],
    "description": "The same batch created again with the same key gets the batch the first request created.",
}
RESPONSE_IDEMPOTENCY = {
    **RESUMPTION_HEADERS[0],
    "description": (
        "The same request sent again with the same key gets the response the first one made (the "
        "same id), followed live while it runs, streamed or whole as asked."
    ),
}
NOT_FOUND = _error("No such object for this tenant (another tenant's objects are not found either).")
RESPONSE_NOT_FOUND = _error(
    "No such model, or no stored response of this tenant by the id `previous_response_id` names."
)
INVALID = _error("Invalid request: a parameter out of range, or an input file with bad lines.")
CONFLICT = _error(
    "The object is in a state that does not allow this (e.g. a finished batch), or this "
    "Idempotency-Key was sent with another request."
)


def resource_responses(model: type[BaseModel] | None, *errors: int) -> dict[int | str, dict[str, Any]]:
    """A Files, Batches or Usage operation's answers: ``model`` and the given error statuses."""
    known: dict[int, dict[str, Any]] = {
        400: INVALID,
        404: NOT_FOUND,
        409: CONFLICT,
        413: _error("The file is over the size limit, or the file store is full."),
    }
    out: dict[int | str, dict[str, Any]] = {**AUTH_ERRORS, **{status: known[status] for status in errors}}
    if model is not None:
        out[200] = {"model": model}
    return out


FILE_CONTENT = {
    "description": "The file's bytes (JSON Lines).",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                    },
                }
            }
        },
    }
}


def completion_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    streamed = {"text/event-stream": {"schema": _STREAM_EVENT}}
    ok = {
        "model": model,
        "description": "The whole response, or with `stream` its chunks.",
        "content": streamed,
    }
    return {200: ok, **COMPLETION_ERRORS}


def tokens_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """``/tokenize`` or ``/detokenize``: the answer, or an error (no engine work: no 429, no 5xx
    but Redis's)."""
    return {
        200: {"model": model},
        400: _error("Invalid request, e.g. a token id outside the vocabulary."),
        **AUTH_ERRORS,
        404: MODEL_NOT_FOUND,
        413: COMPLETION_ERRORS[413],
        503: _error("No live worker serves the model, or Redis is unreachable.", retry_after=True),
    }


TOKEN_PATHS = ("/tokenize", "/detokenize")
"""Served at the root, as ``vllm serve`` serves them, and behind the same keys as ``/v1``."""


def embedding_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "One vector per input, in order."}, **COMPLETION_ERRORS}


def install(app: FastAPI, auth: bool, max_n: int) -> None:
    """Serve the adjusted document as ``/openapi.json``; ``max_n`` is this deployment's limit on n."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _adjust(generate(), auth, max_n)  # FastAPI caches the document it returns
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _adjust(schema: dict[str, Any], auth: bool, max_n: int) -> None:
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if path in ("/v1/chat/completions", "/v1/completions"):
                operation.setdefault("parameters", []).extend(RESUMPTION_HEADERS)
            elif path == "/v1/batches" and operation.get("operationId", "").startswith("create"):
                operation.setdefault("parameters", []).append(BATCH_IDEMPOTENCY)
            elif path == "/v1/responses":
                operation.setdefault("parameters", []).append(RESPONSE_IDEMPOTENCY)
            if auth and (path.startswith("/v1/") or path in TOKEN_PATHS):
                operation["security"] = [{"bearer": []}]
            for response in operation["responses"].values():
                response["headers"] = {**response.get("headers", {}), "x-request-id": _REQUEST_ID}
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        models.pop(unused, None)
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        models[request]["properties"]["n"]["maximum"] = max_n
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
