"""Removing a tenant, against a real Redis: its batches are cancelled and never run, its data is
tombstoned and then removed, and a tenant given the same name later inherits nothing; another
tenant's data is untouched all along."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from api.batches.protocol import BatchCreateRequest
from api.errors import NotFound
from batch.batches import Batches
from batch.files import Files
from batch.housekeeping import Housekeeping
from batch.revocation import remove_tenant
from batch.role import Background
from control.redis_server import EmbeddedRedis
from serving.usage import Usage
from shared.messages import UsageEvent
from shared.settings import BackgroundSettings
from shared.tenants import Tenant, TenantStore
from tests.test_batch_runs import lines


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> BackgroundSettings:
    return BackgroundSettings(
        redis_url=redis_server.url, key_prefix="rv" + uuid.uuid4().hex[:8], files_dir=tmp_path
    )


@pytest_asyncio.fixture
async def background(redis: Redis, settings: BackgroundSettings) -> AsyncIterator[Background]:
    await redis.hset(settings.names.models(), "m", "1")  # served here once, no worker now
    yield Background(settings, redis, asyncio.Event())


async def holdings(redis: Redis, settings: BackgroundSettings, owner: Tenant) -> tuple[str, str]:
    """A file and a batch (waiting to run) of ``owner``, and some usage rolled up."""
    files = Files(redis, settings)
    source = await files.create(owner, "in.jsonl", "batch", io.BytesIO(lines(3)), 3, ttl=3600)
    body = BatchCreateRequest(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await Batches(redis, settings).create(owner, body, files)
    await log_usage(redis, settings, owner.name)
    return source.id, batch.request.id


async def log_usage(redis: Redis, settings: BackgroundSettings, tenant: str) -> None:
    event = UsageEvent(tenant=tenant, model="m", prompt_tokens=5, completion_tokens=7)
    await redis.xadd(settings.names.usage_log(), event.fields())  # type: ignore[arg-type]


async def test_a_removed_tenant_leaves_nothing_to_whoever_gets_its_name(
    redis: Redis, settings: BackgroundSettings, background: Background
) -> None:
    store = TenantStore(redis, settings.names)
    old, other = await store.put_tenant(Tenant(name="acme")), await store.put_tenant(Tenant(name="beta"))
    old_file, old_batch = await holdings(redis, settings, old)
    other_file, other_batch = await holdings(redis, settings, other)
    usage = Usage(redis, settings.names, 90)
    await usage.roll_up()
    await log_usage(redis, settings, "acme")  # logged before the removal, rolled up after it

    removal = await remove_tenant(redis, settings, "acme")
    assert (removal.keys, removal.batches_cancelled) == (0, 1)
    assert await store.tenant("acme") is None
    batches, files = Batches(redis, settings), Files(redis, settings)
    assert (await batches.load(old_batch)).status == "cancelling"  # type: ignore[union-attr]

    # Its batch never runs: it ends cancelled without a line on a queue.
    assert await asyncio.wait_for(background.runner.run(old_batch), 10) == "cancelled"
    assert await redis.xlen(settings.names.batch_stream("m", "acme")) == 0
    ended = await batches.load(old_batch)
    assert ended is not None and ended.output_file_id is None and ended.error_file_id is None

    new = await store.put_tenant(Tenant(name="acme"))
    assert new.id != old.id
    assert (await files.page(new, None, 100, "desc", None)).records == []
    assert (await batches.page(new, None, 100)).states == []
    for lookup in (files.get(new, old_file), batches.get(new, old_batch)):
        with pytest.raises(NotFound):
            await lookup
    await usage.roll_up()
    assert await usage.read("acme", 0) == []

    # Housekeeping removes what the tombstone still holds; the other tenant keeps everything.
    await Housekeeping(redis, settings).expire()
    assert not await redis.exists(settings.names.file(old_file))
    assert not (settings.files_path / settings.key_prefix / old_file).exists(), "its bytes are still stored"
    assert int(await redis.get(settings.names.tenant_file_bytes("acme")) or 0) == 0
    assert (await files.get(other, other_file)).id == other_file
    assert (await batches.get(other, other_batch)).status == "validating"
    assert [row.requests for row in await usage.read("beta", 0)] == [1]


async def test_a_batch_whose_tenant_is_missing_never_runs(
    redis: Redis, settings: BackgroundSettings, background: Background
) -> None:
    """Removed without the rest (a release that only deleted keys and the record): the batch must
    not run as a tenant without limits."""
    store = TenantStore(redis, settings.names)
    gone = await store.put_tenant(Tenant(name="gone", rpm=1))
    _, batch_id = await holdings(redis, settings, gone)
    await redis.hdel(settings.names.tenants(), "gone")
    assert await asyncio.wait_for(background.runner.run(batch_id), 10) == "cancelled"
    assert await redis.xlen(settings.names.batch_stream("m", "gone")) == 0
    # A tenant of the same name created since is another tenant: the batch is not its either.
    await store.put_tenant(Tenant(name="gone"))
    _, second = await holdings(redis, settings, gone)
    assert await asyncio.wait_for(background.runner.run(second), 10) == "cancelled"


async def test_keys_revoke_tenant_removes_it_from_the_command_line(
    redis: Redis, settings: BackgroundSettings
) -> None:
    store = TenantStore(redis, settings.names)
    owner = await store.put_tenant(Tenant(name="cli"))
    key = await store.add_key("cli")
    _, batch_id = await holdings(redis, settings, owner)
    flags = ["--redis-url", settings.redis_url, "--key-prefix", settings.key_prefix]
    command = [sys.executable, "-m", "control.cli", "keys", "revoke", "--tenant", "cli", *flags]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "removed tenant cli: revoked 1 key(s), cancelled 1 batch(es)" in done.stdout
    assert await store.authenticate(key) is None
    assert (await Batches(redis, settings).load(batch_id)).status == "cancelling"  # type: ignore[union-attr]
    again = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "no tenant cli" in again.stderr
