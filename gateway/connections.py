"""The gateway's HTTP connections: uvicorn's httptools protocol with two bounds it lacks.

* A client has ``header_timeout`` seconds from its first byte (or from connecting) to finish a
  request's headers; one that sends nothing, or a byte now and then, is disconnected instead of
  holding a connection (and a file descriptor) for ever.
* Past ``max_connections`` connections, or as many requests in progress, a request is answered 503
  in OpenAI's envelope with a ``Retry-After`` (uvicorn's own limit answers in plain text).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import Unavailable

RETRY_AFTER = 1.0


async def overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The answer to a request over the connection limit (an ASGI app)."""
    error = Unavailable("the gateway has too many connections open; retry later", retry_after=RETRY_AFTER)
    body = json.dumps(error.envelope()).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    headers += [(k.encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def connection_protocol(header_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) for these bounds."""

    class GatewayConnection(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm()
            crowded = len(self.connections) > max_connections or len(self.tasks) >= max_connections
            if not crowded:
                super().on_headers_complete()
                return
            app, self.app = self.app, overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GatewayConnection
