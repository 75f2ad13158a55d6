"""Requests that need the same lookup at once share one read (the fleet's models, a key's tenant)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis
from starlette.requests import Request

from gateway.auth import Authenticator
from serving.shared_reads import SharedReads
from shared.names import Names
from shared.tenants import Tenant, TenantStore


class CountingStore(TenantStore):
    lookups = 0

    async def authenticate(self, key: str) -> Tenant | None:
        self.lookups += 1
        return await super().authenticate(key)


def request(key: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]})


async def test_a_wave_of_requests_with_one_key_looks_it_up_once(redis: Redis) -> None:
    store = CountingStore(redis, Names("auth-" + uuid.uuid4().hex[:8]))
    await store.put_tenant(Tenant(name="t"))
    key = await store.add_key("t")
    auth = Authenticator(store, required=True)
    tenants = await asyncio.gather(*(auth.tenant(request(key)) for _ in range(64)))
    assert {t.name for t in tenants} == {"t"} and store.lookups == 1
    other = await store.add_key("t")  # another key is another lookup
    assert (await auth.tenant(request(other))).name == "t" and store.lookups == 2


async def test_an_error_reaches_every_caller_and_the_next_call_reads_again() -> None:
    reads = SharedReads[str, int]()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise ConnectionError("redis is down")

    results = await asyncio.gather(*(reads.get("k", failing) for _ in range(3)), return_exceptions=True)
    assert calls == 1 and all(isinstance(r, ConnectionError) for r in results)
    with pytest.raises(ConnectionError):
        await reads.get("k", failing)
    assert calls == 2


async def test_a_caller_that_gives_up_leaves_the_read_to_the_others() -> None:
    reads = SharedReads[str, int]()
    release = asyncio.Event()

    async def slow() -> int:
        await release.wait()
        return 7

    quitter = asyncio.create_task(reads.get("k", slow))
    stayer = asyncio.create_task(reads.get("k", slow))
    await asyncio.sleep(0)
    quitter.cancel()
    release.set()
    assert await stayer == 7 and quitter.cancelled()
