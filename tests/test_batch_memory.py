"""What a batch run holds and how long it keeps the event loop, against a real Redis with a file of
20,000 lines: its input is streamed and indexed by offset (never held whole, nor parsed all at
once), and parsed off the event loop, so that lease renewals and every other run go on meanwhile."""

from __future__ import annotations

import asyncio
import io
import json
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from api.batches.protocol import BatchCreateRequest
from batch.batches import Batches
from batch.files import Files
from batch.role import Background
from control.redis_server import EmbeddedRedis
from shared.settings import BackgroundSettings
from shared.tenants import Tenant, TenantStore
from tests.procs import wait_for

LINES = 20_000
"""Of about 600 bytes each."""
T = Tenant(name="t", id="t")


def big_file(count: int) -> bytes:
    out = io.BytesIO()
    for i in range(count):
        body = {"model": "m", "messages": [{"role": "user", "content": f"question {i} " + "word " * 100}]}
        line = {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        out.write(json.dumps(line).encode() + b"\n")
    return out.getvalue()


@pytest.fixture(scope="module")
def data() -> bytes:
    return big_file(LINES)


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> BackgroundSettings:
    return BackgroundSettings(
        redis_url=redis_server.url,
        key_prefix="mem" + uuid.uuid4().hex[:8],
        files_dir=tmp_path,
        file_max_lines=LINES,
    )


@pytest_asyncio.fixture
async def background(redis: Redis, settings: BackgroundSettings) -> AsyncIterator[Background]:
    await redis.hset(settings.names.models(), "m", "1")  # served here once; no worker now
    await TenantStore(redis, settings.names).put_tenant(T)
    yield Background(settings, redis, asyncio.Event())


async def new_batch(redis: Redis, settings: BackgroundSettings, data: bytes) -> str:
    files = Files(redis, settings)
    source = await files.create(T, "big.jsonl", "batch", io.BytesIO(data), LINES, ttl=3600)
    body = BatchCreateRequest(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return (await Batches(redis, settings).create(T, body, files)).request.id


async def restarted_cancelling(redis: Redis, settings: BackgroundSettings, data: bytes) -> str:
    """A batch that was running when its process died and was cancelled meanwhile: the next run
    reads its input again to write every line's 'batch_cancelled' into the error file."""
    batch_id = await new_batch(redis, settings, data)
    batches = Batches(redis, settings)
    await batches.move(batch_id, "in_progress", total=LINES, model="m")
    await batches.move(batch_id, "cancelling")
    return batch_id


class LoopWatch:
    """The longest the event loop went without running this task's next tick."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def run(self) -> None:
        while True:
            begun = time.monotonic()
            await asyncio.sleep(0.01)
            self.longest = max(self.longest, time.monotonic() - begun - 0.01)


async def test_a_restarted_run_does_not_hold_the_event_loop(
    redis: Redis, settings: BackgroundSettings, background: Background, data: bytes
) -> None:
    batch_id = await restarted_cancelling(redis, settings, data)
    watch = LoopWatch()
    watcher = asyncio.create_task(watch.run())
    try:
        assert await background.runner.run(batch_id) == "cancelled"
    finally:
        watcher.cancel()
    state = await Batches(redis, settings).get(T, batch_id)
    assert state.error_file_id is not None
    # A lease is renewed every 3.3 s of a 10 s lease; eight runs at once must not come near it.
    assert watch.longest < 0.5, f"the event loop stood still for {watch.longest:.2f} s"


async def test_a_run_holds_an_index_of_its_input_not_the_input(
    redis: Redis, settings: BackgroundSettings, background: Background, data: bytes
) -> None:
    validating = await new_batch(redis, settings, data)
    cancelling = await restarted_cancelling(redis, settings, data)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run = asyncio.create_task(background.runner.run(validating))
        batches = Batches(redis, settings)

        async def validated() -> bool:
            return (await batches.get(T, validating)).status != "validating"

        await wait_for(validated, 120, "validated")
        background.stopping.set()  # validated and feeding: stop it there, as at a shutdown
        assert await run == "stopped; to be continued"
        _, validated_peak = tracemalloc.get_traced_memory()
        background.stopping.clear()
        tracemalloc.reset_peak()
        assert await background.runner.run(cancelling) == "cancelled"
        _, restarted_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (await batches.get(T, validating)).total == LINES
    # The file is about 12 MB; held whole, split into lines and parsed it took many times that. An
    # index of 20,000 lines takes a couple of megabytes, and a block being read one or two more.
    assert validated_peak < len(data) / 2, f"validating held {validated_peak / len(data):.2f}x the file"
    assert restarted_peak < len(data) / 2, f"a restarted run held {restarted_peak / len(data):.2f}x the file"
