"""Concurrent callers that need the same Redis read wait for one read instead of each making it.

The gateway caches what every request looks up (the fleet's models, a key's tenant) for a moment.
When such an entry runs out, the requests that arrive before it is read again would each read it:
under vLLM's benchmark a wave of 64 requests arrives at once, and read the fleet 64 times.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedReads(Generic[K, V]):
    def __init__(self) -> None:
        self._reads: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        """``read()``'s result, from the read already running for ``key`` if there is one. Its
        error reaches every caller waiting; a caller cancelled meanwhile does not cancel it."""
        running = self._reads.get(key)
        if running is None:
            running = asyncio.ensure_future(read())
            self._reads[key] = running

            def done(f: asyncio.Future[V]) -> None:
                self._reads.pop(key, None)
                if not f.cancelled():
                    f.exception()  # retrieved, for when every caller gave up

            running.add_done_callback(done)
        return await asyncio.shield(running)
