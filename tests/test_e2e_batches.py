"""The Batch API end to end with the official SDK: files, batches run by a real ``switchyard jobs``
process on the session's worker, results in OpenAI's line format, cancelling, tenancy, usage."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Batch
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from batch.housekeeping import Housekeeping
from shared.names import GROUP
from shared.settings import BackgroundSettings
from shared.tenants import Tenant
from tests.conftest import System, create_tenant
from tests.procs import spawn, stop, wait_until

pytestmark = pytest.mark.e2e

FINAL = {"completed", "failed", "expired", "cancelled"}
WINDOW = 8
"""Lines of one batch the tests' jobs process keeps on worker queues at once."""


def jobs_env(system: System, **extra: str) -> dict[str, str]:
    """A background jobs process for the session's system, quick to notice what needs doing."""
    return system.env(
        SWITCHYARD_BATCH_CHECK_INTERVAL="1",
        SWITCHYARD_BATCH_LEASE="3",
        SWITCHYARD_WORKER_TTL="3",
        SWITCHYARD_BACKGROUND_DRAIN_TIMEOUT="2",
        SWITCHYARD_BATCH_WINDOW=str(WINDOW),
        **extra,
    )


def start_jobs(system: System, log: Path, **extra: str) -> Any:
    proc = spawn("background", jobs_env(system, **extra), log)
    wait_until(
        lambda: b"batches and housekeeping" in log.read_bytes(), 60, "jobs", procs=(proc,), logs=(log,)
    )
    return proc


@pytest.fixture(scope="module")
def jobs(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("jobs") / "jobs.log"
    proc = start_jobs(system, log)
    try:
        yield log
    finally:
        stop(proc)


def chat_line(custom_id: str, model: str, tokens: int = 3, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"tell me about {custom_id}"}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": messages, "max_tokens": tokens, **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def wait_for(client: OpenAI, batch_id: str, statuses: set[str], timeout: float = 90) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout}s: {batch}"
        time.sleep(0.2)


def results(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def submit(client: OpenAI, lines: list[dict[str, Any]], endpoint: str = "/v1/chat/completions") -> Batch:
    upload = client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,
        completion_window="24h",
        metadata={"suite": "e2e"},  # type: ignore[arg-type]
    )


def test_a_batch_runs_to_completion(client: OpenAI, system: System, jobs: Path) -> None:
    lines = [chat_line(f"r{i}", system.model) for i in range(6)]
    lines.append(chat_line("too-long", system.model, tokens=5000))  # refused as the endpoint would
    batch = submit(client, lines)
    assert batch.status == "validating" and batch.metadata == {"suite": "e2e"}
    done = wait_for(client, batch.id, FINAL)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 6, 1)
    assert done.model == system.model and done.in_progress_at and done.finalizing_at and done.completed_at
    output, errors = results(client, done.output_file_id), results(client, done.error_file_id)
    assert [x["custom_id"] for x in output] == [f"r{i}" for i in range(6)]  # in input order
    for x in output:
        assert x["id"].startswith("batch_req_") and x["error"] is None
        assert x["response"]["status_code"] == 200 and x["response"]["request_id"].startswith("req_")
        body = x["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 3
    (refused,) = errors
    assert refused["custom_id"] == "too-long" and refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert done.usage is not None
    assert done.usage.output_tokens == sum(
        x["response"]["body"]["usage"]["completion_tokens"] for x in output
    )
    files = {f.id: f for f in client.files.list(purpose="batch_output")}
    assert files[done.output_file_id].filename == f"{batch.id}_output.jsonl"  # type: ignore[index]


def test_text_completion_batches_and_listing(client: OpenAI, system: System, jobs: Path) -> None:
    line = {
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": system.model, "prompt": "hi", "max_tokens": 2},
    }
    first = submit(client, [{"custom_id": "t0", **line}], endpoint="/v1/completions")
    second = submit(client, [{"custom_id": "t1", **line}], endpoint="/v1/completions")
    done = wait_for(client, first.id, FINAL)
    assert done.status == "completed", done
    (out,) = results(client, done.output_file_id)
    assert out["response"]["body"]["object"] == "text_completion"
    newest = client.batches.list(limit=1)
    assert [b.id for b in newest.data] == [second.id] and newest.has_more
    following = client.batches.list(limit=1, after=second.id)
    assert [b.id for b in following.data] == [first.id]
    wait_for(client, second.id, FINAL)


def test_a_batch_whose_lines_the_deployment_refuses_fails_naming_them(
    client: OpenAI, system: System, jobs: Path
) -> None:
    lines = [chat_line("a", system.model), chat_line("b", "no-such-model"), chat_line("c", system.model)]
    lines[2]["url"] = "/v1/completions"
    lines[2]["body"] = {"model": system.model, "prompt": "x"}
    batch = submit(client, lines)
    failed = wait_for(client, batch.id, FINAL)
    assert failed.status == "failed" and failed.failed_at and failed.errors and failed.errors.data
    found = [(e.line, e.code) for e in failed.errors.data]
    assert found == [(2, "model_not_found"), (3, "mismatched_endpoint")]


def test_cancel_stops_lines_within_seconds(client: OpenAI, system: System, jobs: Path) -> None:
    # A few short lines finish first; the long ones run (at most WINDOW at a time) until cancelled.
    lines = [chat_line(f"c{i}", system.model, tokens=2 if i < 3 else 900, ignore_eos=True) for i in range(40)]
    batch = submit(client, lines)
    wait_for(client, batch.id, {"in_progress"})
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 1:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    asked = time.monotonic()
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_for(client, batch.id, FINAL, timeout=30)
    took = time.monotonic() - asked
    assert done.status == "cancelled" and done.cancelled_at, done
    assert took < 5, f"cancelled after {took:.1f}s"
    output, errors = results(client, done.output_file_id), results(client, done.error_file_id)
    answered = {x["custom_id"] for x in output}
    assert done.request_counts is not None and len(answered) == done.request_counts.completed
    assert {"c0", "c1", "c2"} <= answered and len(answered) < len(lines) - WINDOW
    unrun = {x["custom_id"] for x in errors if x["error"] and x["error"]["code"] == "batch_cancelled"}
    assert answered | unrun == {x["custom_id"] for x in lines} and not answered & unrun
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: no change, no error
    # Running lines are aborted and queued ones skipped, within seconds (a long line runs for more).
    queued = SyncRedis.from_url(system.redis_url)
    try:
        stream = system.names.batch_stream(system.model, "main")

        def idle() -> bool:
            return queued.xlen(stream) == 0 and int(queued.xpending(stream, GROUP)["pending"]) == 0

        assert wait_until_true(idle, 5), "cancelled lines still queued or running"
    finally:
        queued.close()
    time.sleep(1)
    later = client.batches.retrieve(batch.id)
    assert (
        later.request_counts is not None and later.request_counts.completed == done.request_counts.completed
    )


def wait_until_true(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_another_tenants_objects_do_not_exist(client: OpenAI, system: System, jobs: Path) -> None:
    batch = submit(client, [chat_line("x", system.model)])
    name = "nosy-" + uuid.uuid4().hex[:6]
    other_key = asyncio.run(create_tenant(system.redis_url, system.names, Tenant(name=name)))
    nosy = OpenAI(base_url=f"{system.base_url}/v1", api_key=other_key, max_retries=0)
    ghost_batch, ghost_file = "batch_" + "0" * 24, "file-" + "0" * 24
    calls = {
        "retrieve batch": (lambda i: nosy.batches.retrieve(i), batch.id, ghost_batch),
        "cancel batch": (lambda i: nosy.batches.cancel(i), batch.id, ghost_batch),
        "retrieve file": (lambda i: nosy.files.retrieve(i), batch.input_file_id, ghost_file),
        "file content": (lambda i: nosy.files.content(i), batch.input_file_id, ghost_file),
        "delete file": (lambda i: nosy.files.delete(i), batch.input_file_id, ghost_file),
        "batch from file": (
            lambda i: nosy.batches.create(
                input_file_id=i, endpoint="/v1/chat/completions", completion_window="24h"
            ),
            batch.input_file_id,
            ghost_file,
        ),
    }
    for what, (call, theirs, never) in calls.items():
        answers = []
        for object_id in (theirs, never):
            with pytest.raises(openai.NotFoundError) as missing:
                call(object_id)
            answers.append((missing.value.status_code, missing.value.code))
        assert answers[0] == answers[1] == (404, "not_found"), what
    assert nosy.batches.list().data == [] and nosy.files.list().data == []
    wait_for(client, batch.id, FINAL)


def test_usage_is_rolled_up_per_hour_and_model(client: OpenAI, system: System, jobs: Path) -> None:
    key = asyncio.run(
        create_tenant(system.redis_url, system.names, Tenant(name="counted-" + uuid.uuid4().hex[:6]))
    )
    tenant = OpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0)
    for _ in range(2):
        tenant.chat.completions.create(
            model=system.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    with pytest.raises(openai.BadRequestError):
        tenant.chat.completions.create(
            model=system.model, messages=[{"role": "user", "content": "hi"}], max_tokens=9999
        )
    settings = BackgroundSettings(redis_url=system.redis_url, key_prefix=system.names.prefix)

    async def roll_up() -> dict[str, int]:
        redis = Redis.from_url(system.redis_url)
        try:
            return await Housekeeping(redis, settings).roll_up_usage()
        finally:
            await redis.aclose()

    time.sleep(0.5)  # the last request's usage is logged as its response ends
    assert asyncio.run(roll_up())["requests"] >= 2
    resp = httpx.get(f"{system.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    (bucket,) = resp.json()["data"]
    assert bucket["model"] == system.model and bucket["requests"] == 2 and bucket["errors"] == 0
    assert bucket["prompt_tokens"] > 0 and bucket["completion_tokens"] <= 4
    assert bucket["end_time"] - bucket["start_time"] == 3600
    others = httpx.get(f"{system.base_url}/v1/usage", headers=system.headers, timeout=10).json()
    assert others["tenant"] == "main"


def test_a_batch_created_again_under_its_idempotency_key_is_the_same_batch(system: System) -> None:
    """A retried create (the client never saw the first answer) makes no second batch; the same key
    with another body is a 409; without a key every create is a batch of its own."""
    name = "retry-" + uuid.uuid4().hex[:6]
    key = asyncio.run(create_tenant(system.redis_url, system.names, Tenant(name=name)))
    client = OpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0)
    upload = client.files.create(file=("b.jsonl", jsonl([chat_line("a", system.model)])), purpose="batch")
    body = {"input_file_id": upload.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    once = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.batches.create(**body, extra_headers=once)  # type: ignore[arg-type]
    again = client.batches.create(**body, extra_headers=once)  # type: ignore[arg-type]
    assert again.id == first.id and again.created_at == first.created_at
    with pytest.raises(openai.ConflictError) as other:
        client.batches.create(**body, metadata={"x": "y"}, extra_headers=once)  # type: ignore[arg-type]
    assert other.value.code == "idempotency_key_reused"
    plain = client.batches.create(**body)  # type: ignore[arg-type]
    assert plain.id != first.id
    listed = {b.id for b in client.batches.list()}
    assert listed == {first.id, plain.id}
    for made in (first, plain):
        client.batches.cancel(made.id)
