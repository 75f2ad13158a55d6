"""Stored responses against a real Redis: kept per tenant with an expiry, status moves that never
overwrite each other, and a background response whose follower is gone read as failed."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from api.errors import InvalidRequest, NotFound
from serving.dispatch import Dispatcher, Timeouts
from serving.replies import ReplyHub
from serving.response_runs import LOST, cancel, current, previous
from serving.response_store import ResponseStore
from shared.names import Names

TTL = 3600


@pytest.fixture
def names() -> Names:
    return Names("rs" + uuid.uuid4().hex[:8])


@pytest.fixture
def store(redis: Redis, names: Names) -> ResponseStore:
    return ResponseStore(redis, names, TTL)


@pytest.fixture
def dispatcher(redis: Redis, names: Names) -> Dispatcher:
    """Only its cancel is used here (a marker and a publish): no reply connection is opened."""
    return Dispatcher(redis, ReplyHub(redis, control_channel=names.hub_channel()), names, Timeouts(60, 60))


def response(status: str = "completed") -> dict:  # type: ignore[type-arg]
    rid = "resp_" + uuid.uuid4().hex
    return {"id": rid, "object": "response", "created_at": 1, "status": status, "output": [{"type": "x"}]}


async def test_a_stored_response_is_its_tenants_only(
    redis: Redis, names: Names, store: ResponseStore, dispatcher: Dispatcher
) -> None:
    kept = response()
    await store.put("acme", kept, [{"role": "user", "content": "hi"}], "req_1")
    found = await current(store, dispatcher, "acme", kept["id"])
    assert found.response == kept and found.conversation == [{"role": "user", "content": "hi"}]
    assert 0 < await redis.ttl(names.response("acme", kept["id"])) <= TTL
    for attempt in (current, cancel):
        with pytest.raises(NotFound):
            await attempt(store, dispatcher, "globex", kept["id"])
    with pytest.raises(NotFound) as info:
        await previous(store, dispatcher, "globex", kept["id"])
    assert info.value.param == "previous_response_id"
    assert not await store.delete("globex", kept["id"])
    assert (await previous(store, dispatcher, "acme", kept["id"])).output == kept["output"]
    assert await store.delete("acme", kept["id"])
    with pytest.raises(NotFound):
        await current(store, dispatcher, "acme", kept["id"])


async def test_a_cancel_and_a_result_never_overwrite_each_other(
    store: ResponseStore, dispatcher: Dispatcher, redis: Redis, names: Names
) -> None:
    queued = response("queued")
    await store.open("acme", queued, [], "req_" + queued["id"][5:])
    assert await store.move("acme", queued["id"], "in_progress", ("queued",)) == (True, "queued")
    with pytest.raises(InvalidRequest):  # a turn cannot continue a response still running
        await previous(store, dispatcher, "acme", queued["id"])
    assert (await cancel(store, dispatcher, "acme", queued["id"]))["status"] == "cancelled"
    assert await redis.exists(names.cancelled("req_" + queued["id"][5:]))
    late = {**queued, "status": "completed"}
    assert not await store.finish("acme", late), "the follower's late result is refused"
    assert (await current(store, dispatcher, "acme", queued["id"])).status == "cancelled"
    assert (await cancel(store, dispatcher, "acme", queued["id"]))["status"] == "cancelled"

    finished = response("queued")
    await store.open("acme", finished, [], "req_2")
    assert await store.finish("acme", {**finished, "status": "completed"})
    assert not await redis.exists(names.response_lease(finished["id"]))
    with pytest.raises(InvalidRequest) as info:
        await cancel(store, dispatcher, "acme", finished["id"])
    assert info.value.param == "response_id" and "completed" in info.value.message


async def test_a_response_whose_follower_is_gone_reads_as_failed(
    store: ResponseStore, dispatcher: Dispatcher, redis: Redis, names: Names
) -> None:
    queued = response("queued")
    job = "req_" + queued["id"][5:]
    await store.open("acme", queued, [], job)
    assert (await current(store, dispatcher, "acme", queued["id"])).status == "queued"  # followed
    await redis.delete(names.response_lease(queued["id"]))  # its gateway died; the lease ran out
    found = await current(store, dispatcher, "acme", queued["id"])
    assert found.status == "failed" and found.response["error"]["code"] == LOST
    assert await redis.exists(names.cancelled(job)), "its job was cancelled"
    assert not await store.finish("acme", {**queued, "status": "completed"})
