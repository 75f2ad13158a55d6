"""The gateway's view of live workers, read from their heartbeats in Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.messages import WorkerInfo
from shared.names import Names


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    tokenizer: str
    max_model_len: int
    workers: int
    capacity: int
    created: int


class WorkerRegistry:
    """Lists the models served by workers whose heartbeat is fresh; cached briefly per process."""

    def __init__(self, redis: Redis, names: Names, worker_ttl: float, cache_seconds: float = 0.5) -> None:
        self._redis = redis
        self._names = names
        self._ttl = worker_ttl
        self._cache_seconds = cache_seconds
        self._cached: dict[str, ModelEntry] = {}
        self._cached_at = float("-inf")

    async def models(self) -> dict[str, ModelEntry]:
        now = time.monotonic()
        if now - self._cached_at > self._cache_seconds:
            self._cached = await self._read()
            self._cached_at = now
        return self._cached

    async def known(self, model: str) -> bool:
        """Has any worker ever served this model here?"""
        return bool(await self._redis.hexists(self._names.models(), model))  # type: ignore[misc]

    async def _read(self) -> dict[str, ModelEntry]:
        since = time.time() - self._ttl
        ids = await self._redis.zrangebyscore(self._names.workers(), since, "+inf")
        if not ids:
            return {}
        raws = await self._redis.mget([self._names.worker(i.decode()) for i in ids])
        workers = [WorkerInfo.model_validate_json(raw) for raw in raws if raw is not None]
        return aggregate(workers)


def aggregate(workers: list[WorkerInfo]) -> dict[str, ModelEntry]:
    """Fold worker heartbeats into one entry a model (pure, for the unit tests)."""
    entries: dict[str, ModelEntry] = {}
    for w in sorted(workers, key=lambda w: w.started_at):
        prev = entries.get(w.model)
        entries[w.model] = ModelEntry(
            name=w.model,
            tokenizer=prev.tokenizer if prev else w.tokenizer,
            max_model_len=min(prev.max_model_len, w.max_model_len) if prev else w.max_model_len,
            workers=(prev.workers if prev else 0) + 1,
            capacity=(prev.capacity if prev else 0) + w.capacity,
            created=prev.created if prev else int(w.started_at),
        )
    return entries
