"""Batches of the Batch API in Redis: created by a gateway, run by the background role, cancelled and
read by either, each status move one atomic step; and the OpenAI ``batch`` object they show as.

A batch belongs to the tenant that created it; any other tenant is told it does not exist.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from api.batches.protocol import BatchCreateRequest
from api.errors import InvalidRequest, NotFound, RateLimited
from batch.files import Conflict, Files
from shared.batches import BatchRequest, BatchState, is_batch_id, new_batch_hash, owned_by, owner_key, sources
from shared.names import Names
from shared.scripts import BatchScripts
from shared.settings import GatewaySettings
from shared.tenants import Tenant

COMPLETION_WINDOW = 24 * 3600
BATCH_LIMIT_RETRY = 60.0
"""Retry-After of a batch refused for its tenant's limit: batches take minutes to hours."""
TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def batch_object(state: BatchState) -> dict[str, Any]:
    """OpenAI's ``batch`` object."""
    req = state.request
    errors = None
    if state.errors:
        data = [e.model_dump() for e in state.errors]
        errors = {"object": "list", "data": data}
    return {
        "id": req.id,
        "object": "batch",
        "endpoint": req.endpoint,
        "model": state.model,
        "errors": errors,
        "input_file_id": req.input_file_id,
        "completion_window": req.completion_window,
        "status": state.status,
        "output_file_id": state.output_file_id,
        "error_file_id": state.error_file_id,
        "created_at": req.created_at,
        "expires_at": req.expires_at,
        **{name: state.times.get(name) for name in TIMESTAMPS},
        "request_counts": {"total": state.total, "completed": state.completed, "failed": state.failed},
        "usage": {
            "input_tokens": state.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": state.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": state.prompt_tokens + state.completion_tokens,
        },
        "metadata": req.metadata,
    }


def _owns(owner: Tenant, state: BatchState) -> bool:
    return owned_by(owner.name, owner.id, state.request.tenant, state.request.tenant_id)


@dataclass
class BatchPage:
    states: list[BatchState]
    has_more: bool


class Batches:
    def __init__(self, redis: Redis, settings: GatewaySettings) -> None:
        self._redis = redis
        self._names: Names = settings.names
        self._retention = settings.batch_ttl
        self._scripts = BatchScripts(redis)

    async def create(
        self, owner: Tenant, body: BatchCreateRequest, files: Files, batch_id: str | None = None
    ) -> BatchState:
        """A new batch of ``owner``, ``validating`` until the background role takes it; ``batch_id``
        when the caller chose it already (an ``Idempotency-Key`` names it first)."""
        source = await files.get(owner, body.input_file_id, param="input_file_id")
        if source.purpose != "batch":
            raise InvalidRequest(
                f"file {source.id} was uploaded with purpose '{source.purpose}', not 'batch'",
                param="input_file_id",
            )
        now = int(time.time())
        request = BatchRequest(
            id=batch_id or new_batch_id(),
            tenant=owner.name,
            tenant_id=owner.id,
            endpoint=body.endpoint,
            input_file_id=source.id,
            metadata=body.metadata,
            created_at=now,
            expires_at=now + COMPLETION_WINDOW,
            output_ttl=body.output_expires_after.seconds if body.output_expires_after else None,
        )
        n, owner_id = self._names, owner_key(request)
        keys = [n.batch(request.id), n.batches(owner.name), n.active_batches()]
        keys += [n.tenant_active_batches(owner_id), n.batch_turns()]
        pairs = [x for item in new_batch_hash(request).items() for x in item]
        limit = owner.max_batches or 0
        created = await self._scripts.create(
            keys=keys, args=[limit, request.id, time.time() * 1000, owner_id, *pairs]
        )
        if int(created[0]) != 1:
            raise RateLimited(
                f"tenant '{owner.name}' has {int(created[1])} batches not finished, its limit of {limit}; "
                "wait for one to end or cancel one",
                retry_after=BATCH_LIMIT_RETRY,
                code="batch_limit_reached",
            )
        return BatchState(request=request, status="validating")

    async def load(self, batch_id: str) -> BatchState | None:
        raw = await self._redis.hgetall(self._names.batch(batch_id))  # type: ignore[misc]
        return BatchState.from_hash(raw) if raw else None

    async def get(self, owner: Tenant, batch_id: str) -> BatchState:
        """The tenant's batch, or 404 (also for another tenant's)."""
        state = await self.load(batch_id) if is_batch_id(batch_id) else None
        if state is None or not _owns(owner, state):
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return state

    async def page(self, owner: Tenant, after: str | None, limit: int) -> BatchPage:
        """The tenant's batches, newest first, after the batch ``after``."""
        key = self._names.batches(owner.name)
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(key, after)
            if rank is None:
                raise InvalidRequest(f"after: no batch {after} to continue from", param="after")
            start = int(rank) + 1
        ids = await self._redis.zrange(key, start, start + limit, desc=True)
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(self._names.batch(batch_id.decode()))
            raws = await pipe.execute()
        states = [s for s in (BatchState.from_hash(raw) for raw in raws if raw) if _owns(owner, s)]
        return BatchPage(states[:limit], len(ids) > limit)

    async def cancel(self, owner: Tenant, batch_id: str) -> BatchState:
        """Ask for the batch to stop: ``cancelling`` until the process running it has stopped its
        lines (then ``cancelled``). Cancelling a cancelled batch again changes nothing; a batch that
        already ended otherwise gets 409."""
        state = await self.get(owner, batch_id)
        if state.status in ("cancelling", "cancelled"):
            return state
        if not await self.move(batch_id, "cancelling"):
            state = await self.get(owner, batch_id)
            if state.status not in ("cancelling", "cancelled"):
                raise Conflict(
                    f"batch {batch_id} is {state.status} and cannot be cancelled", param="batch_id"
                )
        return await self.get(owner, batch_id)

    async def move(self, batch_id: str, to: str, **fields: str | int) -> bool:
        """Move the batch to status ``to`` if it may go there from where it is (one atomic step,
        with ``fields`` set alongside). False when it may not (e.g. it was cancelled meanwhile)."""
        froms = sources(to)
        pairs = [x for item in fields.items() for x in item]
        args = [to, int(time.time()), len(froms), *froms, *pairs]
        moved, _ = await self._scripts.move(keys=[self._names.batch(batch_id)], args=args)
        return bool(int(moved))

    async def finished(self, batch_id: str) -> None:
        """A batch reached a final status: it is no longer active, its record goes after the
        retention time, and its lines' results (in its files now) go at once."""
        n = self._names
        state = await self.load(batch_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(n.batch_expiry(), {batch_id: time.time() + self._retention})
            pipe.delete(n.batch_jobs(batch_id), n.batch_results(batch_id))
            await pipe.execute()
        await self.retire(batch_id, owner_key(state.request) if state else None)

    async def retire(self, batch_id: str, owner: str | None) -> None:
        """The batch waits for no slot any more (finished, or its record is gone)."""
        n = self._names
        if owner is None:
            await self._redis.srem(n.active_batches(), batch_id)  # type: ignore[misc]
            return
        keys = [n.active_batches(), n.tenant_active_batches(owner), n.batch_turns()]
        await self._scripts.retire(keys=keys, args=[batch_id, owner])

    async def active(self) -> list[str]:
        return sorted(i.decode() for i in await self._redis.smembers(self._names.active_batches()))  # type: ignore[misc]

    async def expire(self, now: float) -> int:
        """Delete the records of batches finished longer ago than the retention time."""
        n = self._names
        due = [i.decode() for i in await self._redis.zrangebyscore(n.batch_expiry(), "-inf", now)]
        for batch_id in due:
            await self.delete(batch_id)
        return len(due)

    async def delete(self, batch_id: str) -> None:
        """Delete a batch's record and all it keeps in Redis (its files are files of their own)."""
        n = self._names
        state = await self.load(batch_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            if state is not None:
                pipe.zrem(n.batches(state.request.tenant), batch_id)
            pipe.delete(n.batch(batch_id), n.batch_results(batch_id), n.batch_jobs(batch_id))
            pipe.zrem(n.batch_expiry(), batch_id)
            await pipe.execute()
        await self.retire(batch_id, owner_key(state.request) if state else None)


@dataclass
class BatchFigures:
    """What the batch metrics show (see :class:`gateway.metrics.BatchCollector`)."""

    batches: dict[str, int]
    lines: dict[str, int]
    finished: dict[str, int]


async def batch_figures(redis: Redis, names: Names) -> BatchFigures:
    """Unfinished batches by status and their lines by state, and lines finished ever."""
    ids = [i.decode() for i in await redis.smembers(names.active_batches())]  # type: ignore[misc]
    async with redis.pipeline(transaction=False) as pipe:
        for batch_id in ids:
            pipe.hmget(names.batch(batch_id), ["status", "total", "completed", "failed"])
            pipe.hlen(names.batch_jobs(batch_id))
        pipe.hgetall(names.batch_stats())
        *per_batch, stats = await pipe.execute()
    batches: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for (status, total, completed, failed), running in zip(per_batch[::2], per_batch[1::2], strict=True):
        if status is None:
            continue
        batches[status.decode()] += 1
        done, bad = int(completed or 0), int(failed or 0)
        lines.update(
            completed=done,
            failed=bad,
            running=int(running),
            queued=max(0, int(total or 0) - done - bad - int(running)),
        )
    finished = {k.decode(): int(v) for k, v in stats.items()}
    return BatchFigures(dict(batches), dict(lines), finished)
