"""``switchyard status``: the pure formatting, rejection reasons, the token rate, and the real command."""

from __future__ import annotations

import dataclasses
import json

import pytest
from openai import OpenAI
from redis.exceptions import ConnectionError as RedisConnectionError

from api.errors import (
    APIError,
    BodyTooLarge,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Unavailable,
)
from control.status import as_json, render
from gateway.metrics import rejection_reason
from shared.fleet import ConsumerStatus, Snapshot, StreamStatus, WorkerStatus
from tests.conftest import System
from tests.test_cli import switchyard
from worker.metrics import TokenRate


def snapshot() -> Snapshot:
    stream = StreamStatus(
        model="m1",
        tenant="acme",
        stream="p:jobs:m1:acme",
        backlog=7,
        pending=2,
        consumers=(ConsumerStatus(name="w-1", pending=2, idle_s=0.4),),
    )
    idle = StreamStatus(
        model="m1", tenant="default", stream="p:jobs:m1:default", backlog=0, pending=0, consumers=()
    )
    live = WorkerStatus(
        id="w-1",
        model="m1",
        age_s=0.5,
        live=True,
        inflight=2,
        capacity=8,
        running=2,
        waiting=1,
        kv_cache_usage=0.125,
        tokens_per_s=431.25,
    )
    stale = WorkerStatus(
        id="w-2",
        model="m1",
        age_s=42.0,
        live=False,
        inflight=0,
        capacity=8,
        running=0,
        waiting=0,
        kv_cache_usage=0.0,
        tokens_per_s=0.0,
    )
    return Snapshot(
        taken_at=0.0, streams=(stream, idle), workers=(live, stale), dead_letters={"m1": 3, "m2": 0}
    )


def test_render_shows_queues_workers_and_dead_letters() -> None:
    text = render(snapshot())
    lines = text.splitlines()
    assert "model m1: 1 live worker(s), dead letters 3" in lines
    assert "model m2: 0 live worker(s), dead letters 0" in lines
    acme = next(line for line in lines if line.strip().startswith("acme"))
    assert acme.split()[:3] == ["acme", "7", "2"]
    assert "w-1 (2 pending, idle 0.4s)" in acme
    default = next(line for line in lines if line.strip().startswith("default"))
    assert default.split() == ["default", "0", "0", "-"]
    w1 = next(line for line in lines if line.strip().startswith("w-1"))
    assert w1.split() == ["w-1", "0.5s", "2/8", "2", "1", "12.5%", "431.2"]
    w2 = next(line for line in lines if line.strip().startswith("w-2"))
    assert "(stale)" in w2


def test_render_marks_simulated_workers() -> None:
    snap = snapshot()
    sim = dataclasses.replace(snap.workers[0], id="w-3", engine="sim")
    lines = render(dataclasses.replace(snap, workers=(sim,))).splitlines()
    assert next(line for line in lines if "w-3" in line).split()[:3] == ["w-3", "(sim)", "0.5s"]


def test_render_of_an_empty_system_says_so() -> None:
    empty = Snapshot(taken_at=0.0, streams=(), workers=(), dead_letters={})
    assert render(empty).endswith("no model has been served here yet")


def test_json_groups_by_model() -> None:
    doc = json.loads(json.dumps(as_json(snapshot())))  # serialisable as is
    m1, m2 = doc["models"]
    assert (m1["model"], m1["dead_letter"], m2["model"]) == ("m1", 3, "m2")
    assert [t["tenant"] for t in m1["tenants"]] == ["acme", "default"]
    assert m1["tenants"][0]["consumers"] == [{"name": "w-1", "pending": 2, "idle_s": 0.4}]
    assert [w["id"] for w in m1["workers"]] == ["w-1", "w-2"]
    assert m1["workers"][0]["tokens_per_s"] == 431.25
    assert m2["tenants"] == [] and m2["workers"] == []


class RateLimited(APIError):
    status = 429
    code = "rate_limit_exceeded"


class Unauthorized(APIError):
    status = 401
    code = "invalid_api_key"


def _from_redis() -> Unavailable:
    try:
        raise RedisConnectionError("gone")
    except RedisConnectionError as exc:
        try:
            raise Unavailable("the queue is unreachable") from exc
        except Unavailable as outer:
            return outer


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (InvalidRequest("bad"), "invalid"),
        (InvalidRequest("long", code="context_length_exceeded"), "context_length"),
        (BodyTooLarge("big"), "too_large"),
        (ModelNotFound("who"), "model_not_found"),
        (NotFound("what"), "model_not_found"),
        (Unavailable("no worker now"), "no_worker"),
        (_from_redis(), "redis_unavailable"),
        (Unavailable("full", code="backlog_full"), "backlog_full"),
        (RateLimited("slow down"), "rate_limit"),
        (RateLimited("queue full", code="backlog_full"), "backlog_full"),
        (Unauthorized("who are you"), "auth"),
    ],
)
def test_rejection_reasons(error: APIError, reason: str) -> None:
    assert rejection_reason(error) == reason


def test_token_rate_covers_the_last_ten_seconds() -> None:
    rate = TokenRate(window=10)
    rate.add(50, now=100.2)
    rate.add(50, now=100.7)
    rate.add(100, now=105.0)
    assert rate.per_second(now=105.5) == 20.0
    assert rate.per_second(now=110.5) == 10.0  # the first second has left the window
    assert rate.per_second(now=200.0) == 0.0


@pytest.mark.e2e
def test_status_json_describes_the_running_system(system: System, client: OpenAI) -> None:
    client.chat.completions.create(
        model=system.model,
        messages=[{"role": "user", "content": "status"}],
        max_tokens=64,
        extra_body={"ignore_eos": True},
    )
    env = {"REDIS_URL": system.redis_url, "SWITCHYARD_KEY_PREFIX": system.names.prefix}
    result = switchyard("status", "--json", **env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    demo = next(m for m in doc["models"] if m["model"] == system.model)
    # The tenant may have a batch-priority stream too (batch tests); the interactive one is listed.
    stream = system.names.jobs_stream(system.model, "main")
    default = next(t for t in demo["tenants"] if t["stream"] == stream)
    assert default["tenant"] == "main"
    assert default["backlog"] >= 0 and default["pending"] >= 0
    assert default["consumers"], "the worker's consumer should be listed"
    worker = next(w for w in demo["workers"] if w["live"])
    assert worker["capacity"] > 0 and worker["age_s"] < 3
    assert worker["tokens_per_s"] > 0  # 64 tokens within the last ten seconds
    assert isinstance(demo["dead_letter"], int)

    text = switchyard("status", **env)
    assert text.returncode == 0, text.stderr
    assert f"model {system.model}:" in text.stdout
    assert worker["id"] in text.stdout


def test_status_without_redis_is_a_one_line_error() -> None:
    from control.processes import free_port

    result = switchyard("status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("switchyard: error: cannot read Redis")
