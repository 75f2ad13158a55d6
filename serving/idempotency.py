"""Requests sent again under the same ``Idempotency-Key`` run once.

A client that does not know whether its request got through (a timeout, a dropped connection)
sends it again with the same key: the tenant's key (hashed) remembers what the first request
became for ``SWITCHYARD_IDEMPOTENCY_TTL`` seconds, and the second one gets that answer — followed
live while the job runs, read back from Redis once it ended — instead of a second job. The same key
with another request is a 409: a key stands for one request.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import Conflict, InvalidRequest, Unavailable
from shared.names import Names

log = logging.getLogger(__name__)

MAX_KEY = 256


class KeyReused(Conflict):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__(
            "this Idempotency-Key was sent with another request; a key stands for one request",
            param="Idempotency-Key",
        )


@dataclass(frozen=True, slots=True)
class Earlier:
    """What the first request under a key became."""

    id: str
    """Its job (``req_...``), or the object it created (a batch)."""


@dataclass(frozen=True, slots=True)
class Idempotency:
    redis: Redis
    names: Names
    ttl: float

    def _key(self, tenant: str, key: str) -> str:
        if not key or len(key) > MAX_KEY:
            raise InvalidRequest(
                f"Idempotency-Key must have 1 to {MAX_KEY} characters", param="Idempotency-Key"
            )
        return self.names.idempotency(tenant, hashlib.sha256(key.encode()).hexdigest()[:32])

    async def claim(self, tenant: str, key: str, what: str, id: str) -> Earlier | None:
        """Remember that ``key`` stands for the request ``what`` (a digest of it), about to become
        ``id``; None when this is the first time, else what the first request became. Raises
        :class:`KeyReused` when the key was sent with another request."""
        name = self._key(tenant, key)
        record = json.dumps({"what": what, "id": id})
        try:
            if await self.redis.set(name, record, nx=True, ex=max(1, round(self.ttl))):
                return None
            raw = await self.redis.get(name)
        except (RedisError, OSError) as exc:
            raise Unavailable("the queue is unreachable", retry_after=2) from exc
        if raw is None:  # it expired between the two commands: the first request is forgotten
            return await self.claim(tenant, key, what, id)
        earlier = json.loads(raw)
        if earlier["what"] != what:
            raise KeyReused()
        return Earlier(earlier["id"])

    async def forget(self, tenant: str, key: str, id: str) -> None:
        """The request that claimed ``key`` never ran (refused, or nothing was enqueued): a new
        one may take the key."""
        name = self._key(tenant, key)
        try:
            raw = await self.redis.get(name)
            if raw is not None and json.loads(raw)["id"] == id:
                await self.redis.delete(name)
        except (RedisError, OSError) as exc:  # it expires on its own
            log.warning("could not free Idempotency-Key of %s: %s", id, exc)
