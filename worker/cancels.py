"""Client disconnects, as the gateways announce them on one channel: abort those jobs here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio import Redis

from shared.names import Names
from worker.listen import listen


async def listen_for_cancels(
    redis: Redis, names: Names, stopping: asyncio.Event, cancel: Callable[[str], object]
) -> None:
    """Call ``cancel(job_id)`` for every announced cancel until ``stopping``; resubscribes after a
    lost connection (a job whose cancel was missed meanwhile still finds the cancelled marker when
    it starts, or runs to its end)."""

    async def handle(job_id: str) -> None:
        cancel(job_id)

    await listen(redis, names.cancel_channel(), stopping, handle)
