"""Handing a job to another worker (prefix affinity), and receiving one.

The giver transfers the stream entry to the taker's name in the consumer group (``XCLAIM ...
JUSTID``, which does not count as a delivery) and tells it on its inbox channel; the taker reads
the entry and starts it. When nobody hears that, the giver claims the entry back and runs it.
Failover is untouched: an entry handed to a worker that died before taking it is pending under
that worker like any of its jobs, and another worker takes it over after ``reclaim_idle``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from shared.names import GROUP, Names
from worker.listen import listen

SEPARATOR = "\n"  # no stream name or entry id holds a line break

Take = Callable[[str, str, dict[bytes, bytes] | None], Awaitable[None]]
"""Start a handed-over job: stream, entry id, fields."""


async def hand_over(redis: Redis, names: Names, stream: str, entry_id: str, worker: str, giver: str) -> bool:
    """Give the entry to ``worker``; False when nobody listened on its inbox (it is starting, or its
    subscription is being renewed): the entry is then claimed back for ``giver`` to run, rather
    than left pending under a worker that does not know of it until ``reclaim_idle``."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xclaim(stream, GROUP, worker, 0, [entry_id], justid=True)
        pipe.publish(names.inbox(worker), f"{stream}{SEPARATOR}{entry_id}")
        _, listeners = await pipe.execute()
    if listeners:
        return True
    await redis.xclaim(stream, GROUP, giver, 0, [entry_id], justid=True)
    return False


async def receive(redis: Redis, names: Names, worker_id: str, stopping: asyncio.Event, take: Take) -> None:
    """Start every job handed to this worker until ``stopping``."""

    async def handle(data: str) -> None:
        stream, _, entry_id = data.partition(SEPARATOR)
        found = await redis.xrange(stream, entry_id, entry_id)
        if found:  # else it ended meanwhile (another worker took it over and finished it)
            await take(stream, entry_id, found[0][1])

    await listen(redis, names.inbox(worker_id), stopping, handle)
