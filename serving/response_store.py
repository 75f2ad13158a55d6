"""Stored responses of the Responses API in Redis: one hash per response, under its tenant's id
(``Tenant.id``: a tenant removed and its name given again is a new tenant, which finds none of
them), forgotten after ``SWITCHYARD_RESPONSE_TTL``.

A response is stored when it ends (``store: true``); a background one as soon as it is accepted
(``queued``), then moved to ``in_progress`` when a worker starts it and to its end by the gateway
that follows it, while that gateway holds the response's lease. Every status move is one atomic
step that only an unfinished response takes, so a cancel, a result and a lost follower's failure
never overwrite each other. Another tenant's response id names no key at all: it is not found.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from api.responses.protocol import FINISHED
from shared.names import Names
from shared.scripts import ResponseScripts

UNFINISHED = ("queued", "in_progress")
LEASE = 15.0
"""Seconds a background response's lease outlives its follower's last renewal."""


@dataclass(frozen=True, slots=True)
class Stored:
    status: str
    response: dict[str, Any]
    """The response object as it reads now (its status and any error included)."""
    conversation: list[dict[str, Any]]
    job: str

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class ResponseStore:
    def __init__(self, redis: Redis, names: Names, ttl: float) -> None:
        self._redis = redis
        self._names = names
        self._ttl = max(1, round(ttl))
        self._scripts = ResponseScripts(redis)

    async def put(
        self, tenant: str, response: dict[str, Any], conversation: list[dict[str, Any]], job: str
    ) -> None:
        """Keep a response that has ended."""
        await self._write(tenant, response, conversation, job, lease=False)

    async def open(
        self, tenant: str, response: dict[str, Any], conversation: list[dict[str, Any]], job: str
    ) -> None:
        """Keep a background response (``queued``) and take its lease."""
        await self._write(tenant, response, conversation, job, lease=True)

    async def _write(
        self, tenant: str, response: dict[str, Any], conversation: list[dict[str, Any]], job: str, lease: bool
    ) -> None:
        key = self._names.response(tenant, response["id"])
        fields = {
            "status": response["status"],
            "response": _dumps(response),
            "conversation": _dumps(conversation),
            "job": job,
            "created_at": response["created_at"],
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self._ttl)
            if lease:
                pipe.set(self._names.response_lease(response["id"]), b"1", px=round(LEASE * 1000))
            await pipe.execute()

    async def get(self, tenant: str, response_id: str) -> Stored | None:
        raw = await self._redis.hgetall(self._names.response(tenant, response_id))  # type: ignore[misc]
        if not raw or b"response" not in raw:
            return None
        status = raw[b"status"].decode()
        response = {**json.loads(raw[b"response"]), "status": status}
        if b"error" in raw:
            response["error"] = json.loads(raw[b"error"])
        return Stored(status, response, json.loads(raw.get(b"conversation", b"[]")), raw[b"job"].decode())

    async def move(
        self, tenant: str, response_id: str, status: str, sources: tuple[str, ...], **fields: Any
    ) -> tuple[bool, str]:
        """Move the response to ``status`` if its status is one of ``sources``, setting ``fields``
        (JSON unless text) in the same step; (whether it moved, the status before)."""
        args: list[Any] = [status, int(time.time()), len(sources), *sources]
        for name, value in fields.items():
            args += [name, value if isinstance(value, str) else _dumps(value)]
        moved, before = await self._scripts.move(keys=[self._names.response(tenant, response_id)], args=args)
        return bool(moved), before.decode() if isinstance(before, bytes) else str(before)

    async def finish(self, tenant: str, response: dict[str, Any]) -> bool:
        """Record how an unfinished (background) response ended; False if it had ended already
        (cancelled, or failed for want of a follower)."""
        key = self._names.response(tenant, response["id"])
        moved, _ = await self.move(tenant, response["id"], response["status"], UNFINISHED, response=response)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.expire(key, self._ttl)
            pipe.delete(self._names.response_lease(response["id"]))
            await pipe.execute()
        return moved

    async def keep(self, response_id: str) -> None:
        """Renew the lease on a background response this process follows."""
        await self._redis.set(self._names.response_lease(response_id), b"1", px=round(LEASE * 1000))

    async def followed(self, response_id: str) -> bool:
        """Whether some process still holds the response's lease."""
        return bool(await self._redis.exists(self._names.response_lease(response_id)))

    async def status(self, tenant: str, response_id: str) -> str | None:
        raw = await self._redis.hget(self._names.response(tenant, response_id), "status")  # type: ignore[misc]
        return raw.decode() if raw is not None else None

    async def delete(self, tenant: str, response_id: str) -> bool:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._names.response(tenant, response_id))
            pipe.delete(self._names.response_lease(response_id))
            deleted, _ = await pipe.execute()
        return bool(deleted)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
