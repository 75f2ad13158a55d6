"""A fleet of simulated workers as real processes on free ports: for scale and fairness benchmarks.

One embedded ``redis-server``, one gateway and N workers running the simulated engine
(``switchyard worker --engine sim``), each started as ``switchyard gateway`` / ``switchyard worker``
would be in production, in a session of its own, with its output in a log file. Started by this
module rather than by ``switchyard up`` so that a benchmark knows every process's pid (its CPU time
is read per role) and every worker's metrics port and consumer name (jobs are counted per worker).

Nothing here is timing-sensitive: the fleet is ready once the gateway answers ``/readyz`` and every
worker's heartbeat is in Redis.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from redis.asyncio import Redis

from control.processes import answers_ok, free_port, stop_process, wait_until
from control.redis_server import EmbeddedRedis
from loadtest import runner
from loadtest.report import compress
from shared.fleet import live_workers
from shared.names import Names
from shared.settings import RedisSettings
from shared.tenants import Priority, Tenant


class FleetError(RuntimeError):
    """The fleet did not start (a process died or never became ready)."""


@dataclass(frozen=True)
class FleetSpec:
    """What to start: N simulated workers of one capacity, and their engine's preset and speed."""

    workers: int
    capacity: int
    preset: str = "l4"
    speed: float = 1.0
    model: str = "demo"
    """The model whose tokenizer the simulated engine uses (``demo``: the offline demo model's)."""
    served_name: str = "switchyard-demo"
    worker_env: dict[str, str] = field(default_factory=dict)
    """Extra ``SWITCHYARD_*`` settings for every worker (e.g. the headroom window)."""
    gateway_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Proc:
    """One started process: its role, pid and log; a worker's consumer name and metrics URL too."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    worker_id: str | None = None
    metrics_url: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid


class SimFleet:
    """Redis, a gateway and N simulated workers; a context manager that always stops them all."""

    def __init__(self, spec: FleetSpec, logs: Path) -> None:
        self.spec = spec
        self.logs = logs
        self.names = Names()
        self.redis = EmbeddedRedis()
        self.port = free_port()
        self.metrics_port = free_port()
        self.gateway: Proc | None = None
        self.workers: list[Proc] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def settings(self) -> RedisSettings:
        """Where the fleet's processes find Redis and their names in it."""
        return RedisSettings(redis_url=self.redis_url, key_prefix=self.names.prefix)

    def processes(self) -> dict[str, int]:
        """Role name -> pid of every process the fleet runs (Redis, gateway, worker-1..N)."""
        pids = {"redis": self.redis.process.pid} if self.redis.process else {}
        return pids | {p.name: p.pid for p in [*([self.gateway] if self.gateway else []), *self.workers]}

    def __enter__(self) -> SimFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        for index in range(1, self.spec.workers + 1):
            self.workers.append(self._start_worker(index))
        gateway_env = {
            "SWITCHYARD_PORT": str(self.port),
            "SWITCHYARD_METRICS_PORT": str(self.metrics_port),
            **self.spec.gateway_env,
        }
        self.gateway = self._spawn("gateway", "gateway", gateway_env)
        everyone = [self.gateway, *self.workers]

        def watch() -> None:
            for proc in everyone:
                if proc.popen.poll() is not None:
                    tail = proc.log.read_text(errors="replace")[-2000:]
                    raise FleetError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail}")

        def ready() -> bool:
            if not answers_ok(f"{self.base_url}/readyz", timeout=2):
                return False
            return asyncio.run(self._live()) >= self.spec.workers

        if not wait_until(ready, timeout, interval=0.5, watch=watch):
            raise FleetError(f"the fleet was not ready after {timeout:.0f} s (logs in {self.logs})")

    def _start_worker(self, index: int) -> Proc:
        port = free_port()
        worker_id = f"sim-worker-{index}-{os.getpid()}"
        env = {
            "SWITCHYARD_ENGINE": "sim",
            "SWITCHYARD_SIM_PRESET": self.spec.preset,
            "SWITCHYARD_SIM_SPEED": str(self.spec.speed),
            "SWITCHYARD_CAPACITY": str(self.spec.capacity),
            "SWITCHYARD_MODEL": self.spec.model,
            "SWITCHYARD_SERVED_MODEL_NAME": self.spec.served_name,
            "SWITCHYARD_METRICS_PORT": str(port),
            "SWITCHYARD_WORKER_ID": worker_id,
            **self.spec.worker_env,
        }
        proc = self._spawn(f"worker-{index}", "worker", env)
        proc.worker_id, proc.metrics_url = worker_id, f"http://127.0.0.1:{port}/metrics"
        return proc

    def _spawn(self, name: str, role: str, env: dict[str, str]) -> Proc:
        log = self.logs / f"{name}.log"
        popen = runner.spawn(runner.cli(role), {"REDIS_URL": self.redis_url, **env}, log, isolated=True)
        return Proc(name, popen, log)

    async def _live(self) -> int:
        redis = Redis.from_url(self.redis_url)
        try:
            return len(await live_workers(redis, self.names, ttl=10))
        finally:
            await redis.aclose()

    def add_tenant(self, name: str, priority: Priority = "interactive") -> str:
        """Create a tenant with no limits and return a new API key for it."""
        return runner.add_tenants(self.settings, Tenant(name=name, priority=priority))[0]

    def stop(self) -> None:
        """Gateway first (its clients are gone by now), then the workers, then Redis."""
        for proc in [*([self.gateway] if self.gateway else []), *self.workers]:
            stop_process(proc.popen, grace=15, group=True)
            compress(proc.log)
        self.gateway, self.workers = None, []
        self.redis.stop()
