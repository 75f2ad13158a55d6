"""Tenants, their limits, and their API keys, stored in Redis.

A key looks like ``sy-<id>-<secret>``: the id (not secret) finds the key's record, which holds only
a SHA-256 of the whole key; the presented key's hash is compared in constant time. Keys carry 256
random bits, so a fast hash is enough (no password stretching needed) and nothing stored can be
turned back into a usable key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from shared.names import Names

Priority = Literal["interactive", "batch"]
CacheScope = Literal["tenant", "shared"]
"""Who shares an engine's prefix cache: each tenant (or cache group) its own, or everyone."""
PRIORITY_WEIGHT: dict[str, int] = {"interactive": 4, "batch": 1}
"""How many jobs a worker takes from an interactive stream for each one from a batch stream."""

KEY_PREFIX = "sy-"


NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


def new_tenant_id() -> str:
    return secrets.token_hex(8)


class Tenant(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    id: str = Field(default_factory=new_tenant_id, min_length=1, max_length=64)
    """This tenant, as opposed to any other that has the same name before or after it: a name
    removed and given again names a new tenant, which inherits nothing of the old one."""
    # Limits: None takes the deployment's default (``SWITCHYARD_TENANT_*``), 0 is no limit at all.
    rpm: int | None = Field(default=None, ge=0, description="requests per minute")
    tpm: int | None = Field(default=None, ge=0, description="tokens (prompt + max_tokens) per minute")
    max_concurrent: int | None = Field(default=None, ge=0)
    max_backlog: int | None = Field(default=None, ge=0, description="jobs waiting or running at once")
    file_bytes: int | None = Field(default=None, ge=0, description="bytes its stored files may take")
    max_batches: int | None = Field(default=None, ge=0, description="batches not finished at once")
    priority: Priority = "interactive"
    cache_group: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN)
    """Tenants that name the same group trust each other: they share prefix-cache entries."""
    created_at: float = Field(default_factory=time.time)


LIMITS = ("rpm", "tpm", "max_concurrent", "max_backlog", "file_bytes", "max_batches")


@dataclass(frozen=True, slots=True)
class TenantDefaults:
    """The limits of a tenant that sets none of its own: a tenant created without limits must not
    be able to take what every tenant shares (the model's backlog, the file store). None: none."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    max_backlog: int | None = None
    file_bytes: int | None = None
    max_batches: int | None = None

    def apply(self, tenant: Tenant) -> Tenant:
        """The tenant with every limit it leaves unset taken from here, and 0 (none) as None."""
        limits = {}
        for name in LIMITS:
            own = getattr(tenant, name)
            value = getattr(self, name) if own is None else own
            limits[name] = value or None
        return tenant.model_copy(update=limits)


def cache_salt(tenant: Tenant, scope: CacheScope) -> str | None:
    """The salt of the tenant's prompts in the engine's prefix cache: cached blocks are found only
    by prompts with the same salt, so one tenant's prompts never warm the cache for another (whose
    time to first token would tell it what was sent). None: one cache for everyone."""
    if scope == "shared":
        return None
    if tenant.cache_group is not None:
        return f"group:{tenant.cache_group}"
    return f"tenant:{tenant.id}"


class Tombstone(BaseModel):
    """A removed tenant (hash ``Names.removed_tenants``, by its id): what it had is out of reach at
    once and removed by housekeeping, and its usage logged before ``removed_at`` is never counted
    under its name again."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    id: str
    removed_at: float


async def removed_before(redis: Redis, names: Names) -> dict[str, float]:
    """Name -> when the last tenant of that name was removed (Unix seconds)."""
    out: dict[str, float] = {}
    for raw in (await redis.hgetall(names.removed_tenants())).values():  # type: ignore[misc]
        stone = Tombstone.model_validate_json(raw)
        out[stone.name] = max(out.get(stone.name, 0.0), stone.removed_at)
    return out


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    tenant: str
    sha256: str
    created_at: float = Field(default_factory=time.time)


def parse_tenant(raw: bytes | str) -> Tenant:
    """A stored tenant. One stored before tenants had ids gets one derived from its name and
    creation time: the same at every reading, and new if the name is ever given again."""
    data = json.loads(raw)
    if not data.get("id"):
        seed = f"{data.get('name')}:{data.get('created_at')}".encode()
        data["id"] = hashlib.sha256(seed).hexdigest()[:16]
    return Tenant.model_validate(data)


def new_key() -> tuple[str, str]:
    """A fresh (key id, key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("-")
    return key_id if sep and secret and len(key_id) == 12 else None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantStore:
    """Tenants and keys as stored; with ``defaults``, :meth:`tenant` and :meth:`authenticate`
    answer with the limits in force (the stored ones, the defaults where a tenant sets none)."""

    def __init__(self, redis: Redis, names: Names, defaults: TenantDefaults | None = None) -> None:
        self._redis = redis
        self._names = names
        self._defaults = defaults

    @property
    def redis(self) -> Redis:
        return self._redis

    async def put_tenant(self, tenant: Tenant) -> Tenant:
        """Create the tenant, or change the limits of the one of that name (which stays the same
        tenant: same id, same data). Returns it as stored."""
        existing = await self._stored(tenant.name)
        if existing is not None:
            tenant = tenant.model_copy(update={"id": existing.id, "created_at": existing.created_at})
        await self._redis.hset(self._names.tenants(), tenant.name, tenant.model_dump_json())  # type: ignore[misc]
        return tenant

    async def tenant(self, name: str) -> Tenant | None:
        stored = await self._stored(name)
        if stored is None or self._defaults is None:
            return stored
        return self._defaults.apply(stored)

    async def _stored(self, name: str) -> Tenant | None:
        raw = await self._redis.hget(self._names.tenants(), name)  # type: ignore[misc]
        return parse_tenant(raw) if raw else None

    async def add_key(self, tenant: str, key: str | None = None) -> str:
        """Register a key for ``tenant`` (a new one unless given) and return it."""
        if key is None:
            _, key = new_key()
        key_id = key_id_of(key)
        if key_id is None:
            raise ValueError("not a Switchyard key (sy-<12 hex>-<secret>)")
        record = KeyRecord(id=key_id, tenant=tenant, sha256=digest(key))
        await self._redis.hset(self._names.keys(), key_id, record.model_dump_json())  # type: ignore[misc]
        return key

    async def authenticate(self, key: str) -> Tenant | None:
        key_id = key_id_of(key)
        if key_id is None:
            return None
        raw = await self._redis.hget(self._names.keys(), key_id)  # type: ignore[misc]
        if raw is None:
            return None
        record = KeyRecord.model_validate_json(raw)
        if not hmac.compare_digest(record.sha256, digest(key)):
            return None
        return await self.tenant(record.tenant)

    async def listing(self) -> list[tuple[Tenant, list[str]]]:
        """Every tenant with the ids of its keys."""
        tenants = await self._redis.hgetall(self._names.tenants())  # type: ignore[misc]
        keys = await self._redis.hgetall(self._names.keys())  # type: ignore[misc]
        by_tenant: dict[str, list[str]] = {}
        for raw in keys.values():
            record = KeyRecord.model_validate_json(raw)
            by_tenant.setdefault(record.tenant, []).append(record.id)
        out = [parse_tenant(raw) for raw in tenants.values()]
        return [(t, sorted(by_tenant.get(t.name, []))) for t in sorted(out, key=lambda t: t.name)]

    async def revoke_key(self, key_id: str) -> bool:
        return bool(await self._redis.hdel(self._names.keys(), key_id))  # type: ignore[misc]

    async def revoke_tenant(self, name: str) -> int:
        """Revoke every key of a tenant and forget the tenant; returns the keys revoked."""
        ids = [key_id for t, key_ids in await self.listing() if t.name == name for key_id in key_ids]
        if ids:
            await self._redis.hdel(self._names.keys(), *ids)  # type: ignore[misc]
        await self._redis.hdel(self._names.tenants(), name)  # type: ignore[misc]
        return len(ids)
