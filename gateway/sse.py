"""The streamed answer's HTTP response: sse-starlette's, lean on the path every event takes."""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping

from sse_starlette import EventSourceResponse
from starlette.types import Message, Send

SEPARATOR = "\n"
"""Line ending of SSE events, as OpenAI and vLLM send them: clients that split events on a blank
line written as ``\\n\\n`` (vLLM's benchmark client among them) misread ``\\r\\n`` streams."""


class EventStream(EventSourceResponse):
    """sse-starlette's response, which sends each event without a cancel scope of its own when no
    send timeout is set (the gateway sets none): sse-starlette opens one per send even then, and
    entering and leaving it cost more than the rest of the relay's work for an event."""

    def __init__(self, events: AsyncIterable[bytes], ping: float, headers: Mapping[str, str] | None = None):
        super().__init__(events, ping=ping, headers=headers, sep=SEPARATOR)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True  # as sse-starlette's own: no closing send after this
            raise
