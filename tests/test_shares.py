"""What one tenant can take from the others through a real gateway process (no engine: a model
advertised with no worker, so requests stay queued): its backlog stops at the per-tenant default
well before the model's total, and file storage has a quota per tenant, reserved from an upload's
Content-Length before its body is read."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from shared.messages import WorkerInfo, encode
from shared.names import Names
from shared.tenants import Tenant, TenantStore
from tests.procs import ready, spawn, stop, wait_until

TENANT_BACKLOG = 2
TENANT_FILES, ALL_FILES, FILE_MAX = 3000, 10_000, 2500
MODEL = "queued-model"


@dataclass(frozen=True)
class Gateway:
    base_url: str
    names: Names
    redis_url: str


@pytest.fixture(scope="module")
def gateway(
    redis_server: EmbeddedRedis, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway with small per-tenant defaults and a model nobody serves (its jobs stay queued)."""
    prefix, port = "shares" + uuid.uuid4().hex[:6], free_port()
    names = Names(prefix)
    asyncio.run(advertise(redis_server.url, names, demo_model_dir))
    log = tmp_path_factory.mktemp("shares") / "gateway.log"
    env = {
        "REDIS_URL": redis_server.url,
        "SWITCHYARD_KEY_PREFIX": prefix,
        "SWITCHYARD_PORT": str(port),
        "SWITCHYARD_FILE_STORE": "redis",
        "SWITCHYARD_TENANT_MAX_BACKLOG": str(TENANT_BACKLOG),
        "SWITCHYARD_TENANT_FILE_BYTES": str(TENANT_FILES),
        "SWITCHYARD_FILES_MAX_TOTAL_BYTES": str(ALL_FILES),
        "SWITCHYARD_FILE_MAX_BYTES": str(FILE_MAX),
        "SWITCHYARD_WORKER_TTL": "3600",
        "SWITCHYARD_PING_INTERVAL": "0.5",  # a queued stream answers with its first keep-alive
    }
    proc: subprocess.Popen[bytes] = spawn("gateway", env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        # Ready: the model's tokenizer is loaded, so the first request does not wait for it.
        wait_until(lambda: ready(base), 120, "gateway", procs=(proc,), logs=(log,))
        yield Gateway(base, names, redis_server.url)
    finally:
        stop(proc)


async def advertise(redis_url: str, names: Names, model_dir: Path) -> None:
    """A model as a worker advertises it, with no worker reading its queue."""
    now = time.time()
    info = WorkerInfo(
        id="idle", model=MODEL, tokenizer=str(model_dir), max_model_len=512, capacity=1,
        started_at=now, heartbeat_at=now + 3600,
    )  # fmt: skip
    async with Redis.from_url(redis_url) as redis:
        await redis.hset(names.models(), MODEL, encode(info))
        await redis.set(names.worker(info.id), encode(info), ex=3600)
        await redis.zadd(names.workers(), {info.id: now + 3600})


@pytest.fixture
def keys(gateway: Gateway) -> dict[str, str]:
    """Two fresh tenants created without any limit of their own."""

    async def create() -> dict[str, str]:
        out = {}
        async with Redis.from_url(gateway.redis_url) as redis:
            store = TenantStore(redis, gateway.names)
            for role in ("a", "b"):
                name = f"{role}-{uuid.uuid4().hex[:6]}"
                await store.put_tenant(Tenant(name=name))
                out[role] = await store.add_key(name)
        return out

    return asyncio.run(create())


async def open_stream(http: httpx.AsyncClient, key: str) -> httpx.Response:
    """A streamed request: its answer starts (200) once it is admitted and queued."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2}
    request = http.build_request(
        "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    )
    return await http.send(request, stream=True)


async def test_a_tenant_without_limits_cannot_take_the_models_whole_backlog(
    gateway: Gateway, keys: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
        held = [await open_stream(http, keys["a"]) for _ in range(TENANT_BACKLOG)]
        try:
            assert [r.status_code for r in held] == [200] * TENANT_BACKLOG
            over = await open_stream(http, keys["a"])
            await over.aread()
            assert over.status_code == 429 and over.json()["error"]["code"] == "backlog_full", over.text
            other = await open_stream(http, keys["b"])
            assert other.status_code == 200, "one tenant's backlog refused another's request"
            await other.aclose()
        finally:
            for resp in held:
                await resp.aclose()


def upload(gateway: Gateway, key: str, size: int) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/v1/files",
        headers={"authorization": f"Bearer {key}"},
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", padded(size))},
        timeout=10,
    )


def padded(size: int) -> bytes:
    """One valid line of exactly ``size`` bytes."""
    line = {
        "custom_id": "p",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": ""},
    }
    line["body"]["prompt"] = "x" * (size - len(json.dumps(line)) - 1)  # type: ignore[index]
    return (json.dumps(line) + "\n").encode()


def test_files_have_a_quota_per_tenant(gateway: Gateway, keys: dict[str, str]) -> None:
    assert [upload(gateway, keys["a"], 1300).status_code for _ in range(2)] == [200, 200]
    full = upload(gateway, keys["a"], 1300)
    assert full.status_code == 413 and full.json()["error"]["code"] == "storage_full", full.text
    assert "tenant" in full.json()["error"]["message"]
    assert upload(gateway, keys["b"], 1300).status_code == 200, "one tenant's files filled the store"
    with SyncRedis.from_url(gateway.redis_url) as redis:  # nothing left reserved
        assert redis.hlen(gateway.names.file_reservations()) == 0


def answer_before_body(gateway: Gateway, key: str, declared: int) -> tuple[float, bytes]:
    """Send an upload's headers only and wait for an answer: (seconds it took, status line)."""
    boundary = "b0undary"
    host, port = gateway.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {declared}\r\n\r\n"
            ).encode()
        )
        begun = time.monotonic()
        try:
            status = sock.recv(4096).split(b"\r\n", 1)[0]
        except TimeoutError:
            status = b"(no answer)"
        return time.monotonic() - begun, status


def test_an_upload_over_the_quota_is_refused_before_its_body_arrives(
    gateway: Gateway, keys: dict[str, str]
) -> None:
    assert upload(gateway, keys["a"], 1300).status_code == 200
    took, status = answer_before_body(gateway, keys["a"], 2000)  # 1700 left for this tenant
    assert status.startswith(b"HTTP/1.1 413") and took < 2, (took, status)
    # Room is reserved while an upload is under way: a second upload cannot take it meanwhile.
    host, port = gateway.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as slow:
        slow.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {keys['a']}\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1500\r\n\r\n--x"
            ).encode()
        )
        time.sleep(0.5)
        took, status = answer_before_body(gateway, keys["a"], 1000)
        assert status.startswith(b"HTTP/1.1 413") and took < 2, (took, status)
    assert upload(gateway, keys["b"], 1300).status_code == 200
