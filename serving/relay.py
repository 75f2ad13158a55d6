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
from serving.dispatch import ReplyStream
from serving.lifecycle import Lifecycle
from serving.resume import EventId, Resumable, with_id
from shared.messages import Final, Job, Started, Tokens, Usage, UsageEvent, Vectors

T = TypeVar("T")

log = logging.getLogger(__name__)


class Replies(Protocol):
    """What is relayed of a request: its job's reply stream (:class:`~serving.dispatch.ReplyStream`),
    or its jobs' merged into one (:class:`~serving.fanout.FanIn`)."""

    job: Job
    error: str | None
    restartable: bool
    epoch: str
    """The attempt that began the answer, which a resumable stream's event ids name."""
    attached: int
    """Clients that had taken the stream up when this one began following it."""

    @property
    def finished(self) -> bool: ...

    def __aiter__(self) -> AsyncIterator[Started | Tokens | Vectors | Final]: ...

    def interrupt(self, error: APIError) -> None: ...

    def usage(self) -> Usage: ...

    async def keep(self, seconds: float) -> None: ...

    async def close(self, stop: bool = True) -> None: ...


class _Following:
    """A request's hold on a job's replies, known to the process's lifecycle until it closes (a
    draining gateway waits for it, or cuts it). Closing is idempotent and shielded: a cancelled
    client must not skip telling the worker to stop; what else closing does is :meth:`_release`."""

    replies: Replies

    def __init__(self, replies: Replies, lifecycle: Lifecycle) -> None:
        self.replies = replies
        self._lifecycle = lifecycle
        self._closed = False
        lifecycle.opened(self)

    @property
    def lifecycle(self) -> Lifecycle:
        return self._lifecycle

    def interrupt(self, error: APIError) -> None:
        self.replies.interrupt(error)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self._release()
        finally:
            self._lifecycle.closed(self)

    async def _release(self) -> None:
        raise NotImplementedError


class Admitted(_Following):
    """An admitted request: its reply stream and its reservation, released together.

    ``keep``: seconds to keep the job's replies once it ended (an ``Idempotency-Key``'s life), so
    the same request sent again is answered from them."""

    def __init__(
        self,
        replies: Replies,
        ticket: Ticket,
        admission: Admission,
        lifecycle: Lifecycle,
        keep: float | None = None,
    ) -> None:
        self.ticket = ticket
        self._admission = admission
        self._keep = keep
        super().__init__(replies, lifecycle)

    async def _release(self) -> None:
        """Stop listening (cancelling the job if it is unfinished) and settle the tokens it used."""
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
        if self._keep and self.replies.finished:
            await self.replies.keep(self._keep)


class Attached(_Following):
    """A stream taken up again (``Last-Event-ID``, or a request sent again under its
    ``Idempotency-Key``): the replies of a job another request admitted, which settles it."""

    replies: ReplyStream

    def __init__(self, replies: ReplyStream, lifecycle: Lifecycle, stop_on_close: bool) -> None:
        self._stop = stop_on_close
        """Stop the job if it has not ended when this closes (a stream whose client left for good);
        not for a whole answer sent again, whose first request may still wait for it."""
        super().__init__(replies, lifecycle)

    async def _release(self) -> None:
        await self.replies.close(stop=self._stop)


Following = Admitted | Attached


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


async def sse_events(
    request: Following,
    assembler: StreamAssembler,
    resumable: Resumable | None = None,
    after: EventId | None = None,
) -> AsyncIterator[bytes]:
    """SSE events of one streamed response, as bytes: a reply's events at once (one send for the
    last reply's chunks and ``[DONE]``). An error after the start becomes an error event. With
    ``resumable`` every event has an id, and a client whose connection drops may take the stream
    up again (after the grace, the job stops); ``after`` is where such a client left off: the
    events up to it are not sent again."""
    replies = request.replies
    ended = False
    try:
        async for reply in replies:
            if not isinstance(reply, Tokens | Final):
                continue
            events = assembler.events(reply)
            if isinstance(reply, Final):
                events.append(DONE)
            if resumable is not None:
                here = [EventId(replies.job.id, replies.epoch, reply.seq, k) for k in range(len(events))]
                events = [
                    with_id(e, at)
                    for e, at in zip(events, here, strict=True)
                    if after is None or after.before(at)
                ]
            if events:
                yield events[0] if len(events) == 1 else b"".join(events)
        ended = True
    except APIError as exc:
        ended = True
        yield encode(exc.envelope())
    except Exception:  # a defect: the client must still learn the stream is broken
        ended = True
        log.exception("stream of %s failed", replies.job.id)
        yield encode(InternalError(request_id=replies.job.id).envelope())
    finally:
        if ended or resumable is None or replies.finished:
            await request.close()
        else:  # the client went away: give it a while to come back
            request.lifecycle.spawn(resumable.linger(request), f"linger-{replies.job.id}")


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
