"""Tenants, keys and the admission script against a real redis-server (no engine needed)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway.admission import Admission, DrainMeter, Ticket, reset_text
from gateway.errors import InvalidRequest, RateLimited
from shared.names import Names
from shared.redis_server import EmbeddedRedis
from shared.tenants import Tenant, TenantStore, key_id_of


@pytest_asyncio.fixture
async def names() -> Names:
    return Names("limits-" + uuid.uuid4().hex[:8])


@pytest_asyncio.fixture
async def admission(redis: Redis, names: Names) -> AsyncIterator[Admission]:
    yield Admission(redis, names, request_ttl=60, drain=DrainMeter(redis, names), max_backlog_total=10_000)


def rid() -> str:
    return "req_" + uuid.uuid4().hex


async def test_keys_are_stored_hashed_and_checked(redis: Redis, names: Names) -> None:
    store = TenantStore(redis, names)
    await store.put_tenant(Tenant(name="acme", rpm=10))
    key = await store.add_key("acme")
    assert key.startswith("sy-") and len(key) > 40
    tenant = await store.authenticate(key)
    assert tenant is not None and tenant.name == "acme" and tenant.rpm == 10
    stored = b"".join((await redis.hgetall(names.keys())).values())
    assert key.encode() not in stored and key.split("-")[-1].encode() not in stored
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert await store.authenticate(forged) is None
    assert await store.authenticate("sy-000000000000-x") is None
    assert await store.authenticate("not a key") is None
    key_id = key_id_of(key)
    assert key_id is not None and await store.revoke_key(key_id)
    assert await store.authenticate(key) is None
    assert [(t.name, ids) for t, ids in await store.listing()] == [("acme", [])]


async def test_requests_per_minute(admission: Admission) -> None:
    tenant = Tenant(name="t", rpm=5)
    tickets = [await admission.admit(tenant, rid(), "m", 1) for _ in range(5)]
    assert tickets[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert tickets[0].headers["x-ratelimit-limit-requests"] == "5"
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, rid(), "m", 1)
    assert info.value.status == 429 and 55 <= info.value.retry_after <= 60
    assert int(info.value.headers()["retry-after"]) >= 55


async def test_tokens_are_reserved_then_refunded(admission: Admission) -> None:
    tenant = Tenant(name="t", tpm=100)
    first = await admission.admit(tenant, rid(), "m", 60)
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, rid(), "m", 60)
    assert info.value.code == "rate_limit_exceeded"
    await admission.release(first, used_tokens=10)  # 50 of the 60 come back
    second = await admission.admit(tenant, rid(), "m", 60)
    assert second.headers["x-ratelimit-remaining-tokens"] == "30"
    with pytest.raises(InvalidRequest) as too_big:
        await admission.admit(tenant, rid(), "m", 101)
    assert too_big.value.code == "tokens_exceed_limit"


async def test_concurrency_slots_free_on_release(admission: Admission) -> None:
    tenant = Tenant(name="t", max_concurrent=2)
    held: list[Ticket] = [await admission.admit(tenant, rid(), "m", 1) for _ in range(2)]
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, rid(), "m", 1)
    assert info.value.code == "concurrency_limit_exceeded"
    await admission.release(held[0], 1)
    await admission.admit(tenant, rid(), "m", 1)


async def test_backlog_cap_counts_the_tenants_stream(
    redis: Redis, names: Names, admission: Admission
) -> None:
    tenant = Tenant(name="t", max_backlog=2)
    for _ in range(2):
        await redis.xadd(names.jobs_stream("m", "t"), {"job": "{}"})
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, rid(), "m", 1)
    assert info.value.code == "backlog_full"
    await admission.admit(Tenant(name="other", max_backlog=2), rid(), "m", 1)  # other tenants unaffected


async def test_limit_holds_under_concurrent_admissions(admission: Admission) -> None:
    tenant = Tenant(name="busy", rpm=50)

    async def one() -> bool:
        try:
            await admission.admit(tenant, rid(), "m", 1)
            return True
        except RateLimited:
            return False

    results = await asyncio.gather(*(one() for _ in range(200)))
    assert sum(results) == 50


async def test_redis_down_fails_closed() -> None:
    server = EmbeddedRedis().start()
    redis = Redis.from_url(server.url)
    names = Names("down")
    admission = Admission(redis, names, request_ttl=60, drain=DrainMeter(redis, names), max_backlog_total=10)
    server.stop()
    try:
        from gateway.errors import Unavailable

        with pytest.raises(Unavailable):
            await admission.admit(Tenant(name="t", rpm=5), rid(), "m", 1)
    finally:
        await redis.aclose()


def test_reset_text() -> None:
    assert [reset_text(x) for x in (250, 1500, 60_000, 372_000)] == ["250ms", "1.5s", "1m0s", "6m12s"]
