"""``switchyard up --autoscale MIN:MAX``: workers started and retired by the scaling decision.

It drives a :class:`WorkerPool`, which the supervisor is: the autoscaler decides, the pool starts
and stops processes.

Every couple of seconds it reads the fleet from Redis (the durable backlog, the workers' heartbeats)
and asks :func:`scaling.decision.decide` how many workers the model should have. More: it starts
them. Fewer: it retires the worker running the fewest jobs by draining it (SIGTERM: it takes no new
jobs, finishes or hands back the ones it has, so no request is lost or cut). With MIN 0 the model
scales to zero; its requests then wait in their stream while a worker starts.
"""

from __future__ import annotations

import logging
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from scaling.decision import Scaler, scaling_policy
from serving.admission import DrainMeter
from shared.fleet import gather
from shared.settings import GatewaySettings, WorkerSettings

log = logging.getLogger(__name__)

PERIOD = 2.0


class WorkerPool(Protocol):
    """The worker processes of one host, as the autoscaler sees them."""

    def worker_ids(self) -> list[str]:
        """The worker ids of the workers running or starting, not those being retired."""
        ...

    def add_worker(self) -> object:
        """Start one more worker."""
        ...

    def retire(self, worker_id: str) -> None:
        """Drain this worker (SIGTERM: no new jobs, running ones finish or go back) and let it go."""
        ...


class LocalAutoscaler:
    def __init__(
        self, pool: WorkerPool, gateway: GatewaySettings, worker: WorkerSettings, period: float = PERIOD
    ) -> None:
        self.period = period
        self._pool = pool
        self._gateway = gateway
        self._worker = worker
        # The gateway's settings carry the policy (and --autoscale's bounds): the gateway exports
        # the very decision applied here.
        self._scaler = Scaler(scaling_policy(gateway))
        self._drain = DrainMeter()
        self._redis: Redis | None = None
        self._failing = False

    async def tick(self) -> None:
        worker = self._worker
        model = worker.served_model_name or worker.model
        if self._redis is None:
            self._redis = Redis.from_url(worker.redis_url, socket_timeout=5)
        try:
            snap = await gather(self._redis, worker.names, self._gateway.worker_ttl)
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("autoscaler cannot read the fleet (%s); holding the workers as they are", exc)
            self._failing = True
            return
        self._failing = False
        self._drain.observe(snap)
        ours = self._pool.worker_ids()
        serving = {w.id: w for w in snap.serving(model)}
        live = {w.id for w in snap.workers if w.live}
        starting = [w for w in ours if w not in live]
        decisions = self._scaler.observe(
            snap,
            self._drain.rate,
            capacity=worker.capacity,
            starting=lambda m: len(starting) if m == model else 0,
        )
        decision = decisions.get(model)
        if decision is None:
            return
        have = len([w for w in ours if w in serving]) + len(starting)
        if decision.desired > have:
            log.info("autoscale: %d -> %d worker(s) (%s)", have, decision.desired, decision.reason)
            for _ in range(decision.desired - have):
                self._pool.add_worker()
        elif decision.desired < have:
            log.info("autoscale: %d -> %d worker(s) (%s)", have, decision.desired, decision.reason)
            # The least busy first; a worker still starting holds no jobs at all.
            by_load = sorted(ours, key=lambda w: serving[w].inflight if w in serving else -1)
            for worker_id in by_load[: have - decision.desired]:
                self._pool.retire(worker_id)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
