"""Start one gateway, one worker or the background jobs in this process, with start-up problems
reported as one line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator

from control.processes import StartupError, check_port_free
from shared.settings import GatewaySettings, JobsSettings, RedisSettings, WorkerSettings


def check_redis(settings: RedisSettings, timeout: float = 3.0) -> None:
    import redis
    from redis.exceptions import RedisError

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        raise StartupError(f"cannot reach Redis at {settings.redis_url}: {exc}") from exc
    finally:
        client.close()


def run_gateway(settings: GatewaySettings) -> None:
    import uvicorn

    from gateway.app import create_app

    check_port_free(settings.host, settings.port)
    check_redis(settings)
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": 5,
    }
    if settings.processes == 1:
        uvicorn.run(create_app(settings), **options)  # type: ignore[arg-type]
        return
    with _multiprocess_metrics():
        # Worker processes build their app from an import string, so settings travel by environment.
        os.environ.update(settings.environment())
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            workers=settings.processes,
            **options,  # type: ignore[arg-type]
        )


@contextlib.contextmanager
def _multiprocess_metrics() -> Iterator[str]:
    """A directory where every gateway process writes its metric samples (a private one if unset)."""
    from gateway.metrics import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="switchyard-metrics-") as private:
        os.environ[MULTIPROC_ENV] = private
        try:
            yield private
        finally:
            os.environ.pop(MULTIPROC_ENV, None)


def run_worker(settings: WorkerSettings) -> None:
    from worker.main import WorkerStartError, serve

    check_redis(settings)
    try:
        asyncio.run(serve(settings))
    except WorkerStartError as exc:
        raise StartupError(str(exc)) from exc


def run_jobs(settings: JobsSettings) -> None:
    """The background jobs role: batch runs and housekeeping (arq), until SIGTERM or SIGINT."""
    from gateway.background import serve

    check_redis(settings)
    asyncio.run(serve(settings))
