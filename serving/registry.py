"""The gateway's view of the models live workers serve, read from their heartbeats in Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from redis.asyncio import Redis

from serving.chat import Answering
from serving.shared_reads import SharedReads
from shared.fleet import BadRecords, known_models, live_workers, model_records
from shared.messages import EmbeddingModel, WorkerInfo
from shared.names import Names


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    tokenizer: str
    max_model_len: int
    created: int
    engine: str = "vllm"
    live: bool = True
    """False: no worker serves it now, but one will be started for it (scaled to zero)."""
    answering: Answering = field(default_factory=Answering)
    """How its answers are parsed (tool calls, reasoning), as its oldest worker says."""
    max_logprobs: int = 20
    embedding: EmbeddingModel | None = None
    """Set for an embedding model (its oldest worker's): it answers embeddings, not completions."""


class WorkerRegistry:
    """Lists the models served by live workers (see :func:`shared.fleet.is_live`), and with
    ``scale_from_zero`` also those served here before, which an autoscaler starts workers for;
    cached briefly per process; requests that find the cache out of date wait for one read."""

    def __init__(
        self,
        redis: Redis,
        names: Names,
        worker_ttl: float,
        cache_seconds: float = 0.5,
        scale_from_zero: bool = False,
    ) -> None:
        self._redis = redis
        self._names = names
        self._ttl = worker_ttl
        self._cache_seconds = cache_seconds
        self._scale_from_zero = scale_from_zero
        self._cached: dict[str, ModelEntry] = {}
        self._cached_at = float("-inf")
        self._reads: SharedReads[None, dict[str, ModelEntry]] = SharedReads()
        self._bad = BadRecords()

    async def models(self) -> dict[str, ModelEntry]:
        if time.monotonic() - self._cached_at <= self._cache_seconds:
            return self._cached
        return await self._reads.get(None, self._refresh)

    async def find(self, model: str) -> ModelEntry | None:
        """``model``'s entry, read again when the cache lacks it: a worker that has just joined
        serves at once rather than after a cache period of 503s."""
        cached_at = self._cached_at
        entry = (await self.models()).get(model)
        if entry is None and self._cached_at == cached_at:  # from the cache, not a read just now
            entry = (await self._reads.get(None, self._refresh)).get(model)
        return entry

    async def _refresh(self) -> dict[str, ModelEntry]:
        started = time.monotonic()
        self._cached = await self._read()
        self._cached_at = started
        return self._cached

    async def _read(self) -> dict[str, ModelEntry]:
        entries = aggregate(await live_workers(self._redis, self._names, self._ttl, self._bad))
        if self._scale_from_zero:
            for model, last in (await model_records(self._redis, self._names, self._bad)).items():
                if model not in entries:
                    entries[model] = replace(aggregate([last])[model], live=False)
        return entries

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
            answering=prev.answering
            if prev
            else Answering(w.tool_call_parser, w.auto_tool_choice, w.reasoning_parser),
            max_logprobs=min(prev.max_logprobs, w.max_logprobs) if prev else w.max_logprobs,
            embedding=prev.embedding if prev else w.embedding,
        )
    return entries
