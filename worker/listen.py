"""A worker's standing subscription to one channel, kept across lost connections."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.names import as_text

log = logging.getLogger(__name__)

RESUBSCRIBE_AFTER = 1.0
"""Seconds between a lost connection and the next subscription attempt."""


async def listen(
    redis: Redis, channel: str, stopping: asyncio.Event, handle: Callable[[str], Awaitable[None]]
) -> None:
    """Await ``handle(data)`` for every message published on ``channel`` until ``stopping``;
    subscribes again after a lost connection (messages published meanwhile are missed)."""
    while not stopping.is_set():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            async for message in pubsub.listen():
                if message["type"] == "message":
                    await handle(as_text(message["data"]))
        except (RedisError, OSError) as exc:
            log.warning("lost %s: %s", channel, exc)
            await asyncio.sleep(RESUBSCRIBE_AFTER)
        finally:
            await pubsub.aclose()
