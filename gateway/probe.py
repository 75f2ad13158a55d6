"""A background task that reads the fleet's state from Redis every couple of seconds and feeds it
to what needs it: the queue gauges (and the Batch API's figures), the drain meter (admission's
backlog and Retry-After) and the scaling decision the gateway exports.

Prometheus collectors are synchronous, so they cannot read Redis during a scrape without blocking
the event loop; this task reads a snapshot and sets the gauges instead.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from batch.batches import batch_figures
from gateway.metrics import GatewayMetrics
from scaling.decision import Scaler
from serving.admission import DrainMeter
from shared.fleet import BadRecords, gather
from shared.names import Names

log = logging.getLogger(__name__)

PERIOD = 2.0


class QueueProbe:
    def __init__(
        self,
        redis: Redis,
        names: Names,
        metrics: GatewayMetrics,
        worker_ttl: float,
        drain: DrainMeter,
        scaler: Scaler,
        period: float = PERIOD,
    ) -> None:
        self._redis = redis
        self._names = names
        self._metrics = metrics
        self._worker_ttl = worker_ttl
        self._drain = drain
        self._scaler = scaler
        self._period = period
        self._bad = BadRecords()
        self._failing = False

    async def refresh(self) -> bool:
        """One reading; False (and ``redis_up`` 0) when Redis did not answer in time."""
        try:
            async with asyncio.timeout(self._period * 2):
                snap = await gather(self._redis, self._names, self._worker_ttl, self._bad)
                figures = await batch_figures(self._redis, self._names)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._failing:  # its figures decide 503s: say when they stop being fresh
                log.warning(
                    "reading the fleet's state failed (%s); its figures go stale", exc or type(exc).__name__
                )
            self._failing = True
            self._metrics.redis_up.set(0)
            return False
        if self._failing:
            log.info("reading the fleet's state works again")
        self._failing = False
        self._drain.observe(snap)
        self._metrics.queues(snap)
        self._metrics.scaling(self._scaler.observe(snap, self._drain.rate))
        self._metrics.batches.update(figures.batches, figures.lines, figures.finished)
        return True

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._period)
