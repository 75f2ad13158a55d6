"""Start one gateway, one worker or the background role in this process, with start-up problems
reported as one line.

A gateway drains before it stops (see :mod:`serving.lifecycle`): the first SIGTERM or Ctrl-C turns
it unready and refuses new requests while those in flight finish; a second one stops it at once.
With ``--processes N`` this process supervises N gateway processes that share the port through
``SO_REUSEPORT`` (the kernel spreads connections over them), each draining on its own, and starts
again any that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from control.children import Child, Children, CrashLoop
from control.processes import StartupError, check_port_free
from shared.settings import BackgroundSettings, GatewaySettings, RedisSettings, WorkerSettings, redact_url

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from serving.lifecycle import Lifecycle

log = logging.getLogger(__name__)


def check_redis(settings: RedisSettings, timeout: float = 3.0) -> None:
    import redis
    from redis.exceptions import RedisError

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        raise StartupError(f"cannot reach Redis at {redact_url(settings.redis_url)}: {exc}") from exc
    finally:
        client.close()


YOUNG_COLLECTION = 20_000
"""Allocations (net of frees) between two collections of the youngest generation; Python's default
is 700. A request's objects are freed by reference counting as it ends, so a collection finds
almost nothing (none in a profiled run of 4,000 requests): at 700 the gateway collected ~100 times
a second and spent 6% of its CPU in collections that freed nothing, and each one promoted the live
requests' objects to older generations that full collections walk again. At 20,000 a request's
objects are mostly gone before a collection sees them (gateway CPU per request -12% at 16-token
answers, loadtest/results/2026-12-07-fair-lean/gateway.md, lever 10)."""


def collect_rarely() -> None:
    """Garbage collection sized for a server's heap: see :data:`YOUNG_COLLECTION`. The long-lived
    heap (imports, the model's tokenizer, the engine) is frozen where it is loaded."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION, older, oldest)


def run_gateway(settings: GatewaySettings, shared_port: bool = False) -> None:
    """Serve until stopped; ``shared_port``: bind with SO_REUSEPORT beside sibling processes. The
    API listens on ``port``; ``/metrics`` and ``/scaling`` on ``metrics_port`` (if not 0) only."""
    ports = [settings.port, *([settings.metrics_port] if settings.metrics_port else [])]
    if not shared_port:
        for port, flag in zip(ports, ("--port", "--metrics-port"), strict=False):
            check_port_free(settings.host, port, flag)
    check_redis(settings)
    if settings.processes > 1:
        _supervise_gateways(settings)
        return
    collect_rarely()
    from gateway.app import create_app
    from gateway.internal import ByPort

    app = create_app(settings)
    served = ByPort(app, app.state.internal, settings.metrics_port) if settings.metrics_port else app
    config = server_config(served, settings, timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(config, app.state.lifecycle)
    server.run(sockets=[listen(settings.host, port, reuse_port=shared_port) for port in ports])


def server_config(app: ASGIApp, settings: GatewaySettings, **more: Any) -> uvicorn.Config:
    """How a gateway process serves an app: uvicorn (httptools, uvloop), no access log, the
    gateway's connection protocol; ``more``: further ``uvicorn.Config`` options. The ``floor``
    study serves its app this way too, so that it measures the gateway's own stack."""
    from gateway.connections import connection_protocol

    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        http=connection_protocol(settings.header_timeout, settings.max_connections),
        **more,
    )


def listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a stop signal first drains the gateway and only then stops serving."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_asked = False
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_asked or self._loop is None:  # a second signal, or not serving yet: stop now
            self.force_exit = self._stop_asked
            super().handle_exit(sig, frame)
            return
        self._stop_asked = True
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        try:
            await self._lifecycle.drain()
        finally:
            self.should_exit = True


def _supervise_gateways(settings: GatewaySettings) -> None:
    """N gateway processes on one port, started again when one dies, drained together on a signal."""
    from gateway.metrics import MASTER_ENV, MULTIPROC_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    env.update(settings.model_copy(update={"processes": 1}).environment())
    env[MASTER_ENV] = str(os.getpid())
    argv = [sys.executable, "-m", "control.cli", "gateway", "--shared-port"]
    signals: list[int] = []
    previous = {
        s: signal.signal(s, lambda sig, _: signals.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    children = Children()
    with _multiprocess_metrics() as samples:
        env[MULTIPROC_ENV] = samples
        try:
            for i in range(settings.processes):
                children.add(Child(f"gateway-{i + 1}", argv, env))
            while not signals:
                children.check()
                time.sleep(0.5)
        except CrashLoop as exc:
            raise StartupError(str(exc)) from exc
        finally:
            _drain_all(children, settings.shutdown_grace + 10, signals)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _drain_all(children: Children, grace: float, signals: list[int]) -> None:
    """SIGTERM to each process, which drains; a second signal to this one stops them at once."""
    for child in children.all:
        child.retired = True
        child.signal(signal.SIGTERM)
    deadline, hurried = time.monotonic() + grace, False
    while any(c.running() for c in children.all) and time.monotonic() < deadline:
        if len(signals) > 1 and not hurried:
            hurried = True
            for child in children.all:
                child.signal(signal.SIGINT)
        time.sleep(0.2)
    children.stop_all(grace=0)


@contextlib.contextmanager
def _multiprocess_metrics() -> Iterator[str]:
    """A directory where every gateway process writes its metric samples (a private one if unset)."""
    from gateway.metrics import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="switchyard-metrics-") as private:
        yield private


def run_worker(settings: WorkerSettings) -> None:
    from worker.main import WorkerStartError, serve

    check_redis(settings)
    collect_rarely()
    try:
        asyncio.run(serve(settings))
    except WorkerStartError as exc:
        raise StartupError(str(exc)) from exc


def run_background(settings: BackgroundSettings) -> None:
    """The background role: batch runs and housekeeping (arq), until SIGTERM or SIGINT."""
    from batch.role import serve

    check_redis(settings)
    asyncio.run(serve(settings))
