"""The streamed answer's response (gateway/sse.py): sse-starlette's, without a cancel scope per send
and with one task beside the stream: disconnects, pings, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
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


class _Client:
    """An ASGI client side: records what is sent, disconnects when told to."""

    def __init__(self, fail_pings: bool = False) -> None:
        self.sent: list[Message] = []
        self.gone = asyncio.Event()
        self.streaming = asyncio.Event()
        self._fail_pings = fail_pings

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self._fail_pings and message.get("body", b"").startswith(b": ping"):
            raise OSError("the client went away")
        self.sent.append(message)
        self.streaming.set()

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


async def _forever(closed: list[bool]) -> AsyncIterator[bytes]:
    try:
        yield b"data: one\n\n"
        await asyncio.Event().wait()
        yield b"data: never\n\n"
    finally:
        closed.append(True)


async def test_a_client_that_leaves_ends_the_stream_and_closes_its_events() -> None:
    client, closed = _Client(), list[bool]()
    response = EventStream(_forever(closed), ping=10)
    call = asyncio.create_task(response({"type": "http", "method": "POST"}, client.receive, client.send))
    await client.streaming.wait()
    client.gone.set()
    await asyncio.wait_for(call, 2)  # returns: the response is over, the task was not cancelled
    assert closed == [True]
    assert client.bodies() == [b"data: one\n\n"]  # no closing body to a client that left
    assert response._client_disconnected and not response.active and not call.cancelled()


async def test_pings_go_out_while_nothing_else_does_and_stop_with_the_stream() -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        await asyncio.sleep(0.35)
        yield b"data: two\n\n"

    client = _Client()
    await EventStream(slow(), ping=0.1)({"type": "http", "method": "POST"}, client.receive, client.send)
    bodies = client.bodies()
    assert bodies[0] == b"data: one\n\n" and b"data: two\n\n" in bodies and bodies[-1] == b""
    pings = [b for b in bodies if b.startswith(b": ping - ")]
    assert 1 <= len(pings) <= 4 and all(p.endswith(b"\n\n") for p in pings)
    assert len(pings) == len(bodies) - 3  # nothing else went out
    await asyncio.sleep(0.25)
    assert client.bodies() == bodies  # nothing after the closing body


async def test_a_ping_that_cannot_be_sent_ends_the_stream() -> None:
    client, closed = _Client(fail_pings=True), list[bool]()
    response = EventStream(_forever(closed), ping=0.05)
    await asyncio.wait_for(response({"type": "http", "method": "POST"}, client.receive, client.send), 2)
    assert closed == [True] and response._send_interrupted
    assert client.bodies() == [b"data: one\n\n"]


async def test_a_cancel_from_outside_still_cancels_the_task() -> None:
    client, closed = _Client(), list[bool]()
    response = EventStream(_forever(closed), ping=10)
    call = asyncio.create_task(response({"type": "http", "method": "POST"}, client.receive, client.send))
    await client.streaming.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert closed == [True]


async def test_head_gets_the_headers_and_no_stream() -> None:
    client, closed = _Client(), list[bool]()
    await asyncio.wait_for(
        EventStream(_forever(closed), ping=10)(
            {"type": "http", "method": "HEAD"}, client.receive, client.send
        ),
        2,
    )
    assert client.sent[0]["type"] == "http.response.start"
    assert client.bodies() == [b""]


async def test_a_client_that_leaves_while_the_stream_cleans_up_does_not_cut_its_shielded_part() -> None:
    # The relay settles a request and closes its replies in its events' cleanup, shielded by anyio:
    # the watch's cut must hold off there, as sse-starlette's task group's does.
    cleaned: list[bool] = []
    left = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):
                left.set()
                await asyncio.sleep(0.05)
            cleaned.append(True)

    client = _Client()
    call = asyncio.create_task(
        EventStream(events(), ping=10)({"type": "http", "method": "POST"}, client.receive, client.send)
    )
    await left.wait()
    client.gone.set()
    await asyncio.wait_for(call, 2)
    assert cleaned == [True] and not call.cancelled()
