"""One tenant's many batches against another's one: a cap on a tenant's unfinished batches, batch
slots handed out a tenant at a time, runs that give their slot back to a tenant that waits, and no
background job per waiting batch on every tick. Against a real Redis, and at the end with real
processes: a background process and a simulated-engine worker, while tenant A holds 1,000 batches."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from api.batches.protocol import BatchCreateRequest
from api.errors import RateLimited
from batch.batches import Batches
from batch.files import Files
from batch.role import Background
from batch.slots import Scheduler, fair_yields
from control.redis_server import EmbeddedRedis
from shared.batches import BatchRequest, owner_key
from shared.settings import BackgroundSettings
from shared.tenants import Tenant, TenantStore
from tests.procs import spawn, stop, wait_for, wait_until

BODY = BatchCreateRequest(input_file_id="file-", endpoint="/v1/chat/completions", completion_window="24h")


def chat_lines(prefix: str, count: int, tokens: int, model: str = "m") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    return b"".join(
        json.dumps(
            {"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {**body, "ignore_eos": True}}
        ).encode() + b"\n"
        for i in range(count)
    )  # fmt: skip


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> BackgroundSettings:
    return BackgroundSettings(
        redis_url=redis_server.url,
        key_prefix="fair" + uuid.uuid4().hex[:8],
        files_dir=tmp_path,
        tenant_max_batches=3,
    )


async def tenant_with_batches(
    redis: Redis, settings: BackgroundSettings, name: str, count: int, **limits: int
) -> tuple[Tenant, list[str]]:
    owner = await TenantStore(redis, settings.names).put_tenant(Tenant(name=name, **limits))  # type: ignore[arg-type]
    owner = settings.tenant_defaults().apply(owner)
    files = Files(redis, settings)
    source = await files.create(owner, "in.jsonl", "batch", io.BytesIO(chat_lines("l", 1, 2)), 1, ttl=3600)
    body = BODY.model_copy(update={"input_file_id": source.id})
    batches = Batches(redis, settings)
    return owner, [(await batches.create(owner, body, files)).request.id for _ in range(count)]


@pytest.mark.parametrize(
    ("running", "waiting", "yields"),
    [
        ({"a": 8}, {"a": 992}, {}),  # alone: every slot is its own
        ({"a": 8}, {"a": 992, "b": 1}, {"a": 1}),  # one slot for the other tenant
        ({"a": 8}, {"a": 992, "b": 5, "c": 5}, {"a": 5}),  # three tenants: 3, 3 and 2 slots
        ({"a": 4, "b": 4}, {"a": 10, "b": 10}, {}),  # even already
        ({"a": 6, "b": 2}, {"b": 3}, {"a": 2}),
        ({"a": 6, "b": 2}, {"c": 1}, {"a": 1}),  # from whoever holds the most
        ({"a": 1}, {"b": 1}, {}),  # one slot in use: nobody holds more than its share
        ({}, {"a": 3}, {}),
    ],
)
def test_runs_give_back_slots_down_to_their_tenants_fair_share(
    running: dict[str, int], waiting: dict[str, int], yields: dict[str, int]
) -> None:
    assert fair_yields(running, waiting) == yields


def test_runs_already_giving_back_count_against_what_is_owed() -> None:
    """A run drains its lines for a while after it gives its slot back; the next reckonings must
    not ask another run of the same tenant for the same slot meanwhile."""
    assert fair_yields({"a": 2}, {"a": 998, "b": 1}, {"a": 1}) == {}
    assert fair_yields({"a": 8}, {"a": 992, "b": 5}, {"a": 3}) == {"a": 1}
    assert fair_yields({"a": 8}, {"a": 992, "b": 5}, {"a": 5}) == {}


async def test_the_reckoning_asks_one_run_for_each_slot_owed(
    redis: Redis, settings: BackgroundSettings
) -> None:
    settings = settings.model_copy(update={"tenant_max_batches": 100})
    _, a = await tenant_with_batches(redis, settings, "a", 5)
    scheduler = Scheduler(redis, settings)
    for _ in range(2):  # a's first two batches hold the two slots there are
        assert await scheduler.pick("process-1") is not None
    assert (await scheduler.balance())["to_give_back"] == 0, "alone, a keeps them"
    _, (b,) = await tenant_with_batches(redis, settings, "b", 1)
    assert await scheduler.balance() == {"running": 2, "waiting": 4, "leaving": 0, "to_give_back": 1}
    assert not await scheduler.take_yield("b-id", b), "b owes nothing"
    assert await scheduler.take_yield(await owner_of(redis, settings, a[0]), a[0])
    assert not await scheduler.take_yield(await owner_of(redis, settings, a[1]), a[1]), "one slot was owed"
    assert await scheduler.balance() == {"running": 2, "waiting": 4, "leaving": 1, "to_give_back": 0}
    await redis.delete(settings.names.batch_lease(a[0]))  # its lines drained: the slot is free
    picked = await scheduler.pick("process-1")
    assert picked is not None and picked[0] == b, "the free slot goes to b"
    assert await scheduler.balance() == {"running": 2, "waiting": 4, "leaving": 0, "to_give_back": 0}


async def owner_of(redis: Redis, settings: BackgroundSettings, batch_id: str) -> str:
    raw = await redis.hget(settings.names.batch(batch_id), "request")
    return owner_key(BatchRequest.model_validate_json(raw))


async def test_a_tenant_has_at_most_its_limit_of_unfinished_batches(
    redis: Redis, settings: BackgroundSettings
) -> None:
    owner, ids = await tenant_with_batches(redis, settings, "a", 3)
    files, batches = Files(redis, settings), Batches(redis, settings)
    body = BODY.model_copy(update={"input_file_id": (await batches.get(owner, ids[0])).request.input_file_id})
    with pytest.raises(RateLimited) as over:
        await batches.create(owner, body, files)
    assert over.value.code == "batch_limit_reached" and "3" in over.value.message
    await tenant_with_batches(redis, settings, "b", 3)  # another tenant's limit is its own
    await batches.cancel(owner, ids[0])
    await batches.move(ids[0], "cancelled")
    await batches.finished(ids[0])
    assert (await batches.create(owner, body, files)).status == "validating"  # room again
    bigger, many = await tenant_with_batches(redis, settings, "c", 5, max_batches=5)
    assert len(many) == 5 and bigger.max_batches == 5


async def test_slots_go_to_the_tenant_served_longest_ago(redis: Redis, settings: BackgroundSettings) -> None:
    settings = settings.model_copy(update={"tenant_max_batches": 100})
    _, a = await tenant_with_batches(redis, settings, "a", 6)
    _, b = await tenant_with_batches(redis, settings, "b", 2)
    _, c = await tenant_with_batches(redis, settings, "c", 1)
    scheduler = Scheduler(redis, settings)
    picked = [await scheduler.pick("process-1") for _ in range(10)]
    assert picked[9] is None, "every batch has a slot"
    order = [p[0] for p in picked[:9] if p]
    owner = {**dict.fromkeys(a, "a"), **dict.fromkeys(b, "b"), **dict.fromkeys(c, "c")}
    tenants = [owner[batch_id] for batch_id in order]
    assert sorted(tenants[:3]) == list("abc"), "new tenants first, one batch each"
    assert tenants[3:] == [t for t in tenants[:3] if t != "c"] + list("aaaa"), "then round and round"
    assert [x for x in order if owner[x] == "a"] == a, "a tenant's batches in the order they came"


async def test_a_batch_nobody_runs_is_taken_and_a_leased_one_is_not(
    redis: Redis, settings: BackgroundSettings
) -> None:
    """A run that died leaves its batch without a lease: the next free slot anywhere takes it."""
    _, (running, orphan) = await tenant_with_batches(redis, settings, "a", 2)
    await redis.set(settings.names.batch_lease(running), "another process", px=10_000)
    scheduler = Scheduler(redis, settings)
    picked = await scheduler.pick("mine")
    assert picked is not None and picked[0] == orphan
    assert await redis.get(settings.names.batch_lease(orphan)) == b"mine"
    assert await scheduler.pick("mine") is None


async def test_no_background_job_per_waiting_batch(redis: Redis, settings: BackgroundSettings) -> None:
    """With 1,000 batches waiting, a housekeeping tick used to queue 1,000 runs that each answered
    'busy here'. Now waiting batches are taken by free slots as they free up."""
    settings = settings.model_copy(update={"tenant_max_batches": 1000, "max_batches": 2})
    await tenant_with_batches(redis, settings, "a", 1000)
    background = Background(settings, redis, asyncio.Event())
    tick = str(int(time.time() * 1000))
    result = await background.check_batches({"job_id": settings.names.cron("check-batches") + ":" + tick})
    assert result is not None
    assert await redis.zcard(settings.names.arq_queue()) == 0, "a background job was queued per batch"


# -- 1,000 batches of tenant A, one of B, real processes ------------------------------------------

FLOOD = 1000
B_WINDOW = 60.0
"""Seconds B's batch has (its completion window, shortened for the test)."""


@pytest.fixture
def fleet(redis_server: EmbeddedRedis, demo_model_dir: Path, tmp_path: Path) -> Iterator[BackgroundSettings]:
    """A simulated worker of the demo model (slowed down) and a background process with two batch
    slots, slices of two seconds and windows of two lines."""
    settings = BackgroundSettings(
        redis_url=redis_server.url,
        key_prefix="flood" + uuid.uuid4().hex[:8],
        files_dir=tmp_path / "files",
        tenant_max_batches=FLOOD,
    )
    env = {
        "REDIS_URL": settings.redis_url,
        "SWITCHYARD_KEY_PREFIX": settings.key_prefix,
        "SWITCHYARD_FILES_DIR": str(settings.files_path),
    }
    worker_log, background_log = tmp_path / "worker.log", tmp_path / "background.log"
    worker = spawn(
        "worker",
        {**env, "SWITCHYARD_MODEL": str(demo_model_dir), "SWITCHYARD_SERVED_MODEL_NAME": "m"},
        worker_log,
        # Ten times slower than the demo model on this host: A's lines take about a minute each.
        *("--engine", "sim", "--sim-preset", "cpu-demo", "--sim-speed", "0.1", "--capacity", "8"),
    )
    background: subprocess.Popen[bytes] | None = None
    try:
        wait_until(
            lambda: worker_heartbeat(settings), 60, "simulated worker", procs=(worker,), logs=(worker_log,)
        )
        background = spawn(
            "background",
            {
                **env,
                "SWITCHYARD_MAX_BATCHES": "2",
                "SWITCHYARD_BATCH_WINDOW": "2",
                "SWITCHYARD_BATCH_SLICE": "2",
                "SWITCHYARD_BATCH_CHECK_INTERVAL": "1",
                "SWITCHYARD_BACKGROUND_DRAIN_TIMEOUT": "1",
                "SWITCHYARD_WORKER_TTL": "3",
            },
            background_log,
        )
        wait_until(lambda: b"batches and housekeeping" in background_log.read_bytes(), 60, "background",
                   procs=(background,), logs=(background_log,))  # fmt: skip
        yield settings
    finally:
        if background is not None:
            stop(background)
        stop(worker)


def worker_heartbeat(settings: BackgroundSettings) -> bool:
    async def live() -> bool:
        async with Redis.from_url(settings.redis_url) as redis:
            return bool(await redis.zcard(settings.names.workers()))

    return asyncio.run(live())


async def test_one_batch_finishes_in_its_window_while_another_tenant_holds_a_thousand(
    redis: Redis, fleet: BackgroundSettings
) -> None:
    settings, names = fleet, fleet.names
    store, files, batches = TenantStore(redis, names), Files(redis, settings), Batches(redis, settings)
    a = settings.tenant_defaults().apply(await store.put_tenant(Tenant(name="a")))
    b = settings.tenant_defaults().apply(await store.put_tenant(Tenant(name="b")))
    # A's batches are long: two lines of 2,000 tokens each, about a minute at the worker's pace.
    flood = await files.create(a, "a.jsonl", "batch", io.BytesIO(chat_lines("a", 2, 2000)), 2, ttl=3600)
    flood_body = BODY.model_copy(update={"input_file_id": flood.id})
    a_ids = [(await batches.create(a, flood_body, files)).request.id for _ in range(FLOOD)]
    await asyncio.sleep(3)  # A's batches hold both slots
    mine = await files.create(b, "b.jsonl", "batch", io.BytesIO(chat_lines("b", 2, 3)), 2, ttl=3600)
    b_id = (await batches.create(b, BODY.model_copy(update={"input_file_id": mine.id}), files)).request.id
    request = BatchRequest.model_validate_json(await redis.hget(names.batch(b_id), "request"))
    deadline = int(time.time() + B_WINDOW)
    shorter = request.model_copy(update={"expires_at": deadline}).model_dump_json()
    await redis.hset(names.batch(b_id), "request", shorter)

    most_queued = 0

    async def b_done() -> bool:
        nonlocal most_queued
        most_queued = max(most_queued, int(await redis.zcard(names.arq_queue())))
        state = await batches.load(b_id)
        return state is not None and state.final

    took = await wait_for(b_done, B_WINDOW + 30, "B's batch to end")
    state = await batches.get(b, b_id)
    assert state.status == "completed", f"B's batch ended {state.status} after {took:.0f} s"
    assert state.times["completed_at"] <= deadline and state.completed == 2
    active = [x for x in await batches.active() if x in set(a_ids)]
    assert len(active) >= FLOOD - 2, "A's batches did not wait"
    assert most_queued < 20, f"{most_queued} background jobs queued at once"
