"""``switchyard up``: Redis (embedded unless given), one gateway and N workers as child processes.

Children run in their own sessions so that Ctrl-C reaches only the supervisor, which then stops
them in order (gateway and workers get SIGTERM and a grace period, then SIGKILL of their whole
process group, vLLM's engine process included) and finally the embedded Redis.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from control.affinity import engine_compute_cpus, keep_off
from control.keys import dev_key_file, ensure_dev_key
from control.monitoring import Monitoring
from control.processes import StartupError, answers_ok, check_port_free, free_port, stop_process, wait_until
from control.redis_server import EmbeddedRedis, RedisUnavailable
from control.serve import check_redis
from shared.settings import GatewaySettings, WorkerSettings
from worker.main import DEMO_KV_CACHE_GIB, WorkerStartError, resolve_model

READY_TIMEOUT = 600.0


STOP_GRACE = 15.0
WORKER_METRICS_PORT = 9101
"""Worker i (from 0) serves /metrics on this port + i, or on a free port when that one is taken."""


class Supervisor:
    def __init__(
        self,
        gateway: GatewaySettings,
        worker: WorkerSettings,
        workers: int,
        redis_port: int | None,
        monitoring: Monitoring | None = None,
    ) -> None:
        self.gateway = gateway
        self.worker = worker
        self.workers = workers
        self.redis_port = redis_port
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.redis: EmbeddedRedis | None = None
        self.metrics_ports: list[int] = []
        self.monitoring = monitoring or Monitoring(None)
        self._stop_requested = False
        self.dev_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.gateway.host}:{self.gateway.port}"

    def run(self) -> None:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start()
            self._announce()
            self._watch()
        finally:
            self._stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_requested:  # a second Ctrl-C: no more waiting
            for _, proc in self.children:
                _killpg(proc, signal.SIGKILL)
        self._stop_requested = True

    def _start(self) -> None:
        self.monitoring.check()
        check_port_free(self.gateway.host, self.gateway.port)
        if self.redis_port is not None:
            try:
                self.redis = EmbeddedRedis(self.redis_port).start()
            except RedisUnavailable as exc:
                raise StartupError(f"{exc} (use --redis-url to use that server, or --redis-port)") from exc
            url = self.redis.url
            self.gateway = self.gateway.model_copy(update={"redis_url": url})
            self.worker = self.worker.model_copy(update={"redis_url": url})
        else:
            check_redis(self.gateway)
        self.worker = self._resolve_demo(self.worker)
        if self.gateway.auth:
            self.dev_key = ensure_dev_key(self.gateway)
        base = self.worker.metrics_port or WORKER_METRICS_PORT
        for i in range(self.workers):
            port = metrics_port(base + i, taken=self.metrics_ports)
            self.metrics_ports.append(port)
            env = {**self.worker.environment(), "SWITCHYARD_METRICS_PORT": str(port)}
            self._spawn(f"worker-{i + 1}", "worker", env)
        self._spawn("gateway", "gateway", self.gateway.environment())
        self._wait_ready()
        self._keep_off_engine_cores()
        self.monitoring.start(self.gateway.host, self.gateway.port, self.metrics_ports)

    def _keep_off_engine_cores(self) -> None:
        """On CPU hosts, move the gateway and Redis off the cores vLLM computes on."""
        engine: set[int] = set()
        for name, proc in self.children:
            if name.startswith("worker"):
                engine |= engine_compute_cpus(proc.pid)
        others = [
            pid
            for name, proc in self.children
            if not name.startswith("worker")
            for pid in _with_children(proc.pid)  # a gateway with --processes N serves from children
        ]
        if self.redis and self.redis.process:
            others.append(self.redis.process.pid)
        keep_off(others, engine)

    @staticmethod
    def _resolve_demo(worker: WorkerSettings) -> WorkerSettings:
        """Build the demo model once here, not once per worker."""
        try:
            path, served = resolve_model(worker.model, worker.served_model_name)
        except WorkerStartError as exc:
            raise StartupError(str(exc)) from exc
        update: dict[str, object] = {"model": path, "served_model_name": served}
        if worker.model == "demo" and worker.kv_cache_gib is None:
            update["kv_cache_gib"] = DEMO_KV_CACHE_GIB
        return worker.model_copy(update=update)

    def _spawn(self, name: str, role: str, env: dict[str, str]) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
        full_env.update(env)
        proc = subprocess.Popen(
            [sys.executable, "-m", "control.cli", role],
            env=full_env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        self.children.append((name, proc))

    def _wait_ready(self) -> None:
        print(
            f"switchyard: starting {self.workers} worker(s) and the gateway (first start builds the "
            "demo model and loads the engine; this takes a minute)...",
            flush=True,
        )

        def watch() -> None:
            self._check_children()
            if self._stop_requested:
                raise StartupError("interrupted before the system was ready")

        # Not listening yet, or 503 until a worker is live: both mean "keep waiting".
        if wait_until(lambda: answers_ok(f"{self.base_url}/readyz", timeout=2), READY_TIMEOUT, 0.5, watch):
            return
        raise StartupError(f"the system was not ready after {READY_TIMEOUT:.0f}s")

    def _check_children(self) -> None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                raise StartupError(f"{name} exited with status {code}; see its message above")

    def _announce(self) -> None:
        model = self.worker.served_model_name or self.worker.model
        redis = self.redis.url if self.redis else self.gateway.redis_url
        key = self.dev_key or "none"
        auth = (
            f"API key (tenant 'dev', kept in {dev_key_file()}):\n  {key}\n"
            if self.dev_key
            else "Authentication is off.\n"
        )
        workers = "\n".join(
            f"  worker-{i + 1}: http://127.0.0.1:{port}/metrics" for i, port in enumerate(self.metrics_ports)
        )
        print(
            f"""
Switchyard is serving {model} at {self.base_url}/v1   (Redis: {redis})
{auth}

Metrics (Prometheus):
  gateway:  {self.base_url}/metrics
{workers}
{self.monitoring.describe()}Queues and workers: switchyard status --watch 2

  curl {self.base_url}/v1/chat/completions -H 'content-type: application/json' \\
       -H 'authorization: Bearer {key}' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  python -c "from openai import OpenAI; \\
c = OpenAI(base_url='{self.base_url}/v1', api_key='{key}'); \\
r = c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi'}}]); \\
print(r.choices[0].message.content)"

Press Ctrl-C to stop.
""",
            flush=True,
        )

    def _watch(self) -> None:
        while not self._stop_requested:
            self._check_children()
            time.sleep(0.5)

    def _stop(self) -> None:
        self.monitoring.stop()
        for _, proc in self.children:
            _killpg(proc, signal.SIGTERM)
        for _, proc in self.children:  # the whole group: vLLM's engine process too
            stop_process(proc, STOP_GRACE, group=True)
        if self.redis is not None:
            self.redis.stop()


def metrics_port(wanted: int, taken: list[int]) -> int:
    """``wanted`` if nothing listens there, else a free port."""
    if wanted not in taken:
        with contextlib.suppress(StartupError):  # taken by something else: any free port will do
            check_port_free("0.0.0.0", wanted)
            return wanted
    port = free_port()
    while port in taken:
        port = free_port()
    return port


def _with_children(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:  # exited meanwhile: nothing left to move
        return [pid]


def _killpg(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
