"""The gateway's view of the models live workers serve, read from their heartbeats in Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.fleet import BadRecords, known_models, live_workers
from shared.messages import WorkerInfo
from shared.names import Names


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    tokenizer: str
    max_model_len: int
    created: int
    engine: str = "vllm"


class WorkerRegistry:
    """Lists the models served by live workers (see :func:`shared.fleet.is_live`); cached briefly
    per process."""

    def __init__(self, redis: Redis, names: Names, worker_ttl: float, cache_seconds: float = 0.5) -> None:
        self._redis = redis
        self._names = names
        self._ttl = worker_ttl
        self._cache_seconds = cache_seconds
        self._cached: dict[str, ModelEntry] = {}
        self._cached_at = float("-inf")
        self._bad = BadRecords()

    async def models(self) -> dict[str, ModelEntry]:
        now = time.monotonic()
        if now - self._cached_at > self._cache_seconds:
            self._cached = aggregate(await live_workers(self._redis, self._names, self._ttl, self._bad))
            self._cached_at = now
        return self._cached

    async def known(self, model: str) -> bool:
        """Has any worker ever served this model here?"""
        return model in await known_models(self._redis, self._names)


def aggregate(workers: list[WorkerInfo]) -> dict[str, ModelEntry]:
    """Fold live workers' heartbeats into one entry per model: the tokenizer and start time of its
    oldest worker, the smallest context length any of them has."""
    entries: dict[str, ModelEntry] = {}
    for w in sorted(workers, key=lambda w: w.started_at):
        prev = entries.get(w.model)
        entries[w.model] = ModelEntry(
            name=w.model,
            tokenizer=prev.tokenizer if prev else w.tokenizer,
            max_model_len=min(prev.max_model_len, w.max_model_len) if prev else w.max_model_len,
            created=prev.created if prev else int(w.started_at),
            engine=prev.engine if prev else w.engine,
        )
    return entries
