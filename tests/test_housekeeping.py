"""Each housekeeping job against a real Redis, and one run per tick across two real processes."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.asyncio import Redis

from api.batches.protocol import BatchCreateRequest
from batch.batches import Batches
from batch.files import Files
from batch.housekeeping import Housekeeping
from batch.role import first_run, prune_runs, start_batch
from control.redis_server import EmbeddedRedis
from serving.usage import Usage
from shared.messages import UsageEvent
from shared.names import Names
from shared.settings import BackgroundSettings
from shared.tenants import Tenant
from tests.procs import spawn, stop, wait_until

T = Tenant(name="t", id="t")
"""The tenant of these tests' files and batches."""

LINE = json.dumps(
    {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
).encode()


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> BackgroundSettings:
    """Settings of a deployment of its own (own key prefix, own files directory)."""
    return BackgroundSettings(
        redis_url=redis_server.url,
        key_prefix="hk" + uuid.uuid4().hex[:8],
        files_dir=tmp_path,
        dead_letter_max=10,
    )


@pytest_asyncio.fixture
async def keeper(redis: Redis, settings: BackgroundSettings) -> AsyncIterator[Housekeeping]:
    yield Housekeeping(redis, settings)


async def test_expiry_deletes_files_but_not_while_a_batch_reads_them(
    redis: Redis, settings: BackgroundSettings, keeper: Housekeeping
) -> None:
    names, files = settings.names, Files(redis, settings)
    kept = await files.create(T, "in.jsonl", "batch", io.BytesIO(LINE), 1, ttl=60)
    dropped = await files.create(T, "other.jsonl", "batch", io.BytesIO(LINE * 2), 2, ttl=60)
    body = BatchCreateRequest(input_file_id=kept.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = await Batches(redis, settings).create(T, body, files)
    assert int(await redis.get(names.file_bytes())) == len(LINE) * 3

    nothing = await keeper.expire(now=time.time() + 30)  # nothing due yet
    assert (nothing["files"], nothing["batches"]) == (0, 0)
    due = await keeper.expire(now=time.time() + 61)
    assert (due["files"], due["batches"]) == (1, 0)
    assert await redis.get(names.file(dropped.id)) is None
    assert not (settings.files_path / settings.key_prefix / dropped.id).exists()
    assert await redis.zscore(names.files("t"), dropped.id) is None
    assert int(await redis.get(names.file_bytes())) == len(LINE)
    assert await redis.get(names.file(kept.id)) is not None, "the input of an unfinished batch went"

    await Batches(redis, settings).finished(batch.request.id)
    assert (await keeper.expire(now=time.time() + 61))["files"] == 1
    assert int(await redis.get(names.file_bytes())) == 0


async def test_expiry_deletes_finished_batches_after_their_retention(
    redis: Redis, settings: BackgroundSettings, keeper: Housekeeping
) -> None:
    names, files, batches = settings.names, Files(redis, settings), Batches(redis, settings)
    source = await files.create(T, "in.jsonl", "batch", io.BytesIO(LINE), 1, ttl=10**6)
    body = BatchCreateRequest(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch_id = (await batches.create(T, body, files)).request.id
    await redis.hset(names.batch_results(batch_id), "a", "{}")
    assert await batches.move(batch_id, "cancelling") and await batches.move(batch_id, "cancelled")
    await batches.finished(batch_id)
    assert await batches.active() == []
    assert (await keeper.expire(now=time.time() + 60))["batches"] == 0
    assert (await keeper.expire(now=time.time() + settings.batch_ttl + 1))["batches"] == 1
    for key in (names.batch(batch_id), names.batch_results(batch_id)):
        assert not await redis.exists(key)
    assert await redis.zscore(names.batches("t"), batch_id) is None


async def _dead_letters(redis: Redis, names: Names, count: int) -> tuple[str, list[str]]:
    await redis.hset(names.models(), "m", "1")
    stream = names.dead_letter("m")
    ids = [(await redis.xadd(stream, {"reason": f"r{i}"})).decode() for i in range(count)]
    return stream, ids


async def test_dead_letters_are_trimmed_to_the_bound(
    redis: Redis, settings: BackgroundSettings, keeper: Housekeeping
) -> None:
    stream, ids = await _dead_letters(redis, settings.names, 30)
    assert await keeper.trim_dead_letters() == {"m": 20}
    assert [e[0].decode() for e in await redis.xrange(stream)] == ids[-10:]
    assert await keeper.trim_dead_letters() == {}  # at the bound: nothing to do


async def test_trimming_drops_nothing_a_consumer_group_has_not_read(
    redis: Redis, settings: BackgroundSettings, keeper: Housekeeping
) -> None:
    stream, ids = await _dead_letters(redis, settings.names, 30)
    await redis.xgroup_create(stream, "ops", id="0")
    read = await redis.xreadgroup("ops", "alice", {stream: ">"}, count=16)  # delivered 0..15
    delivered = [e[0].decode() for e in read[0][1]]
    await redis.xack(stream, "ops", *[i for i in delivered if i != ids[12]])  # 12 is not acknowledged
    assert await keeper.trim_dead_letters() == {"m": 12}
    assert (await redis.xrange(stream, count=1))[0][0].decode() == ids[12]
    await redis.xack(stream, "ops", ids[12])
    assert await keeper.trim_dead_letters() == {"m": 4}  # now up to what the group was delivered
    assert (await redis.xrange(stream, count=1))[0][0].decode() == ids[16]
    await redis.xreadgroup("ops", "alice", {stream: ">"})
    await redis.xack(stream, "ops", *ids[16:])
    assert await keeper.trim_dead_letters() == {"m": 4}
    assert int(await redis.xlen(stream)) == 10


async def _log(redis: Redis, names: Names, *events: UsageEvent) -> None:
    for event in events:
        await redis.xadd(names.usage_log(), event.fields())  # type: ignore[arg-type]


async def test_usage_is_rolled_up_exactly_once(
    redis: Redis, settings: BackgroundSettings, keeper: Housekeeping
) -> None:
    names = settings.names
    ok = UsageEvent(tenant="acme", model="m", prompt_tokens=5, completion_tokens=7)
    failed = UsageEvent(tenant="acme", model="m", prompt_tokens=5, completion_tokens=0, error="stalled")
    other = UsageEvent(tenant="zeta", model="n", prompt_tokens=1, completion_tokens=1)
    await _log(redis, names, ok, ok, failed, other)
    assert await keeper.roll_up_usage() == {"requests": 4}
    assert await keeper.roll_up_usage() == {"requests": 0}
    assert int(await redis.xlen(names.usage_log())) == 0, "what was counted stays in the log"
    await _log(redis, names, ok, other)
    together = await asyncio.gather(keeper.roll_up_usage(), keeper.roll_up_usage())  # racing: once
    assert sum(r["requests"] for r in together) == 2

    usage = Usage(redis, names, settings.usage_retention_days)
    (row,) = await usage.read("acme", int(time.time()) - 7200)
    assert (row.model, row.requests, row.errors, row.prompt_tokens, row.completion_tokens) == (
        "m",
        4,
        1,
        20,
        21,
    )
    assert [(r.model, r.requests) for r in await usage.read("zeta", 0)] == [("n", 2)]
    assert await usage.tenants() == ["acme", "zeta"]
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert 0 < await redis.ttl(names.usage("acme", day)) <= (settings.usage_retention_days + 1) * 86400
    assert await usage.read("acme", int(time.time()) + 7200) == []


async def test_a_tick_runs_once(redis: Redis, settings: BackgroundSettings) -> None:
    names = settings.names
    assert await first_run(redis, names, "expire", "1764684000123")
    assert not await first_run(redis, names, "expire", "1764684000123")
    assert await first_run(redis, names, "expire", "1764684001123")


async def test_runs_of_finished_batches_leave_the_queue(redis: Redis, settings: BackgroundSettings) -> None:
    names, files, batches = settings.names, Files(redis, settings), Batches(redis, settings)
    source = await files.create(T, "in.jsonl", "batch", io.BytesIO(LINE), 1, ttl=3600)
    body = BatchCreateRequest(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    live, done = [(await batches.create(T, body, files)).request.id for _ in range(2)]
    for batch_id in (live, done):
        await start_batch(redis, names, batch_id, "created")
    zombie = names.background_job("run-batch", f"{done}:created")
    await redis.set(in_progress_key_prefix + zombie, b"1")  # its process was killed mid-run
    await batches.finished(done)
    assert await prune_runs(redis, names) == 1
    queued = [m.decode() for m in await redis.zrange(names.arq_queue(), 0, -1)]
    assert queued == [names.background_job("run-batch", f"{live}:created")]
    assert not await redis.exists(in_progress_key_prefix + zombie, job_key_prefix + zombie)


def test_one_run_per_tick_across_two_processes(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """Two jobs processes, each scheduling every job every second: each tick runs once."""
    prefix = "hk" + uuid.uuid4().hex[:8]
    env = {
        "REDIS_URL": redis_server.url,
        "SWITCHYARD_KEY_PREFIX": prefix,
        "SWITCHYARD_FILES_DIR": str(tmp_path),
        "SWITCHYARD_HOUSEKEEPING_INTERVAL": "1",
        "SWITCHYARD_BATCH_CHECK_INTERVAL": "1",
    }
    procs = [spawn("jobs", env, tmp_path / f"jobs-{i}.log") for i in range(2)]
    try:
        for i, proc in enumerate(procs):
            log = tmp_path / f"jobs-{i}.log"
            wait_until(
                lambda log=log: b"batches and housekeeping" in log.read_bytes(), 60, "jobs", (proc,), (log,)
            )
        time.sleep(6)
    finally:
        for proc in procs:
            stop(proc)

    async def runs() -> list[tuple[str, str]]:
        client = Redis.from_url(redis_server.url)
        try:
            entries = await client.xrange(Names(prefix).housekeeping_log())
        finally:
            await client.aclose()
        return [(e[b"job"].decode(), e[b"tick"].decode()) for _, e in entries]

    seen = Counter(asyncio.run(runs()))
    assert seen and max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]
    per_job = Counter(job for job, _ in seen)
    assert set(per_job) == {"expire", "trim-dead-letters", "roll-up-usage", "recount-files", "check-batches"}
    assert min(per_job.values()) >= 4, per_job
