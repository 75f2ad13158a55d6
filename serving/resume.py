"""Streams a client can take up again after its connection drops.

A request that asks for it (``stream_options: {"resumable": true}``) gets an id on every event:
the job, the attempt that began the answer, the reply and the event within it. A client whose
connection drops sends the same request again, to this gateway or another, with the last id it
saw as ``Last-Event-ID``: the gateway reads the job's replies back from Redis, rebuilds the answer
up to there and sends the rest, then follows the job live (``Dispatcher.attach``) — nothing
repeated, nothing missing. Meanwhile the job goes on: the gateway that lost the client keeps
following it for a grace period (``SWITCHYARD_RESUME_GRACE``), and stops it only if nobody took
the stream up by then; it settles the request's tokens as ever.

A job that started over on another worker (several choices, or an answer held by a grammar, after
its worker died) began a new answer: its stream cannot be taken up where the old one stopped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from api.errors import APIError, InvalidRequest, UpstreamFailure
from serving.dispatch import Dispatcher

if TYPE_CHECKING:
    from serving.relay import Following

log = logging.getLogger(__name__)

_ID = re.compile(r"^([0-9a-f]{32})\.([0-9a-f]{8})\.(\d{1,9})\.(\d{1,4})$")


@dataclass(frozen=True, slots=True)
class EventId:
    """Where an event stands in a job's answer: its id on the wire, ``job.epoch.seq.k``."""

    job: str
    """The job's id (``req_`` and 32 hex digits)."""
    epoch: str
    seq: int
    """The reply the event was made of."""
    k: int
    """Its place among that reply's events."""

    def __str__(self) -> str:
        return f"{self.job.removeprefix('req_')}.{self.epoch}.{self.seq}.{self.k}"

    @classmethod
    def parse(cls, text: str) -> EventId:
        match = _ID.match(text.strip())
        if match is None:
            raise InvalidRequest("Last-Event-ID is not an event id of this API", param="Last-Event-ID")
        job, epoch, seq, k = match.groups()
        return cls("req_" + job, epoch, int(seq), int(k))

    def before(self, other: EventId) -> bool:
        """Whether ``other`` comes after this event in the same answer; an answer that started
        over since cannot be taken up where this one stopped."""
        if other.epoch != self.epoch:
            raise UpstreamFailure(
                "the answer started over on another worker since: this stream cannot be taken up",
                code="stream_restarted",
            )
        return (other.seq, other.k) > (self.seq, self.k)


def with_id(event: bytes, here: EventId) -> bytes:
    """An SSE event (``data: ...`` and a blank line) with its id."""
    return event[:-1] + b"id: " + str(here).encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class Resumable:
    """What a resumable stream needs when its client goes away."""

    dispatcher: Dispatcher
    grace: float
    poll: float = 1.0

    async def linger(self, request: Following) -> None:
        """Keep following the job of a client that went away. If no client took its stream up
        within the grace period, stop the job; if one did, follow it to its end (so it is
        settled), or until the gateway that took it up stops it."""
        replies = request.replies
        job = replies.job.id
        # Counted from when this client began, not from when its drop was noticed: a client quick
        # to come back may have taken the stream up elsewhere before this gateway saw it leave.
        before = replies.attached
        try:

            async def follow() -> None:
                try:
                    async for _ in replies:
                        pass
                except APIError as exc:
                    log.info("job %s of a client that went away ended: %s", job, exc.code)
                group.cancel_scope.cancel()

            async def watch() -> None:
                await anyio.sleep(self.grace)
                if await self.dispatcher.attachments(job) == before:
                    log.info("nobody took up the stream of job %s in %.0fs: stopping it", job, self.grace)
                    group.cancel_scope.cancel()
                    return
                while True:  # taken up elsewhere: until the job ends, or that gateway stops it
                    if await self.dispatcher.was_cancelled(job):
                        break
                    await anyio.sleep(self.poll)
                group.cancel_scope.cancel()

            async with anyio.create_task_group() as group:
                group.start_soon(follow)
                group.start_soon(watch)
        except Exception:  # Redis gone, say: the job is stopped below either way
            log.exception("following job %s after its client left failed", job)
        finally:
            await request.close()
