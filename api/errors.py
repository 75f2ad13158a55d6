"""The errors a client may see, each mapped once to OpenAI's error envelope at the HTTP edge; and
that envelope's shape for the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, the body of every error the gateway answers."""

    error: ErrorDetail


class APIError(Exception):
    """An error a client should see: HTTP status plus OpenAI's ``type``/``code``/``param``."""

    status = 500
    type = "server_error"
    code: str | None = None
    admitted = False
    """True once the request's job was enqueued: its failure is an error, not a rejection."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ModelNotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Unavailable(APIError):
    """No capacity or dependency to serve the request now; the client may retry."""

    status = 503
    type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, round(self.retry_after)))}


class InternalError(APIError):
    """A defect: answered in OpenAI's envelope with the request id to quote; the traceback is logged."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"The server had an error while processing your request (request id {request_id}).")


class Conflict(APIError):
    """The request clashes with the state of what it refers to (a key reused for another body, a
    request taken up after it was stopped)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class Timeout(APIError):
    status = 504
    type = "server_error"
    code = "timeout"


class UpstreamFailure(APIError):
    """The worker side failed the request (or broke the reply protocol)."""

    status = 502
    type = "server_error"
    code = "upstream_error"


def from_status(status: int, code: str, message: str) -> APIError:
    """Rebuild the error a worker reported (status and code travel on the wire)."""
    cls: type[APIError]
    if status == 400:
        cls = InvalidRequest
    elif status == 409:
        cls = Conflict
    elif status == 503:
        cls = Unavailable
    elif status == 504:
        cls = Timeout
    else:
        cls = UpstreamFailure
    return cls(message, code=code)


class AuthenticationFailed(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"}


class RateLimited(APIError):
    """Over a tenant's limit or share: retry after the given seconds."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.extra_headers = headers or {}

    def headers(self) -> dict[str, str]:
        return {**self.extra_headers, "retry-after": str(max(1, round(self.retry_after + 0.499)))}
