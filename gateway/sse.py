"""The streamed answer's HTTP response: sse-starlette's, lean on the path every event takes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Mapping
from datetime import UTC, datetime

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import ensure_bytes
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

SEPARATOR = "\n"
"""Line ending of SSE events, as OpenAI and vLLM send them: clients that split events on a blank
line written as ``\\n\\n`` (vLLM's benchmark client among them) misread ``\\r\\n`` streams."""


class EventStream(EventSourceResponse):
    """sse-starlette's response, with two costs of its own left out where the gateway needs
    neither:

    - each event is sent without a cancel scope of its own when no send timeout is set (the
      gateway sets none): sse-starlette opens one per send even then, and entering and leaving it
      cost more than the rest of the relay's work for an event;
    - a response runs one task beside the stream instead of a task group of four (the stream,
      pings, the client's disconnect, the server's exit signal): the one task waits for the
      client's disconnect and sends a ping whenever nothing came for the ping interval (a
      disconnect cancels the stream's scope, as sse-starlette's task group would). The exit
      signal is the gateway's own business: a stop first drains the gateway (its lifecycle ends
      every stream, cutting late ones with an error event) and only then stops the server.

    Anything else (HEAD, a send timeout, sse-starlette's callbacks) goes through sse-starlette's
    own ``__call__``."""

    def __init__(self, events: AsyncIterable[bytes], ping: float, headers: Mapping[str, str] | None = None):
        super().__init__(events, ping=ping, headers=headers, sep=SEPARATOR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] == "HEAD"
            or self.send_timeout is not None
            or self.data_sender_callable is not None
            or self.client_close_handler_callable is not None
        ):
            await super().__call__(scope, receive, send)
            return
        # The watch cuts the stream through an anyio scope, not by cancelling this task: the
        # relay's cleanup (settling the request, closing its replies) runs shielded by anyio, which
        # holds against a scope's cancel and not against a plain task cancel.
        with anyio.CancelScope() as cut:
            watch = asyncio.create_task(self._watch(receive, send, cut))
            try:
                await self._stream_response(send)
            finally:
                watch.cancel()
        if self.background is not None:
            await self.background()

    async def _watch(self, receive: Receive, send: Send, cut: anyio.CancelScope) -> None:
        """Until the client disconnects, a ping whenever nothing came for the ping interval; then
        the stream is cut. A ping that cannot be sent cuts it too: the connection is gone."""
        try:
            while True:
                try:
                    async with asyncio.timeout(self.ping_interval or None):
                        message = await receive()
                except TimeoutError:
                    await self._send_ping(send)
                    continue
                if message["type"] == "http.disconnect":
                    self._client_disconnected = True
                    break
        except Exception as exc:
            log.debug("keep-alive failed, ending the stream: %r", exc)
        self.active = False
        cut.cancel()

    async def _send_ping(self, send: Send) -> None:
        ping = (
            self.ping_message_factory()
            if self.ping_message_factory
            else ServerSentEvent(comment=f"ping - {datetime.now(UTC)}", sep=self.sep)
        )
        async with self._send_lock:
            if self.active:
                body = ensure_bytes(ping, self.sep)
                await self._send_with_timeout(
                    send, {"type": "http.response.body", "body": body, "more_body": True}
                )

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True  # as sse-starlette's own: no closing send after this
            raise
