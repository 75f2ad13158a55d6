"""The other live workers of a worker's model, and what every worker and stream holds right now.

Two cheap reads feed :mod:`worker.balance` and, in a fleet, :class:`~worker.planner.Headroom`: the
peers' heartbeats (who is live and not draining, with what capacity; re-read at most every
:data:`PEERS_REFRESH` seconds, as membership changes slowly) and, before a read, one pipelined
``XLEN`` + ``XPENDING`` per job stream (:func:`peek`): how many jobs wait and run in each stream
and how many each consumer holds, exact at that instant, where a heartbeat's ``inflight`` may be
seconds old.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.fleet import live_workers
from shared.messages import WorkerInfo
from shared.names import GROUP, Names, as_text
from worker.prefix_affinity import Peer

PEERS_REFRESH = 1.0
"""How stale the list of peers may be: a worker that joins gets its share within this."""


class Peers:
    """The live workers of ``model`` other than ``worker_id`` that take jobs, with their capacities.

    A worker counts as live for sharing while its heartbeat is at most ``ttl`` seconds old: shorter
    than the gateway's notion, so that a worker that died stops being left jobs soon (jobs left for
    it are taken by others after :data:`~worker.balance.SHARE_GRACE` anyway)."""

    def __init__(self, redis: Redis, names: Names, model: str, worker_id: str, ttl: float) -> None:
        self._redis = redis
        self._names = names
        self._model = model
        self._worker_id = worker_id
        self._ttl = ttl
        self._workers: list[WorkerInfo] = []
        self._read_at = float("-inf")

    async def _refresh(self) -> list[WorkerInfo]:
        now = time.monotonic()
        if now - self._read_at >= PEERS_REFRESH:
            workers = await live_workers(self._redis, self._names, self._ttl)
            self._workers = [
                w for w in workers if w.model == self._model and w.id != self._worker_id and not w.draining
            ]
            self._read_at = now
        return self._workers

    async def current(self) -> dict[str, int]:
        """Peer id -> its capacity (re-read from the heartbeats at most every PEERS_REFRESH s)."""
        return {w.id: w.capacity for w in await self._refresh()}

    async def loads(self) -> list[Peer]:
        """The peers with the jobs their last heartbeat reported, for prefix affinity."""
        return [Peer(w.id, w.inflight, w.capacity) for w in await self._refresh()]


@dataclass(frozen=True, slots=True)
class Loads:
    """One look at the model's streams: jobs waiting and running in each, jobs each consumer holds."""

    waiting: dict[str, int]
    pending: dict[str, int]
    """Jobs of each stream that some worker has taken and not finished."""
    held: Counter[str]
    """Jobs each consumer (worker) holds, over every stream."""


async def peek(redis: Redis, streams: list[str]) -> Loads:
    """Jobs waiting per stream (``XLEN`` less ``XPENDING``: finished jobs leave their stream) and jobs
    held per consumer, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xpending(stream, GROUP)
        replies = await pipe.execute()
    waiting: dict[str, int] = {}
    running: dict[str, int] = {}
    held: Counter[str] = Counter()
    for stream, length, pending in zip(streams, replies[::2], replies[1::2], strict=True):
        running[stream] = int(pending["pending"])
        waiting[stream] = max(0, int(length) - running[stream])
        for row in pending.get("consumers") or ():
            held[as_text(row["name"])] += int(row["pending"])
    return Loads(waiting, running, held)
