"""Input that once made the gateway answer 500 (or hold a connection open forever): each gets a clear
OpenAI-style 4xx and changes nothing, or the connection is closed."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from redis import Redis as SyncRedis

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from tests.conftest import System
from tests.procs import spawn, stop, wait_until
from tests.test_e2e_batches import chat_line, jsonl

DEEP = 100_000
"""Levels of nesting, far past what a recursive JSON parser goes down."""


def post_file(system: System, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(
        f"{system.base_url}/v1/files",
        headers=system.headers,
        data={"purpose": "batch", **fields},
        files={"file": ("in.jsonl", data)},
        timeout=60,
    )


def file_ids(client: OpenAI) -> list[str]:
    return [f.id for f in client.files.list()]


@pytest.mark.e2e
def test_a_line_nested_too_deeply_is_refused_naming_it(client: OpenAI, system: System) -> None:
    nested = b'{"custom_id": "deep", "body": ' + b"[" * DEEP + b"]" * DEEP + b"}\n"
    before = file_ids(client)
    resp = post_file(system, jsonl([chat_line("a", system.model)]) + nested)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_file" and "line 2: not valid JSON: nested too deeply" in error["message"]
    assert file_ids(client) == before


@pytest.mark.e2e
def test_a_request_body_nested_too_deeply_is_a_400(system: System) -> None:
    body = b'{"model": "m", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    resp = httpx.post(
        f"{system.base_url}/v1/chat/completions",
        headers={**system.headers, "content-type": "application/json"},
        content=body,
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.e2e
@pytest.mark.parametrize("seconds", ["²", "٣٦٠٠", "3600.0", " 3600x", "1e4"])
def test_expiry_seconds_must_be_a_plain_whole_number(client: OpenAI, system: System, seconds: str) -> None:
    before = file_ids(client)
    data = jsonl([chat_line("a", system.model)])
    resp = post_file(
        system, data, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": seconds}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "expires_after[seconds]"
    assert file_ids(client) == before


@pytest.mark.e2e
def test_the_names_beside_an_own_object_are_no_objects(client: OpenAI, system: System) -> None:
    """A batch's hash has neighbours in Redis (its lines' jobs, results, lease): an id that names one
    of them is not a batch, whoever owns the batch."""
    source = client.files.create(file=("a.jsonl", jsonl([chat_line("a", system.model)])), purpose="batch")
    batch = client.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    redis = SyncRedis.from_url(system.redis_url)
    try:
        redis.hset(system.names.batch_jobs(batch.id), "a", "req_0")
        redis.hset(system.names.batch_results(batch.id), "a", "{}")
        for suffix in (":jobs", ":results", ":lease", ":"):
            for method, path in (("GET", ""), ("POST", "/cancel")):
                url = f"{system.base_url}/v1/batches/{batch.id}{suffix}{path}"
                resp = httpx.request(method, url, headers=system.headers, timeout=10)
                assert resp.status_code == 404, (suffix, path, resp.text)
        for suffix in (":x", ".part", "%3Ajobs"):
            resp = httpx.get(f"{system.base_url}/v1/files/{source.id}{suffix}", headers=system.headers)
            assert resp.status_code == 404, (suffix, resp.text)
    finally:
        redis.delete(system.names.batch_jobs(batch.id), system.names.batch_results(batch.id))
        redis.close()
        client.batches.cancel(batch.id)


@pytest.mark.e2e
def test_a_stop_string_is_bounded_in_length(client: OpenAI, system: System) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=system.model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            stop=["x" * 100_000],
        )
    assert refused.value.param == "stop"


@pytest.mark.e2e
def test_a_batch_line_may_not_be_larger_than_a_request(client: OpenAI, system: System) -> None:
    """Over HTTP a body is capped at 4 MiB; a line of a batch is one request, so the same cap holds."""
    big = chat_line("big", system.model, user="u")
    big["body"]["messages"][0]["content"] = "word " * (1 << 20)  # 5 MiB
    before = file_ids(client)
    resp = post_file(system, jsonl([chat_line("a", system.model), big]))
    assert resp.status_code == 400, resp.text
    assert "line 2: a request may be at most 4194304 bytes" in resp.json()["error"]["message"]
    assert file_ids(client) == before


# -- connections, on a gateway of its own ----------------------------------------------------------

HEADER_TIMEOUT = 1.0
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def guarded(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """A gateway (no worker needed) that gives a client HEADER_TIMEOUT seconds to send a request's
    headers and serves at most MAX_CONNECTIONS connections at once."""
    port = free_port()
    log = tmp_path_factory.mktemp("guarded") / "gateway.log"
    env = {
        "REDIS_URL": redis_server.url,
        "SWITCHYARD_KEY_PREFIX": "guard" + uuid.uuid4().hex[:6],
        "SWITCHYARD_PORT": str(port),
        "SWITCHYARD_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "SWITCHYARD_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    proc: subprocess.Popen[bytes] = spawn("gateway", env, log)
    try:
        wait_until(lambda: _healthy(port), 60, "guarded gateway", procs=(proc,), logs=(log,))
        yield "127.0.0.1", port
    finally:
        stop(proc)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closes ``sock`` (None: still open after ``seconds``)."""
    sock.settimeout(0.1)
    begun = time.monotonic()
    while time.monotonic() - begun < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - begun
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - begun
    return None


def test_a_client_that_never_finishes_its_headers_is_disconnected(guarded: tuple[str, int]) -> None:
    with socket.create_connection(guarded) as silent, socket.create_connection(guarded) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a byte now and then does not keep it open
            time.sleep(HEADER_TIMEOUT / 4)
            slow.sendall(b"X")
        assert closed_within(silent, HEADER_TIMEOUT + 2) is not None, "a silent connection stayed open"
        assert closed_within(slow, HEADER_TIMEOUT + 2) is not None, "a slow header stayed open"
    # A well-behaved client on a kept-alive connection is not cut between its requests.
    with httpx.Client(base_url=f"http://{guarded[0]}:{guarded[1]}") as http:
        for _ in range(3):
            assert http.get("/healthz").status_code == 200
            time.sleep(HEADER_TIMEOUT / 2)


def test_connections_beyond_the_limit_are_refused_in_openais_envelope(guarded: tuple[str, int]) -> None:
    held = [socket.create_connection(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        resp = httpx.get(f"http://{guarded[0]}:{guarded[1]}/v1/models", timeout=5)
        assert resp.status_code == 503
        body: Any = resp.json()
        assert body["error"]["type"] == "server_error" and resp.headers["retry-after"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert httpx.get(f"http://{guarded[0]}:{guarded[1]}/healthz", timeout=5).status_code == 200
