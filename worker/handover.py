"""Handing a job to another worker (prefix affinity), and receiving one.

In one script (``shared.scripts.HAND_OVER``) the giver checks that the taker has a free slot beside
the one its own next read may take, transfers the stream entry to the taker's name in the consumer
group (``XCLAIM ... JUSTID``, which does not count as a delivery) and tells it on its inbox channel;
the taker reads the entry and starts it. When the taker is that busy, or nobody hears it, the
giver runs the job. Failover is untouched: an entry handed to a worker that died before taking it
is pending under that worker like any of its jobs, and another worker takes it over after
``reclaim_idle``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio import Redis

from shared.names import GROUP, Names
from shared.scripts import HAND_OVER
from worker.listen import listen
from worker.outbox import Outbox
from worker.prefix_affinity import Peer

SEPARATOR = "\n"  # no stream name or entry id holds a line break
SPARE = 1
"""Free slots a taker keeps for its own reading: one with a single free slot is about to read a job
itself, and a job handed to it at that moment would wait in its engine for another slot (measured
with four saturated simulated workers: B's first token up to 0.6 s late, ``loadtest/fairness.py``)."""

Take = Callable[[str, str, dict[bytes, bytes] | None], Awaitable[None]]
"""Start a handed-over job: stream, entry id, fields."""


async def hand_over(
    outbox: Outbox,
    names: Names,
    entry: tuple[str, str],
    streams: Sequence[str],
    taker: Peer,
    giver: str,
) -> bool:
    """Give ``entry`` (stream, id) to ``taker``; False, with the entry still the giver's, when the
    taker has fewer than ``SPARE`` + 1 free slots (its jobs counted in ``streams``, every job stream of
    the model: its heartbeat may be a beat old, and other workers may be handing it jobs too) or when
    nobody listened on its inbox (it is starting, or its subscription is being renewed), rather than
    leave the job waiting in a full engine or pending under a worker that does not know of it."""
    stream, entry_id = entry
    keys = [stream, *streams]
    message = f"{stream}{SEPARATOR}{entry_id}"
    most = taker.capacity - SPARE
    args = [GROUP, taker.id, giver, entry_id, most, names.inbox(taker.id), message]
    (result,) = await outbox.send(HAND_OVER.call(keys, args))
    return bool(result == 1)


async def receive(redis: Redis, names: Names, worker_id: str, stopping: asyncio.Event, take: Take) -> None:
    """Start every job handed to this worker until ``stopping``."""

    async def handle(data: str) -> None:
        stream, _, entry_id = data.partition(SEPARATOR)
        found = await redis.xrange(stream, entry_id, entry_id)
        if found:  # else it ended meanwhile (another worker took it over and finished it)
            await take(stream, entry_id, found[0][1])

    await listen(redis, names.inbox(worker_id), stopping, handle)
