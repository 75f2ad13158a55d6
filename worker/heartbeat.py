"""Worker registration: a heartbeat that tells gateways which model this worker serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.messages import WorkerInfo, encode
from shared.names import Names

log = logging.getLogger(__name__)

FORGET_AFTER = 24 * 3600
"""Seconds after which a silent worker's entry is dropped from the workers index."""


class Heartbeat:
    def __init__(
        self,
        redis: Redis,
        names: Names,
        info: WorkerInfo,
        interval: float,
        status: Callable[[], dict[str, Any]],
        on_beat: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_beat = on_beat
        self._redis = redis
        self._names = names
        self._info = info
        self._interval = interval
        self._status = status

    @property
    def ttl(self) -> int:
        return max(10, round(self._interval * 5))

    async def beat(self) -> None:
        now = time.time()
        info = self._info.model_copy(update={"heartbeat_at": now, **self._status()})
        payload = encode(info)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._names.worker(info.id), payload, ex=self.ttl)
            pipe.zadd(self._names.workers(), {info.id: now})
            pipe.hset(self._names.models(), info.model, payload)
            pipe.zremrangebyscore(self._names.workers(), "-inf", now - FORGET_AFTER)
            await pipe.execute()

    async def run(self, stopping: asyncio.Event) -> None:
        """Beat every interval until cancelled, and once more as soon as ``stopping`` is set, so
        that gateways and autoscalers see at once that the worker drains (it keeps beating while
        its jobs finish: its claims and its place in the fleet stay visible)."""
        while True:
            self._on_beat()  # the event loop turns, whether or not Redis answers
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
            if stopping.is_set():
                await asyncio.sleep(self._interval)
            else:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
                # arrives as the event is set (a SIGTERM does both), and the worker never exits.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await stopping.wait()

    async def withdraw(self) -> None:
        """Leave the index at once so gateways stop routing here."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._names.worker(self._info.id))
                pipe.zrem(self._names.workers(), self._info.id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not deregister: %s", exc)
