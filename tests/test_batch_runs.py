"""Batch runs that need no engine, in this process against a real Redis: expiry at the completion
window, a cancel before the run starts, the lease, and a batch whose input file is gone."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from api.batches.protocol import BatchCreateRequest
from batch.batches import Batches
from batch.files import Files
from batch.filestore import read_all
from batch.role import Background
from control.redis_server import EmbeddedRedis
from shared.batches import BatchRequest
from shared.settings import BackgroundSettings
from shared.tenants import Tenant, TenantStore

T = Tenant(name="t", id="t")
"""The tenant of these tests' files and batches."""


def lines(count: int) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return b"".join(
        json.dumps(
            {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        ).encode()
        + b"\n"
        for i in range(count)
    )


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> BackgroundSettings:
    return BackgroundSettings(
        redis_url=redis_server.url, key_prefix="br" + uuid.uuid4().hex[:8], files_dir=tmp_path
    )


@pytest_asyncio.fixture
async def jobs(redis: Redis, settings: BackgroundSettings) -> AsyncIterator[Background]:
    await redis.hset(settings.names.models(), "m", "1")  # a model served here once
    await TenantStore(redis, settings.names).put_tenant(T)
    yield Background(settings, redis, asyncio.Event())


async def new_batch(redis: Redis, settings: BackgroundSettings, count: int = 3) -> str:
    files = Files(redis, settings)
    source = await files.create(T, "in.jsonl", "batch", io.BytesIO(lines(count)), count, ttl=3600)
    body = BatchCreateRequest(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return (await Batches(redis, settings).create(T, body, files)).request.id


async def test_a_batch_past_its_window_expires_with_its_lines_in_the_error_file(
    redis: Redis, settings: BackgroundSettings, jobs: Background
) -> None:
    batch_id = await new_batch(redis, settings)
    key = settings.names.batch(batch_id)
    request = BatchRequest.model_validate_json(await redis.hget(key, "request"))
    await redis.hset(
        key, "request", request.model_copy(update={"expires_at": int(time.time()) - 1}).model_dump_json()
    )
    await redis.hset(
        settings.names.batch_results(batch_id),
        "l1",
        json.dumps({"custom_id": "l1", "response": {"status_code": 200}}),
    )

    assert await jobs.runner.run(batch_id) == "expired"
    state = await Batches(redis, settings).get(T, batch_id)
    assert state.status == "expired" and state.times["expired_at"] and state.total == 3
    assert state.output_file_id is not None and state.error_file_id is not None
    store = Files(redis, settings).store
    errors = [json.loads(x) for x in (await read_all(store, state.error_file_id)).splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("l0", "batch_expired"),
        ("l2", "batch_expired"),
    ]
    output = [json.loads(x) for x in (await read_all(store, state.output_file_id)).splitlines()]
    assert [o["custom_id"] for o in output] == ["l1"]
    assert batch_id not in await Batches(redis, settings).active()
    assert not await redis.exists(settings.names.batch_results(batch_id)), "the files hold the results now"


async def test_a_batch_cancelled_before_its_run_ends_cancelled(
    redis: Redis, settings: BackgroundSettings, jobs: Background
) -> None:
    batch_id = await new_batch(redis, settings)
    cancelling = await Batches(redis, settings).cancel(T, batch_id)
    assert cancelling.status == "cancelling"
    assert await jobs.runner.run(batch_id) == "cancelled"
    state = await Batches(redis, settings).get(T, batch_id)
    assert state.status == "cancelled" and state.output_file_id is None and state.error_file_id is None
    assert await jobs.runner.run(batch_id) == "cancelled"  # again: nothing to do


async def test_a_batch_runs_in_one_process_at_a_time(
    redis: Redis, settings: BackgroundSettings, jobs: Background
) -> None:
    batch_id = await new_batch(redis, settings)
    await redis.set(settings.names.batch_lease(batch_id), "another-process", px=5000)
    assert await jobs.runner.run(batch_id) == "run by another process"
    assert (await Batches(redis, settings).get(T, batch_id)).status == "validating"


async def test_a_batch_whose_input_is_gone_fails(
    redis: Redis, settings: BackgroundSettings, jobs: Background
) -> None:
    batch_id = await new_batch(redis, settings)
    state = await Batches(redis, settings).get(T, batch_id)
    await Files(redis, settings).store.delete(state.request.input_file_id)
    assert await jobs.runner.run(batch_id) == "failed"
    failed = await Batches(redis, settings).get(T, batch_id)
    assert [e.code for e in failed.errors] == ["input_file_missing"]
