"""Session-wide real parts: one redis-server, one vLLM worker on the demo model, one gateway.

The engine starts once per test session; tests isolate themselves by key prefix or by their own
request ids, never by flushing Redis.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from openai import AsyncOpenAI, OpenAI
from redis.asyncio import Redis

from control.processes import free_port, terminate_as_interrupt
from control.redis_server import EmbeddedRedis
from shared.names import Names
from shared.tenants import Tenant, TenantStore
from tests.procs import ready, spawn, stop, wait_until

PREFIX = "sytest"
MAX_MODEL_LEN = 1024
SESSION_RECLAIM_IDLE = 3
"""Seconds a test worker's claim may stay idle before another worker may take the job over."""
RESUME_GRACE = 3
"""Seconds the session's gateway keeps a resumable stream's job going for a client that went away."""


def pytest_configure(config: pytest.Config) -> None:
    # A suite stopped with SIGTERM (a CI timeout, kill) tears its fixtures down as on Ctrl-C,
    # rather than leave the Redis, gateways, workers and engines it started running.
    terminate_as_interrupt()


@dataclass(frozen=True)
class System:
    base_url: str
    redis_url: str
    names: Names
    model: str
    model_dir: Path
    logs: Path
    api_key: str
    worker_metrics_url: str
    gateway_metrics_url: str
    """The gateway's /metrics, on its metrics port (/scaling beside it)."""
    files_dir: Path
    """Where the session's gateway (and any background jobs process of the tests) keep files."""

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            "REDIS_URL": self.redis_url,
            "SWITCHYARD_KEY_PREFIX": self.names.prefix,
            "SWITCHYARD_FILES_DIR": str(self.files_dir),
        }
        return {**base, **extra}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.demo_model import ensure_demo_model

    cache = os.environ.get("SWITCHYARD_TEST_MODEL_DIR")
    return ensure_demo_model(Path(cache) if cache else None)


def worker_env(system_env: dict[str, str], model_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **system_env,
        "SWITCHYARD_MODEL": str(model_dir),
        "SWITCHYARD_SERVED_MODEL_NAME": "switchyard-demo",
        "SWITCHYARD_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "SWITCHYARD_DTYPE": "float32",
        "SWITCHYARD_KV_CACHE_GIB": "1",
        "SWITCHYARD_HEARTBEAT_INTERVAL": "0.25",
        "SWITCHYARD_RECLAIM_IDLE": str(SESSION_RECLAIM_IDLE),
        "SWITCHYARD_DRAIN_TIMEOUT": "5",
        "SWITCHYARD_TOOL_CALL_PARSER": "hermes",
        # Eager: compiling takes tens of seconds per start on two cores, and a dozen tests start
        # workers of their own. tests/test_e2e_compiled.py starts one as shipped.
        "SWITCHYARD_ENFORCE_EAGER": "true",
        **extra,
    }


@pytest.fixture(scope="session")
def system(
    redis_server: EmbeddedRedis, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    logs = tmp_path_factory.mktemp("logs")
    port, metrics_port, gateway_metrics_port = free_port(), free_port(), free_port()
    names = Names(PREFIX)
    key = asyncio.run(create_tenant(redis_server.url, names, Tenant(name="main")))
    sys_ = System(
        base_url=f"http://127.0.0.1:{port}",
        redis_url=redis_server.url,
        names=names,
        model="switchyard-demo",
        model_dir=demo_model_dir,
        logs=logs,
        api_key=key,
        worker_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        gateway_metrics_url=f"http://127.0.0.1:{gateway_metrics_port}/metrics",
        files_dir=tmp_path_factory.mktemp("files"),
    )
    worker_log, gateway_log = logs / "worker.log", logs / "gateway.log"
    worker_vars = worker_env(sys_.env(), demo_model_dir, SWITCHYARD_METRICS_PORT=str(metrics_port))
    worker = spawn("worker", worker_vars, worker_log)
    gateway = spawn(
        "gateway",
        sys_.env(
            SWITCHYARD_PORT=str(port),
            SWITCHYARD_METRICS_PORT=str(gateway_metrics_port),
            SWITCHYARD_PING_INTERVAL="0.5",
            SWITCHYARD_WORKER_TTL="3",
            SWITCHYARD_RESUME_GRACE=str(RESUME_GRACE),
        ),
        gateway_log,
    )
    try:
        wait_until(
            lambda: ready(sys_.base_url),
            300,
            "gateway and worker ready",
            procs=(worker, gateway),
            logs=(worker_log, gateway_log),
        )
        yield sys_
    finally:
        stop(gateway)
        stop(worker)


def forget_workers(system: System, model: str, *workers: str) -> None:
    """Take a model and its stopped workers out of Redis: later tests (and alert rules) must not
    see a model whose workers are gone."""

    async def forget() -> None:
        redis = Redis.from_url(system.redis_url)
        try:
            await redis.hdel(system.names.models(), model)
            for name in workers:
                await redis.zrem(system.names.workers(), name)
                await redis.delete(system.names.worker(name))
        finally:
            await redis.aclose()

    asyncio.run(forget())


def count_pipelines(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, how many pipelines ``redis`` opens (each one write and one round trip), as a
    one-element list the test reads when it wants; the client itself is the real one."""
    opened = [0]
    real = redis.pipeline

    def counted(*args: object, **kwargs: object) -> object:
        opened[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(redis, "pipeline", counted)
    return opened


async def create_tenant(redis_url: str, names: Names, tenant: Tenant, key: str | None = None) -> str:
    """Register a tenant and return its API key: ``key`` if given (e.g. restoring it), else a new one."""
    redis = Redis.from_url(redis_url)
    try:
        store = TenantStore(redis, names)
        await store.put_tenant(tenant)
        return await store.add_key(tenant.name, key)
    finally:
        await redis.aclose()


@pytest.fixture(scope="session")
def client(system: System) -> OpenAI:
    return OpenAI(base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0, timeout=60)


@pytest_asyncio.fixture(scope="session")
async def aclient(system: System) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0, timeout=120
    ) as c:
        yield c


@pytest_asyncio.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()
