"""Reads new jobs from the model's tenant streams while the worker has room.

Reading stops while the worker is at capacity, so jobs wait in Redis (visible to ``XLEN``) rather
than in a worker's memory, and any worker with room can take them. Which tenant's jobs a read takes
is :mod:`worker.planner`'s decision; how many of the waiting jobs this worker takes, and when it
leaves the next one to a less busy worker, is :mod:`worker.balance`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.names import GROUP, as_text
from worker.balance import Load, Spread, stands_back
from worker.channel import Claim
from worker.inflight import Inflight
from worker.peers import Peers, peek
from worker.planner import Headroom, ReadPlan, fleet_shares, within
from worker.preempt import victim, wanted
from worker.streams import JobStreams

log = logging.getLogger(__name__)

READ_BLOCK_MS = 250
STAND_BACK = 0.025
"""Seconds a worker that stands back or left jobs for others waits (unless one of its own jobs ends)
before it looks at the streams again: short, since it is also how soon it notices jobs that wait."""

Entry = tuple[str, str, dict[bytes, bytes] | None]
Reads = list[tuple[list[str], int]]
Take = Callable[[str, str, dict[bytes, bytes] | None, int], Awaitable[None]]
"""Start (or refuse) the job of a stream entry: stream, entry id, fields, delivery count."""


class Reader:
    def __init__(
        self,
        redis: Redis,
        redis_url: str,
        worker_id: str,
        streams: JobStreams,
        inflight: Inflight,
        headroom_window: float,
        take: Take,
        peers: Peers | None = None,
        preempt: bool = False,
        resume: Callable[[Claim], None] | None = None,
    ) -> None:
        self._redis = redis
        self._redis_url = redis_url
        self._worker_id = worker_id
        self._streams = streams
        self._inflight = inflight
        self._take = take
        self._peers = peers
        self._preempt = preempt
        self._resume = resume
        self._plan = ReadPlan()
        self._headroom = Headroom(headroom_window, inflight.capacity)
        self._spread = Spread()
        self._blocking = redis
        self._blocked_id: int | None = None
        self._wakers: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def run(self, stopping: asyncio.Event) -> None:
        # Blocking reads while a stream is held back (see _read_once) use a connection of their
        # own, which a job that ends can wake with CLIENT UNBLOCK.
        self._blocking = Redis.from_url(self._redis_url, single_connection_client=True)
        backoff = 0.1
        try:
            while not stopping.is_set():
                if not self._preempt:
                    await self._inflight.room.wait()
                if stopping.is_set():
                    break
                try:
                    if self._inflight.room.is_set():
                        await self._read_once()
                    else:
                        await self._read_preempting()
                    backoff = 0.1
                except (RedisError, OSError) as exc:
                    self._streams.recheck(exc)
                    log.warning("reading jobs failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            self._stopping = True
            await self._blocking.aclose()

    async def _read_once(self) -> None:
        streams = await self._streams.current()
        held = self._inflight.held()
        peers = await self._peers.current() if self._peers is not None and streams else {}
        loads = await peek(self._redis, streams) if peers else None
        if loads is None:  # alone: the room kept for a tenant is what it held here lately
            self._headroom.update(held, time.monotonic())
        else:  # in a fleet: its share of what the tenant holds on every worker
            fleet = self._inflight.capacity + sum(peers.values())
            self._headroom.update(
                fleet_shares(loads.pending, self._inflight.capacity, fleet), time.monotonic()
            )
        rooms = self._headroom.room(streams, held, self._inflight.free(), self._streams.weights)
        if self._resume_parked(rooms):
            return
        if not rooms:  # no tenants yet, or the free slots are kept for tenants not sending right now
            await self._pause(READ_BLOCK_MS / 1000)
            return
        if loads is None:  # alone: every job waiting is this worker's to take
            reads = self._reads(rooms, max(rooms.values()))
            await self._read(reads, rooms, len(rooms) == len(streams))
            return
        me = Load(len(self._inflight), self._inflight.capacity)
        others = [Load(min(loads.held[p], cap), cap) for p, cap in peers.items()]
        waiting = {s: n for s in rooms if (n := loads.waiting.get(s, 0))}
        if waiting:
            count = self._spread.take(sum(waiting.values()), me, others, time.monotonic())
            if count:
                reads = self._reads({s: rooms[s] for s in waiting}, count)
                await self._start(await read_now(self._redis, self._worker_id, reads))
            if count < min(sum(waiting.values()), me.free):
                await self._pause(STAND_BACK)  # the rest is the others' for now: let them come for it
            return
        self._spread.settled()
        if stands_back(me, others):
            await self._pause(STAND_BACK)
            return
        await self._read([], rooms, len(rooms) == len(streams))

    async def _read_preempting(self) -> None:
        """With every slot held: wait for a job of a tenant below its fair share, and when one comes,
        take it and park a job of the tenant most above its share (see :mod:`worker.preempt`).
        Returns when a slot frees up, or after at most ``READ_BLOCK_MS``."""
        streams = await self._streams.current()
        capacity, weights = self._inflight.capacity, self._streams.weights
        want = wanted(streams, self._inflight.running(), self._inflight.preemptible(), capacity, weights)
        if not want:
            await self._pause(READ_BLOCK_MS / 1000)
            return
        self._blocked_id = await self._blocking.client_id()
        try:  # a job that ends meanwhile cuts the wait short (wake): the normal read takes over
            reply = await self._blocking.xreadgroup(
                GROUP, self._worker_id, {s: ">" for s in want}, count=1, block=READ_BLOCK_MS
            )
        finally:
            self._blocked_id = None
        for stream, entry_id, fields in _entries(reply):
            await self._take(stream, entry_id, fields, 1)
            self._make_room(stream)

    def _resume_parked(self, rooms: dict[str, int]) -> bool:
        """Resume jobs parked to make room for another tenant's before reading new ones, as far as
        the room left for their streams allows (so not into the room kept for the tenant they made
        way for). True if any resumed."""
        resumed = False
        for claim in self._inflight.parked() if self._resume else ():
            if rooms.get(claim.stream, 0) > 0 and self._inflight.free() > 0:
                rooms[claim.stream] -= 1
                self._inflight.unpark(claim.job.id)
                self._resume(claim)  # type: ignore[misc]
                resumed = True
        return resumed

    def _make_room(self, stream: str) -> None:
        """Stop jobs of the streams most above their share until the jobs running fit the slots."""
        capacity, weights = self._inflight.capacity, self._streams.weights
        while (held := self._inflight.running()).total() > capacity:
            loser = victim(stream, held, self._inflight.preemptible(), capacity, weights)
            if loser is None or (job_id := self._inflight.preempt(loser)) is None:
                return  # the job waits in the engine for a slot, as it would have in the queue
            log.debug("job %s of %s yields its slot to a job of %s", job_id, loser, stream)

    def _reads(self, rooms: dict[str, int], count: int) -> Reads:
        """Up to ``count`` jobs in all from the streams of ``rooms``, shared by the read plan."""
        weights = {s: self._streams.weights.get(s, 1) for s in rooms}
        return within(self._plan.plan(weights, min(count, max(rooms.values()))), rooms)

    async def _read(self, reads: Reads, rooms: dict[str, int], every_stream: bool) -> None:
        """``reads`` now, or when they find nothing, a blocking read on every stream of ``rooms``."""
        if every_stream:
            entries = await read_fairly(self._redis, self._worker_id, reads, list(rooms))
        else:
            # A stream held back by the headroom regains room when one of its jobs ends, which a
            # read blocked on the other streams would not notice: the job's end unblocks it.
            self._blocked_id = await self._blocking.client_id()
            try:
                entries = await read_fairly(
                    self._redis, self._worker_id, reads, list(rooms), blocking=self._blocking
                )
            finally:
                self._blocked_id = None
        await self._start(entries)

    async def _start(self, entries: list[Entry]) -> None:
        for stream, entry_id, fields in entries:
            await self._take(stream, entry_id, fields, 1)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if one of this worker's jobs ends meanwhile."""
        self._inflight.finished.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._inflight.finished.wait()

    def wake(self) -> None:
        """Cut short a read blocked while some stream was held back (a slot just freed up)."""
        if self._blocked_id is None or self._stopping:
            return

        async def unblock(client_id: int) -> None:
            with contextlib.suppress(RedisError, OSError):  # the read then just times out
                await self._redis.client_unblock(client_id)

        task = asyncio.create_task(unblock(self._blocked_id))
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)


async def read_now(redis: Redis, consumer: str, reads: Reads) -> list[Entry]:
    """Take the entries ``reads`` asks for (see :class:`~worker.planner.ReadPlan`) in one round trip,
    without waiting for any."""
    if not reads:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for names, count in reads:
            pipe.xreadgroup(GROUP, consumer, {s: ">" for s in names}, count=count)
        replies = await pipe.execute()
    return [entry for reply in replies for entry in _entries(reply)]


async def read_fairly(
    redis: Redis,
    consumer: str,
    reads: Reads,
    streams: list[str],
    blocking: Redis | None = None,
) -> list[Entry]:
    """Take new entries by ``reads`` in one round trip; when none is waiting there, block on every
    stream (``streams``) for whichever job arrives first (on ``blocking``, a client of its own, when
    given)."""
    entries = await read_now(redis, consumer, reads)
    if entries:
        return entries
    reply = await (blocking or redis).xreadgroup(
        GROUP, consumer, {s: ">" for s in streams}, count=1, block=READ_BLOCK_MS
    )
    return _entries(reply)


def _entries(reply: object) -> list[Entry]:
    """XREADGROUP's reply as (stream, entry id, fields) triples."""
    return [
        (as_text(stream), as_text(entry_id), fields)
        for stream, items in reply or ()  # type: ignore[attr-defined]
        for entry_id, fields in items
    ]
