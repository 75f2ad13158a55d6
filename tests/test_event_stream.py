"""The streamed answer's response (gateway/sse.py): sse-starlette's, without a cancel scope per send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sse_starlette import EventSourceResponse
from starlette.types import Message

from gateway.sse import EventStream


async def _events() -> AsyncIterator[bytes]:
    yield b"data: one\n\n"
    yield b"data: two\n\ndata: [DONE]\n\n"


async def _run(response: EventStream, fail_at: int | None = None) -> list[Message]:
    sent: list[Message] = []
    disconnect = asyncio.Event()

    async def receive() -> Message:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if fail_at is not None and len(sent) == fail_at:
            raise OSError("the client went away")
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": []}
    try:
        await response(scope, receive, send)
    finally:
        disconnect.set()
    return sent


def test_the_hook_it_overrides_is_sse_starlettes() -> None:
    # A release of sse-starlette that renamed it would leave every send in a cancel scope again.
    assert callable(getattr(EventSourceResponse, "_send_with_timeout", None))


async def test_events_go_out_as_given_then_the_closing_body() -> None:
    sent = await _run(EventStream(_events(), ping=10))
    assert sent[0]["type"] == "http.response.start"
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    assert bodies == [(b"data: one\n\n", True), (b"data: two\n\ndata: [DONE]\n\n", True), (b"", False)]


async def test_a_failed_send_ends_the_stream_with_no_closing_body() -> None:
    response = EventStream(_events(), ping=10)
    with pytest.raises(OSError):
        await _run(response, fail_at=2)
    assert response._send_interrupted
    assert not response._response_complete
