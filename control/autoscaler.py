"""``switchyard up --autoscale MIN:MAX``: workers started and retired by the scaling decision.

Every couple of seconds it reads the fleet from Redis (the durable backlog, the workers' heartbeats)
and asks :func:`gateway.scaling.decide` how many workers the model should have. More: it starts
them. Fewer: it retires the worker running the fewest jobs by draining it (SIGTERM: it takes no new
jobs, finishes or hands back the ones it has, so no request is lost or cut). With MIN 0 the model
scales to zero; its requests then wait in their stream while a worker starts.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from control.children import Child
from gateway.admission import DrainMeter
from gateway.scaling import Scaler, scaling_policy
from shared.fleet import gather

if TYPE_CHECKING:
    from control.supervisor import Supervisor

log = logging.getLogger(__name__)

PERIOD = 2.0


def worker_id(child: Child) -> str:
    return child.env.get("SWITCHYARD_WORKER_ID", "")


class LocalAutoscaler:
    def __init__(self, supervisor: Supervisor, period: float = PERIOD) -> None:
        self.period = period
        self._supervisor = supervisor
        # The gateway's settings carry the policy (and --autoscale's bounds): the gateway exports
        # the very decision applied here.
        self._scaler = Scaler(scaling_policy(supervisor.gateway))
        self._drain = DrainMeter()
        self._redis: Redis | None = None
        self._failing = False

    def _workers(self) -> list[Child]:
        return [c for c in self._supervisor.children.all if c.name.startswith("worker") and not c.retired]

    async def tick(self) -> None:
        worker = self._supervisor.worker
        model = worker.served_model_name or worker.model
        if self._redis is None:
            self._redis = Redis.from_url(worker.redis_url, socket_timeout=5)
        try:
            snap = await gather(self._redis, worker.names, self._supervisor.gateway.worker_ttl)
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("autoscaler cannot read the fleet (%s); holding the workers as they are", exc)
            self._failing = True
            return
        self._failing = False
        self._drain.observe(snap)
        ours = self._workers()
        serving = {w.id: w for w in snap.serving(model)}
        live = {w.id for w in snap.workers if w.live}
        starting = [c for c in ours if worker_id(c) not in live]
        decisions = self._scaler.observe(
            snap,
            self._drain.rate,
            capacity=worker.capacity,
            starting=lambda m: len(starting) if m == model else 0,
        )
        decision = decisions.get(model)
        if decision is None:
            return
        have = len([c for c in ours if worker_id(c) in serving]) + len(starting)
        if decision.desired > have:
            log.info("autoscale: %d -> %d worker(s) (%s)", have, decision.desired, decision.reason)
            for _ in range(decision.desired - have):
                self._supervisor.add_worker()
        elif decision.desired < have:
            log.info("autoscale: %d -> %d worker(s) (%s)", have, decision.desired, decision.reason)
            # The least busy first; a worker still starting holds no jobs at all.
            by_load = sorted(
                ours, key=lambda c: serving[worker_id(c)].inflight if worker_id(c) in serving else -1
            )
            for child in by_load[: have - decision.desired]:
                child.retired = True  # not started again when it exits
                child.signal(signal.SIGTERM)  # it drains: no new jobs, running ones finish or go back

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
