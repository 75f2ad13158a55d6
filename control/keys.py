"""``switchyard keys``: create, list and revoke tenants' API keys (keys are shown once, at creation)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from batch.revocation import remove_tenant
from control.processes import StartupError
from shared.settings import GatewaySettings, RedisSettings, redact_url
from shared.tenants import Tenant, TenantStore, key_id_of, new_key

T = TypeVar("T")


def _with_store(settings: RedisSettings, work: Callable[[TenantStore], Awaitable[T]]) -> T:
    async def run() -> T:
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3)
        try:
            return await work(TenantStore(redis, settings.names))
        except (RedisError, OSError) as exc:
            raise StartupError(f"cannot reach Redis at {redact_url(settings.redis_url)}: {exc}") from exc
        finally:
            await redis.aclose()

    return asyncio.run(run())


def create(settings: RedisSettings, tenant: Tenant) -> str:
    """Create or update the tenant and return a new key for it."""

    async def work(store: TenantStore) -> str:
        await store.put_tenant(tenant)
        return await store.add_key(tenant.name)

    return _with_store(settings, work)


def listing(settings: RedisSettings) -> str:
    rows = _with_store(settings, lambda store: store.listing())
    if not rows:
        return "no tenants"
    head = f"{'tenant':<20} {'priority':<11} {'rpm':>7} {'tpm':>9} {'concurrent':>10} {'backlog':>8}"
    head += f" {'file bytes':>12} {'batches':>7}"
    lines = [f"{head}  key ids   (default: the deployment's; none: no limit)"]
    for t, ids in rows:
        lines.append(
            f"{t.name:<20} {t.priority:<11} {_n(t.rpm):>7} {_n(t.tpm):>9} {_n(t.max_concurrent):>10} "
            f"{_n(t.max_backlog):>8} {_n(t.file_bytes):>12} {_n(t.max_batches):>7}  {', '.join(ids) or '-'}"
        )
    return "\n".join(lines)


def _n(value: int | None) -> str:
    return "default" if value is None else "none" if value == 0 else str(value)


def revoke(settings: GatewaySettings, key_id: str | None, tenant: str | None) -> str:
    async def work(store: TenantStore) -> str:
        if tenant is not None:
            return await _remove(store, settings, tenant)
        assert key_id is not None
        if not await store.revoke_key(key_id):
            raise StartupError(f"no key with id {key_id}")
        return f"revoked key {key_id}"

    return _with_store(settings, work)


async def _remove(store: TenantStore, settings: GatewaySettings, tenant: str) -> str:
    if await store.tenant(tenant) is None:
        raise StartupError(f"no tenant {tenant}")
    removal = await remove_tenant(store.redis, settings, tenant)
    return (
        f"removed tenant {tenant}: revoked {removal.keys} key(s), cancelled {removal.batches_cancelled} "
        f"batch(es), deleted {removal.usage_days} day(s) of usage; its files and batches are out of "
        "reach now and deleted by the next housekeeping run (a tenant given this name later is a new one)"
    )


DEV_TENANT = "dev"


def dev_key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "switchyard" / "dev-key"


def ensure_dev_key(settings: RedisSettings) -> str:
    """The local development key of ``switchyard up``: ``SWITCHYARD_DEV_KEY`` if set, else made once
    and kept in a private file; registered in Redis at every start (an embedded Redis starts empty)."""
    path = dev_key_file()
    given = os.environ.get("SWITCHYARD_DEV_KEY", "")
    if given and key_id_of(given) is None:
        raise StartupError("SWITCHYARD_DEV_KEY is not a Switchyard key (sy-<12 hex>-<secret>)")
    key = given or (path.read_text().strip() if path.exists() else "")
    if key_id_of(key) is None:
        _, key = new_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")

    async def work(store: TenantStore) -> str:
        if await store.tenant(DEV_TENANT) is None:
            await store.put_tenant(Tenant(name=DEV_TENANT))
        return await store.add_key(DEV_TENANT, key)

    return _with_store(settings, work)
