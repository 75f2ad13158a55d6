"""The job streams of a worker's model, found through the streams index, with the consumer group
ensured on each new one."""

from __future__ import annotations

import time

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.fleet import stream_records
from shared.names import GROUP, Names
from shared.tenants import PRIORITY_WEIGHT

STREAMS_REFRESH = 0.25
"""How stale the list may be: a new tenant's first job waits at most this."""


class JobStreams:
    def __init__(self, redis: Redis, names: Names, model: str) -> None:
        self._redis = redis
        self._names = names
        self._model = model
        self.weights: dict[str, int] = {}
        """Stream -> the weight of its tenant's priority class."""
        self._streams: list[str] = []
        self._read_at = float("-inf")

    async def current(self) -> list[str]:
        """Every job stream of the model (re-read from the index at most every STREAMS_REFRESH s)."""
        now = time.monotonic()
        if now - self._read_at < STREAMS_REFRESH:
            return self._streams
        records = await stream_records(self._redis, self._names, self._model)
        self.weights = {s: PRIORITY_WEIGHT.get(r.priority, 1) for s, r in records.items()}
        streams = sorted(self.weights)
        known = set(self._streams) if self._read_at > float("-inf") else set()
        for stream in set(streams) - known:
            await self._ensure_group(stream)
        self._streams, self._read_at = streams, now
        return streams

    def recheck(self, exc: BaseException) -> None:
        """After a command error, ensure every stream's group again on the next read.

        Almost always the error is NOGROUP (Redis restarted without its data). The text cannot tell:
        redis-py 6 replaces a pipelined command's error message with a template, so any error reply
        counts; creating a group that exists is a no-op (BUSYGROUP).
        """
        if isinstance(exc, ResponseError):
            self._read_at = float("-inf")

    async def _ensure_group(self, stream: str) -> None:
        try:
            # From id 0: jobs enqueued before the group existed must not be skipped.
            await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
