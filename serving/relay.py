"""Relaying one admitted request's replies to its client: as SSE events, or as one JSON body.

Every stream ends with ``[DONE]`` after a finish reason, or with an error event: whatever goes wrong
after the response has started (a worker failure, Redis lost, a defect here) reaches the client as
an OpenAI error the SDK raises, never as a stream that simply stops.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio
from fastapi import Request

from api.assembly import FullAssembler, StreamAssembler
from api.errors import APIError, InternalError, UpstreamFailure
from api.sse import encode, sse
from serving.admission import Admission, Ticket
from serving.lifecycle import Lifecycle
from shared.messages import Final, Job, Started, Tokens, Usage, UsageEvent

T = TypeVar("T")

log = logging.getLogger(__name__)


class Replies(Protocol):
    """What is relayed of a request: its job's reply stream (:class:`~serving.dispatch.ReplyStream`),
    or its jobs' merged into one (:class:`~serving.fanout.FanIn`)."""

    job: Job
    error: str | None
    restartable: bool

    def __aiter__(self) -> AsyncIterator[Started | Tokens | Final]: ...

    def interrupt(self, error: APIError) -> None: ...

    def usage(self) -> Usage: ...

    async def close(self) -> None: ...


class Admitted:
    """An admitted request: its reply stream and its reservation, released together, and known to
    the process's lifecycle until then (a draining gateway waits for it, or cuts it)."""

    def __init__(self, replies: Replies, ticket: Ticket, admission: Admission, lifecycle: Lifecycle) -> None:
        self.replies = replies
        self.ticket = ticket
        self._admission = admission
        self._lifecycle = lifecycle
        self._closed = False
        lifecycle.opened(self)

    def interrupt(self, error: APIError) -> None:
        self.replies.interrupt(error)

    async def close(self) -> None:
        """Stop listening (cancelling the job if it is unfinished) and settle the tokens it used.
        Shielded: a cancelled client must not skip telling the worker to stop."""
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self.replies.close()
                usage, job = self.replies.usage(), self.replies.job
                served = UsageEvent(
                    tenant=job.tenant,
                    model=job.model,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    error=self.replies.error or "",
                )
                await self._admission.settle(self.ticket, usage, served)
        finally:
            self._lifecycle.closed(self)


async def collect(replies: Replies, assembler: FullAssembler) -> dict[str, Any]:
    async for reply in replies:
        if isinstance(reply, Started) and reply.seq == 0:
            assembler.restart()  # the job started, or started over on another worker
        elif isinstance(reply, Tokens):
            assembler.tokens(reply)
        elif isinstance(reply, Final):
            return assembler.response(reply)
    raise UpstreamFailure("the reply stream ended without a final message")


DONE = sse("[DONE]")


async def sse_events(request: Admitted, assembler: StreamAssembler) -> AsyncIterator[bytes]:
    """SSE events of one streamed response, as bytes; an error after the start becomes an error
    event."""
    try:
        async for reply in request.replies:
            if isinstance(reply, Tokens | Final):
                for event in assembler.events(reply):
                    yield event
        yield DONE
    except APIError as exc:
        yield encode(exc.envelope())
    except Exception:  # a defect: the client must still learn the stream is broken
        log.exception("stream of %s failed", request.replies.job.id)
        yield encode(InternalError(request_id=request.replies.job.id).envelope())
    finally:
        await request.close()


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``work`` unless the client disconnects first (then ``None``)."""
    result: list[T] = []
    failure: list[APIError] = []
    async with anyio.create_task_group() as group:

        async def run() -> None:
            try:
                result.append(await work())
            except APIError as exc:  # re-raised below, not wrapped in an ExceptionGroup
                failure.append(exc)
            group.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    if failure:
        raise failure[0]
    return result[0] if result else None
