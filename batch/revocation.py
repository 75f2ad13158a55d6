"""Removing a tenant: its keys and record go at once, its unfinished batches are cancelled (and a
batch whose tenant is gone never runs another line, see :mod:`batch.run`), and everything else it
had is tombstoned: out of reach at once, removed by housekeeping (which has the file store).

A tenant is its id, not its name (``Tenant.id``): a tenant given the same name later is another
tenant, and the ownership checks of files and batches compare ids, so nothing of the removed one
reaches it even before housekeeping has removed it all, not even a batch's result file written
after the removal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from batch.batches import Batches
from batch.files import Files
from serving.usage import Usage
from shared.batches import FileRecord
from shared.settings import GatewaySettings
from shared.tenants import TenantStore, Tombstone

TOMBSTONE_KEEP = 7 * 86400
"""Seconds a tombstone outlives the data it stood for: the usage logged before the removal is
rolled up (and skipped) long before."""
PAGE = 500


@dataclass(frozen=True, slots=True)
class Removal:
    keys: int
    batches_cancelled: int
    usage_days: int


async def remove_tenant(redis: Redis, settings: GatewaySettings, name: str) -> Removal:
    """Remove the tenant ``name``: revoke its keys, forget it, cancel its unfinished batches, and
    tombstone its files, batches and usage."""
    names = settings.names
    store = TenantStore(redis, names)
    tenant = await store.tenant(name)
    keys = await store.revoke_tenant(name)
    if tenant is None:
        return Removal(keys, 0, 0)
    stone = Tombstone(name=name, id=tenant.id, removed_at=time.time())
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(names.removed_tenants(), tenant.id, stone.model_dump_json())
        # Its listings move aside: whoever gets the name starts with empty ones.
        pipe.rename(names.files(name), names.removed_files(tenant.id))
        pipe.rename(names.batches(name), names.removed_batches(tenant.id))
        pipe.delete(*(names.rate(name, what) for what in ("req", "tok", "amt", "sum")), names.inflight(name))
        await pipe.execute(raise_on_error=False)  # a listing it never had cannot be renamed
    batches = Batches(redis, settings)
    cancelled = 0
    for raw in await redis.zrange(names.removed_batches(tenant.id), 0, -1):
        cancelled += await batches.move(raw.decode(), "cancelling")
    days = await Usage(redis, names, settings.usage_retention_days).forget(name)
    return Removal(keys, cancelled, days)


async def purge_removed(redis: Redis, settings: GatewaySettings, now: float | None = None) -> dict[str, int]:
    """Housekeeping: remove what removed tenants had (files with their bytes, finished batches),
    and the tombstones that stand for nothing any more."""
    now = time.time() if now is None else now
    names = settings.names
    files, batches = Files(redis, settings), Batches(redis, settings)
    done = {"files": 0, "batches": 0, "tombstones": 0}
    for raw in (await redis.hgetall(names.removed_tenants())).values():  # type: ignore[misc]
        stone = Tombstone.model_validate_json(raw)
        for record in await _files_of(redis, settings, stone):
            await files.remove(record)
            await redis.zrem(names.removed_files(stone.id), record.id)
            done["files"] += 1
        left = 0
        for member in await redis.zrange(names.removed_batches(stone.id), 0, -1):
            batch_id = member.decode()
            state = await batches.load(batch_id)
            if state is not None and not state.final:
                left += 1  # its run ends it cancelled, then it goes
                continue
            await batches.delete(batch_id)
            await redis.zrem(names.removed_batches(stone.id), batch_id)
            done["batches"] += 1
        if not left and now - stone.removed_at > TOMBSTONE_KEEP:
            await redis.hdel(names.removed_tenants(), stone.id)  # type: ignore[misc]
            done["tombstones"] += 1
    return done


async def _files_of(redis: Redis, settings: GatewaySettings, stone: Tombstone) -> list[FileRecord]:
    """The removed tenant's files: those listed when it was removed, and any a batch of it wrote
    since (listed under the name, but with its id)."""
    names = settings.names
    ids = [m.decode() for m in await redis.zrange(names.removed_files(stone.id), 0, -1)]
    ids += [m.decode() for m in await redis.zrange(names.files(stone.name), 0, -1)]
    out = []
    for start in range(0, len(ids), PAGE):
        raws = await redis.mget([names.file(i) for i in ids[start : start + PAGE]])
        for file_id, raw in zip(ids[start : start + PAGE], raws, strict=True):
            if raw is None:
                await redis.zrem(names.removed_files(stone.id), file_id)
                continue
            record = FileRecord.model_validate_json(raw)
            if record.tenant == stone.name and record.tenant_id in (None, stone.id):
                out.append(record)
    return out
