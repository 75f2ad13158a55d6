"""ASGI edge concerns: a request id on every response, a hard cap on body size, and an OpenAI error
envelope (with that id) for any exception nothing else handled, its traceback logged once."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError, BodyTooLarge, InternalError

log = logging.getLogger(__name__)


class RequestEdge:
    """Tags every response with ``x-request-id`` and refuses bodies over ``max_body`` bytes.

    The body is read (bounded) before the app sees it, so an oversized upload, chunked or not, is
    answered with 413 as soon as it crosses the limit and nothing is buffered without bound. Paths
    in ``streamed`` (file uploads) have caps of their own and are not buffered here: the app reads
    them as they arrive, and reading past the cap raises 413.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body: int,
        new_id: Callable[[], str],
        streamed: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.new_id = new_id
        self.streamed = dict(streamed or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id: str = self.new_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        cap = self.streamed.get(scope.get("path", ""))
        if scope["method"] in ("POST", "PUT", "PATCH") and cap is not None:
            if _declared(scope) > cap:
                await _reject(send_with_id, BodyTooLarge(f"request body exceeds {cap} bytes"))
                return
            receive = _capped(receive, cap)
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            if body is None:
                await _reject(send_with_id, BodyTooLarge(f"request body exceeds {self.max_body} bytes"))
                return
            receive = _replay(body, receive)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Logged here, once, and not re-raised (the server would log it again and answer in
            # plain text). A response already under way can only be cut; streams report their own
            # failures as error events before they get here.
            log.exception("request %s %s (%s) failed", scope["method"], scope.get("path"), request_id)
            if not started:
                await _reject(send_with_id, InternalError(request_id))

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        if _declared(scope) > self.max_body:
            return None
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(parts)


def _declared(scope: Scope) -> int:
    """The body size the request's content-length announces (0 when it names none)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return 0


def _capped(receive: Receive, cap: int) -> Receive:
    """``receive`` that raises 413 once more than ``cap`` body bytes came through it."""
    size = 0

    async def capped() -> Message:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > cap:
            raise BodyTooLarge(f"request body exceeds {cap} bytes")
        return message

    return capped


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reject(send: Send, error: APIError) -> None:
    payload = json.dumps(error.envelope()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": payload})
