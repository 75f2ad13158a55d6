"""Tenants, keys and the admission script against a real redis-server (no engine needed)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from api.errors import InvalidRequest, RateLimited
from control.redis_server import EmbeddedRedis
from serving.admission import Admission, DrainMeter, Ticket, default_output, reservation, reset_text
from serving.dispatch import Dispatcher, Timeouts
from serving.replies import ReplyHub
from shared.fleet import gather
from shared.messages import Job, Sampling, Usage, UsageEvent, decode_job
from shared.names import Names
from shared.tenants import Tenant, TenantDefaults, TenantStore, key_id_of
from tests.conftest import count_pipelines


@pytest_asyncio.fixture
async def names() -> Names:
    return Names("limits-" + uuid.uuid4().hex[:8])


@pytest_asyncio.fixture
async def admission(redis: Redis, names: Names) -> AsyncIterator[Admission]:
    yield Admission(redis, names, request_ttl=60, drain=DrainMeter(), max_backlog_total=10_000)


def job(reserve: int, model: str = "m") -> Job:
    """A job whose reservation is ``reserve`` tokens: a prompt of ``reserve - 1`` and one to generate."""
    return Job(
        id="req_" + uuid.uuid4().hex,
        tenant="t",
        model=model,
        prompt_token_ids=tuple(range(reserve - 1)),
        sampling=Sampling(max_tokens=1),
        created_at=0.0,
    )


def used(tokens: int) -> Usage:
    return Usage(prompt_tokens=tokens, completion_tokens=0)


async def test_keys_are_stored_hashed_and_checked(redis: Redis, names: Names) -> None:
    store = TenantStore(redis, names)
    await store.put_tenant(Tenant(name="acme", rpm=10))
    key = await store.add_key("acme")
    assert key.startswith("sy-") and len(key) > 40
    tenant = await store.authenticate(key)
    assert tenant is not None and tenant.name == "acme" and tenant.rpm == 10
    stored = b"".join((await redis.hgetall(names.keys())).values())
    secret = key.split("-", 2)[2]  # the secret itself may hold "-" (URL-safe base64)
    assert key.encode() not in stored and secret.encode() not in stored
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert await store.authenticate(forged) is None
    assert await store.authenticate("sy-000000000000-x") is None
    assert await store.authenticate("not a key") is None
    key_id = key_id_of(key)
    assert key_id is not None and await store.revoke_key(key_id)
    assert await store.authenticate(key) is None
    assert [(t.name, ids) for t, ids in await store.listing()] == [("acme", [])]


async def test_a_tenant_keeps_its_id_when_its_limits_change(redis: Redis, names: Names) -> None:
    store = TenantStore(redis, names)
    first = await store.put_tenant(Tenant(name="acme", rpm=10))
    changed = await store.put_tenant(Tenant(name="acme", rpm=20))
    assert (changed.id, changed.rpm) == (first.id, 20)
    stored = await store.tenant("acme")
    assert stored is not None and stored.id == first.id
    # A record from before tenants had ids reads with the same derived id every time.
    await redis.hset(names.tenants(), "old", '{"name": "old", "created_at": 1700000000.0}')
    old = [await store.tenant("old") for _ in range(2)]
    assert old[0] is not None and old[1] is not None and old[0].id == old[1].id


def test_a_tenant_takes_the_defaults_for_the_limits_it_leaves_unset() -> None:
    defaults = TenantDefaults(rpm=60, max_backlog=1000, file_bytes=2000)
    plain = defaults.apply(Tenant(name="a"))
    assert (plain.rpm, plain.tpm, plain.max_concurrent, plain.max_backlog, plain.file_bytes) == (
        60, None, None, 1000, 2000,
    )  # fmt: skip
    own = defaults.apply(Tenant(name="b", rpm=5, max_backlog=0, tpm=0))
    assert (own.rpm, own.tpm, own.max_backlog, own.file_bytes) == (5, None, None, 2000)  # 0: no limit
    assert TenantDefaults(max_backlog=0).apply(Tenant(name="c")).max_backlog is None


async def test_a_tenant_without_limits_is_held_to_the_default_backlog(
    admission: Admission, redis: Redis, names: Names
) -> None:
    store = TenantStore(redis, names, TenantDefaults(max_backlog=2))
    for name in ("a", "b"):
        await store.put_tenant(Tenant(name=name))
    a, b = await store.tenant("a"), await store.tenant("b")
    assert a is not None and b is not None and a.max_backlog == 2
    for _ in range(2):
        await redis.xadd(names.jobs_stream("m", "a"), {"job": "{}"})
    with pytest.raises(RateLimited) as full:
        await admission.admit(a, job(1))
    assert full.value.code == "backlog_full"
    await admission.admit(b, job(1))  # the other tenant's backlog is its own
    assert (await TenantStore(redis, names).tenant("a")).max_backlog is None  # type: ignore[union-attr]


async def test_requests_per_minute(admission: Admission) -> None:
    tenant = Tenant(name="t", rpm=5)
    tickets = [await admission.admit(tenant, job(1)) for _ in range(5)]
    assert tickets[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert tickets[0].headers["x-ratelimit-limit-requests"] == "5"
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, job(1))
    assert info.value.status == 429 and 55 <= info.value.retry_after <= 60
    assert int(info.value.headers()["retry-after"]) >= 55


@pytest.mark.parametrize(
    ("limits", "fill"),
    [({"rpm": 2}, 2), ({"tpm": 100}, 100), ({"max_concurrent": 1}, 1)],
    ids=["requests", "tokens", "concurrency"],
)
async def test_the_check_before_encoding_refuses_only_a_tenant_over_its_limit_and_books_nothing(
    admission: Admission, redis: Redis, names: Names, limits: dict[str, int], fill: int
) -> None:
    tenant, other = Tenant(name="t", **limits), Tenant(name="u", **limits)  # type: ignore[arg-type]
    await admission.precheck(tenant, "m")
    if "tpm" in limits:
        await admission.admit(tenant, job(fill))
    else:
        for _ in range(fill):
            await admission.admit(tenant, job(1))
    windows = [await redis.zcard(names.rate("t", "req")), await redis.get(names.rate("t", "sum"))]
    with pytest.raises(RateLimited):
        await admission.precheck(tenant, "m")
    await admission.precheck(other, "m")  # the other tenant's limits are its own
    assert [await redis.zcard(names.rate("t", "req")), await redis.get(names.rate("t", "sum"))] == windows
    assert await redis.zcard(names.rate("u", "req")) == 0


async def test_tokens_are_reserved_then_refunded(admission: Admission) -> None:
    tenant = Tenant(name="t", tpm=100)
    first = await admission.admit(tenant, job(60))
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, job(60))
    assert info.value.code == "rate_limit_exceeded"
    await admission.settle(first, used(10))  # 50 of the 60 come back
    second = await admission.admit(tenant, job(60))
    assert second.headers["x-ratelimit-remaining-tokens"] == "30"
    with pytest.raises(InvalidRequest) as too_big:
        await admission.admit(tenant, job(101))
    assert too_big.value.code == "tokens_exceed_limit"


async def test_concurrency_slots_free_on_release(admission: Admission) -> None:
    tenant = Tenant(name="t", max_concurrent=2)
    held: list[Ticket] = [await admission.admit(tenant, job(1)) for _ in range(2)]
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, job(1))
    assert info.value.code == "concurrency_limit_exceeded"
    await admission.settle(held[0], used(1))
    await admission.admit(tenant, job(1))


async def test_requests_ending_together_are_settled_in_one_round_trip(
    redis: Redis, names: Names, admission: Admission, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wave of answers ends together: their settlements share pipelines (one write and one round
    trip each), and each frees its own slot, refunds its own tokens and logs its own usage."""
    tenant = Tenant(name="t", tpm=10_000, max_concurrent=64)
    tickets = [await admission.admit(tenant, job(10)) for _ in range(64)]
    pipelines = count_pipelines(redis, monkeypatch)
    served = [UsageEvent(tenant="t", model="m", prompt_tokens=9, completion_tokens=i % 2) for i in range(64)]
    await asyncio.gather(*(admission.settle(t, used(9 + i % 2), served[i]) for i, t in enumerate(tickets)))
    assert 1 <= pipelines[0] <= 2, "the wave went in one pipeline (two if the first settled alone)"
    assert await redis.hlen(names.inflight("t")) == 0  # every slot is free
    logged = await redis.xrange(names.usage_log())
    assert sorted(int(f[b"completion_tokens"]) for _, f in logged) == [0] * 32 + [1] * 32
    # Refunds: 64 x 10 reserved, 64 x 9 + 32 used, so the window holds what was used.
    after = await admission.admit(tenant, job(1))
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 64 * 9 - 32 - 1)


async def test_admissions_that_come_together_are_each_decided_in_turn(
    redis: Redis, admission: Admission, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wave of requests: their admissions share pipelines, and the limits hold exactly."""
    tenant = Tenant(name="t", max_concurrent=10)
    pipelines = count_pipelines(redis, monkeypatch)
    results = await asyncio.gather(
        *(admission.admit(tenant, job(1)) for _ in range(30)), return_exceptions=True
    )
    assert 1 <= pipelines[0] <= 2  # not one round trip each
    admitted = [r for r in results if isinstance(r, Ticket)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 10 and len(refused) == 20
    assert all(r.code == "concurrency_limit_exceeded" for r in refused)


async def test_a_settlement_after_redis_lost_its_scripts_still_frees_the_slot(
    redis: Redis, admission: Admission
) -> None:
    tenant = Tenant(name="t", max_concurrent=1)
    ticket = await admission.admit(tenant, job(1))
    await redis.script_flush()  # as a Redis restarted empty has none
    await admission.settle(
        ticket, used(1), UsageEvent(tenant="t", model="m", prompt_tokens=1, completion_tokens=0)
    )
    await admission.admit(tenant, job(1))  # the slot was freed: no concurrency_limit_exceeded


async def test_backlog_cap_counts_the_tenants_stream(
    redis: Redis, names: Names, admission: Admission
) -> None:
    tenant = Tenant(name="t", max_backlog=2)
    for _ in range(2):
        await redis.xadd(names.jobs_stream("m", "t"), {"job": "{}"})
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, job(1))
    assert info.value.code == "backlog_full"
    await admission.admit(Tenant(name="other", max_backlog=2), job(1))  # other tenants unaffected


async def test_a_request_of_several_jobs_is_admitted_as_one(
    redis: Redis, names: Names, admission: Admission
) -> None:
    """One request and one concurrency slot, the tokens of every job, room for every job queued."""
    tenant = Tenant(name="t", rpm=5, tpm=100, max_concurrent=1, max_backlog=3)
    ticket = await admission.admit_jobs(tenant, "req_many", [job(10) for _ in range(3)])
    assert ticket.request_id == "req_many"
    assert ticket.headers["x-ratelimit-remaining-requests"] == "4"
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "70"
    with pytest.raises(RateLimited) as busy:
        await admission.admit(tenant, job(1))
    assert busy.value.code == "concurrency_limit_exceeded"
    await admission.settle(ticket, used(12))  # 18 of the 30 come back
    await redis.xadd(names.jobs_stream("m", "t"), {"job": "{}"})
    with pytest.raises(RateLimited) as full:
        await admission.admit_jobs(tenant, "req_full", [job(1) for _ in range(3)])
    assert full.value.code == "backlog_full" and "3 more jobs" in full.value.message
    second = await admission.admit_jobs(tenant, "req_fits", [job(1) for _ in range(2)])
    assert second.headers["x-ratelimit-remaining-tokens"] == str(100 - 12 - 2)
    with pytest.raises(InvalidRequest) as never:
        await admission.admit_jobs(tenant, "req_never", [job(1) for _ in range(4)])
    assert (never.value.code, never.value.param) == ("too_many_prompts", "prompt")


async def test_limit_holds_under_concurrent_admissions(admission: Admission) -> None:
    tenant = Tenant(name="busy", rpm=50)

    async def one() -> bool:
        try:
            await admission.admit(tenant, job(1))
            return True
        except RateLimited:
            return False

    results = await asyncio.gather(*(one() for _ in range(200)))
    assert sum(results) == 50


async def test_redis_down_fails_closed() -> None:
    server = EmbeddedRedis().start()
    redis = Redis.from_url(server.url)
    names = Names("down")
    admission = Admission(redis, names, request_ttl=60, drain=DrainMeter(), max_backlog_total=10)
    server.stop()
    try:
        from api.errors import Unavailable

        with pytest.raises(Unavailable):
            await admission.admit(Tenant(name="t", rpm=5), job(1))
    finally:
        await redis.aclose()


def test_reset_text() -> None:
    assert [reset_text(x) for x in (250, 1500, 60_000, 372_000)] == ["250ms", "1.5s", "1m0s", "6m12s"]


def test_reservation_and_the_default_output_budget() -> None:
    many = Job(
        id="r", tenant="t", model="m", prompt_token_ids=(1, 2, 3),
        sampling=Sampling(max_tokens=10, n=2), created_at=0.0,
    )  # fmt: skip
    assert reservation(many) == 3 + 10 * 2
    # No tokens-per-minute limit: up to the end of the context.
    assert default_output(room=900, prompt_tokens=100, n=1, tpm=None) == 900
    # A tenant whose limit is below the context: what one request may use in a minute, per choice.
    assert default_output(room=900, prompt_tokens=100, n=1, tpm=500) == 400
    assert default_output(room=900, prompt_tokens=100, n=2, tpm=500) == 200
    assert default_output(room=300, prompt_tokens=100, n=1, tpm=5000) == 300
    # A prompt over the limit keeps one token: admission refuses it with its own message.
    assert default_output(room=900, prompt_tokens=600, n=1, tpm=500) == 1


async def test_a_request_without_max_tokens_fits_a_small_tokens_per_minute_limit(
    admission: Admission,
) -> None:
    tenant = Tenant(name="t", tpm=500)
    budget = default_output(room=1024 - 100, prompt_tokens=100, n=1, tpm=tenant.tpm)
    ticket = await admission.admit(tenant, job(100 + budget))
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_the_drain_meter_stops_deciding_on_stale_figures(redis: Redis, names: Names) -> None:
    meter = DrainMeter(stale_after=0.2)
    for _ in range(3):
        await redis.xadd(names.jobs_stream("m", "t"), {"job": "{}"})
    await redis.hset(names.streams_index("m"), names.jobs_stream("m", "t"), '{"tenant": "t"}')
    await redis.hset(names.models(), "m", b"{}")
    await redis.set(names.drained("m"), 5)
    meter.observe(await gather(redis, names))
    await redis.set(names.drained("m"), 15)
    await asyncio.sleep(0.1)
    meter.observe(await gather(redis, names))
    assert meter.backlog("m") == 3 and meter.rate("m") > 0
    await asyncio.sleep(0.3)  # no snapshot since: Redis unreachable, say
    assert meter.backlog("m") == 0 and meter.rate("m") == 0.0


async def test_admitted_and_enqueued_in_one_step_or_neither(
    admission: Admission, redis: Redis, names: Names
) -> None:
    dispatcher = Dispatcher(redis, ReplyHub(redis, names.hub_channel()), names, Timeouts(total=60, stall=60))
    tenant = Tenant(name="t", rpm=1)
    first, second = job(3), job(3)
    ticket = await admission.admit_enqueue(tenant, first, dispatcher.enqueuing(first, "batch"))
    assert ticket.headers["x-ratelimit-remaining-requests"] == "0"
    stream = names.jobs_stream("m", "t")
    [(_, fields)] = await redis.xrange(stream)
    assert decode_job(fields[b"job"]) == first
    assert b'"priority":"batch"' in await redis.hget(names.streams_index("m"), stream)
    assert (await redis.get(names.owner(first.id))).startswith(b"t:")  # what attach checks
    assert 0 < await redis.ttl(names.owner(first.id)) <= 360
    with pytest.raises(RateLimited):
        await admission.admit_enqueue(tenant, second, dispatcher.enqueuing(second))
    assert await redis.xlen(stream) == 1 and await redis.get(names.owner(second.id)) is None
