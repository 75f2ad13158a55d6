"""A gateway's metrics and scaling figures are for monitoring only: served on the metrics port and
not at all on the API's, and what anyone may ask (``/readyz``) names no model and no Redis.

Real gateway processes against a real Redis; no engine (a model is advertised by a heartbeat the
test writes, as a worker would)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from shared.messages import WorkerInfo, encode
from shared.names import Names
from shared.settings import GatewaySettings
from tests.procs import spawn, stop, wait_until

MODEL = "secret-model-name"


class _Gateway:
    def __init__(self, base: str, internal: str, prefix: str) -> None:
        self.base, self.internal, self.prefix = base, internal, prefix


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Gateway]:
    port, metrics_port = free_port(), free_port()
    prefix = "ports-" + uuid.uuid4().hex[:6]
    env = {
        "REDIS_URL": redis_server.url,
        "SWITCHYARD_KEY_PREFIX": prefix,
        "SWITCHYARD_PORT": str(port),
        "SWITCHYARD_METRICS_PORT": str(metrics_port),
        "SWITCHYARD_WORKER_TTL": "3",
    }
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    proc = spawn("gateway", env, log)
    gw = _Gateway(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", prefix)

    def answers() -> bool:
        try:
            return httpx.get(f"{gw.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, 60, "the gateway", procs=(proc,), logs=(log,))
        yield gw
    finally:
        stop(proc)


def test_metrics_and_scaling_only_on_the_metrics_port(gateway: _Gateway) -> None:
    for path in ("/metrics", "/scaling", "/scaling?model=x"):
        assert httpx.get(f"{gateway.base}{path}").status_code == 404, path
    metrics = httpx.get(f"{gateway.internal}/metrics")
    assert metrics.status_code == 200 and "switchyard:redis_up" in metrics.text
    assert httpx.get(f"{gateway.internal}/scaling").json() == {"models": {}}
    unknown = httpx.get(f"{gateway.internal}/scaling", params={"model": "nobody"}).json()
    assert unknown == {"model": "nobody", "desired_workers": 0, "known": False}
    # The API is not served on the metrics port.
    for path in ("/v1/models", "/readyz", "/healthz", "/docs"):
        assert httpx.get(f"{gateway.internal}{path}").status_code == 404, path


def test_readiness_names_no_model(gateway: _Gateway, redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    assert httpx.get(f"{gateway.base}/readyz").json() == {"status": "unready", "reason": "no live worker"}

    async def advertise() -> None:
        """A worker's heartbeat for the model, as in tests/test_e2e_faults.py (nobody runs its jobs)."""
        names, now = Names(gateway.prefix), time.time()
        info = WorkerInfo(
            id="idle", model=MODEL, tokenizer=str(tmp_path), max_model_len=512, capacity=1,
            started_at=now, heartbeat_at=now,
        )  # fmt: skip
        redis = Redis.from_url(redis_server.url)
        try:
            await redis.hset(names.models(), MODEL, encode(info))
            await redis.set(names.worker(info.id), encode(info), ex=30)
            await redis.zadd(names.workers(), {info.id: now})
        finally:
            await redis.aclose()

    asyncio.run(advertise())

    def answered() -> str:
        return httpx.get(f"{gateway.base}/readyz").text

    wait_until(lambda: "no live worker" not in answered(), 10, "the gateway seeing the model")
    assert MODEL not in answered()

    def known() -> bool:  # the model is there, for those who may see it (within a probe period)
        return bool(httpx.get(f"{gateway.internal}/scaling", params={"model": MODEL}).json()["known"])

    wait_until(known, 10, "the model in /scaling on the metrics port")


def test_readiness_without_redis_names_no_address(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    server = EmbeddedRedis().start()
    env = {
        "REDIS_URL": server.url,
        "SWITCHYARD_PORT": str(port),
        "SWITCHYARD_METRICS_PORT": str(metrics_port),
    }
    log = tmp_path / "gateway.log"
    proc = spawn("gateway", env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(f"{base}/readyz") == 503, 60, "the gateway", procs=(proc,), logs=(log,))
        server.kill()
        wait_until(lambda: "Redis" in httpx.get(f"{base}/readyz").text, 30, "unready for Redis")
        body = httpx.get(f"{base}/readyz").json()
        assert str(server.port) not in str(body) and "127.0.0.1" not in str(body), body
    finally:
        stop(proc)
        server.stop()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return 0


def test_the_metrics_port_is_never_the_apis() -> None:
    with pytest.raises(ValidationError, match="metrics port"):
        GatewaySettings(port=8000, metrics_port=8000)
    assert GatewaySettings(port=8000, metrics_port=9100).metrics_port == 9100
