"""A background task that keeps the gateway's queue gauges (and batch figures) fresh from Redis.

Prometheus collectors are synchronous, so they cannot read Redis during a scrape without blocking
the event loop; instead this task reads a snapshot every couple of seconds and sets the gauges.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.batches import batch_figures
from gateway.metrics import GatewayMetrics
from shared.fleet import BadRecords, gather
from shared.names import Names

log = logging.getLogger(__name__)

PERIOD = 2.0


class QueueProbe:
    def __init__(
        self, redis: Redis, names: Names, metrics: GatewayMetrics, worker_ttl: float, period: float = PERIOD
    ) -> None:
        self._redis = redis
        self._names = names
        self._metrics = metrics
        self._worker_ttl = worker_ttl
        self._period = period
        self._bad = BadRecords()

    async def refresh(self) -> bool:
        """One reading; False (and ``redis_up`` 0) when Redis did not answer in time."""
        try:
            snap = await asyncio.wait_for(
                gather(self._redis, self._names, self._worker_ttl, self._bad), self._period * 2
            )
            figures = await asyncio.wait_for(batch_figures(self._redis, self._names), self._period * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("queue probe: %s", exc)
            self._metrics.redis_up.set(0)
            return False
        self._metrics.queues(snap)
        self._metrics.batches.update(figures.batches, figures.lines, figures.finished)
        return True

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._period)
