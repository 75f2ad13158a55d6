"""``switchyard up``: Redis (embedded unless given), a gateway, workers and the background role
process (batches, housekeeping), supervised.

The one-machine form is as sturdy as the production one. A child that dies is started again with
backoff while the others keep serving (a dead worker's jobs are taken over by the other workers, as
anywhere); one that keeps dying soon after each start is a crash loop, which stops everything with
one message. With ``--autoscale MIN:MAX`` workers are started and retired by the scaling decision
(:mod:`scaling.decision`, through :mod:`scaling.local`).

Children run in sessions of their own so that Ctrl-C reaches only the supervisor, which then stops
them in order: gateway and workers drain (SIGTERM, then their grace periods), then the embedded
Redis. A second Ctrl-C kills everything at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from types import FrameType

import psutil

from control.affinity import engine_compute_cpus, keep_off
from control.children import Child, Children, CrashLoop
from control.keys import dev_key_file, ensure_dev_key
from control.monitoring import Monitoring
from control.processes import StartupError, answers_ok, check_port_free, free_port, wait_until
from control.redis_server import EmbeddedRedis
from control.serve import check_redis
from scaling.local import LocalAutoscaler
from shared.settings import GatewaySettings, WorkerSettings, redact_url
from worker.main import DEMO_KV_CACHE_GIB, DEMO_MODELS, WorkerStartError, resolve_model
from worker.vllm_engine import cpu_build, cpu_kv_cache_bytes, model_threads, usable_cpus, weight_bytes

log = logging.getLogger(__name__)

READY_TIMEOUT = 600.0
METRICS_PORT = 9100
"""The gateway serves /metrics and /scaling on this port, and worker i (from 1) its metrics on this
port + i; each on a free port instead when its own is taken."""
TICK = 0.5
BACKGROUND_DRAIN = 5.0


@dataclass(frozen=True, slots=True)
class Autoscale:
    min_workers: int
    max_workers: int

    @classmethod
    def parse(cls, text: str) -> Autoscale:
        low, sep, high = text.partition(":")
        if not sep or not low.isdigit() or not high.isdigit() or int(high) < max(1, int(low)):
            raise StartupError(f"--autoscale wants MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, not {text!r}")
        return cls(int(low), int(high))


class Supervisor:
    def __init__(
        self,
        gateway: GatewaySettings,
        worker: WorkerSettings,
        workers: int,
        redis_port: int | None,
        monitoring: Monitoring | None = None,
        autoscale: Autoscale | None = None,
    ) -> None:
        self.gateway = gateway
        self.worker = worker
        self.workers = workers if autoscale is None else max(1, autoscale.min_workers)
        self.autoscale = autoscale
        self.redis_port = redis_port
        self.redis: EmbeddedRedis | None = None
        self.children = Children()
        self.metrics_ports: list[int] = []
        """Each worker's metrics port (the gateway's is its settings' metrics_port)."""
        self._metrics_base = gateway.metrics_port or METRICS_PORT
        self.monitoring = monitoring or Monitoring(None)
        self.dev_key: str | None = None
        self._signals: list[int] = []
        self._worker_index = 0
        self._redis_starts = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.gateway.host}:{self.gateway.port}"

    @property
    def internal_url(self) -> str:
        """Where the gateway serves /metrics and /scaling."""
        return f"http://{self.gateway.host}:{self.gateway.metrics_port}"

    def run(self) -> None:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start()
            self._announce()
            asyncio.run(self._watch())
        except CrashLoop as exc:
            raise StartupError(str(exc)) from exc
        finally:
            self._stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signals:  # a second Ctrl-C: no more waiting
            for child in self.children.all:
                child.reap()
        self._signals.append(signum)

    # -- starting ----------------------------------------------------------------------------------

    def _start(self) -> None:
        self.monitoring.check()
        check_port_free(self.gateway.host, self.gateway.port)
        if self.redis_port is not None:
            self._start_redis(self.redis_port)
        else:
            check_redis(self.gateway)
        self.worker = self._resolve_model(self.worker)
        gateway_metrics = metrics_port(self._metrics_base, [self.gateway.port])
        self.gateway = self.gateway.model_copy(update={"metrics_port": gateway_metrics})
        if self.gateway.auth:
            self.dev_key = ensure_dev_key(self.gateway)
        for _ in range(self.workers):
            self.add_worker()
        if self.autoscale is not None:
            bounds = {
                "scale_min_workers": self.autoscale.min_workers,
                "scale_max_workers": self.autoscale.max_workers,
            }
            zero = {"scale_from_zero": True} if self.autoscale.min_workers == 0 else {}
            self.gateway = self.gateway.model_copy(update={**bounds, **zero})
        self.children.add(Child("gateway", self._argv("gateway"), self._env(self.gateway.environment())))
        # Batches and housekeeping (arq), beside the gateway it shares settings and files with; on a
        # stop it gives its queued lines a few seconds, not production's half minute.
        background = {
            **self.gateway.environment(),
            "SWITCHYARD_BACKGROUND_DRAIN_TIMEOUT": str(BACKGROUND_DRAIN),
        }
        self.children.add(Child("background", self._argv("background"), self._env(background)))
        self._wait_ready()
        self._keep_off_engine_cores()
        self.monitoring.start(self.gateway.host, self.gateway.metrics_port, self.metrics_ports)

    def _start_redis(self, port: int) -> None:
        # An append-only file, so that a Redis that crashed is started again with its data.
        self.redis = EmbeddedRedis(port, durable=True)
        if self.redis.answers():
            raise StartupError(
                f"port {port} is already taken by another server (use --redis-url to use that server, "
                "or --redis-port)"
            )
        self.children.add(Child("redis", self.redis.command(), dict(os.environ)))
        redis = self.redis
        child = self.children.named("redis")
        assert child is not None

        def exited() -> None:
            if not child.running():
                raise StartupError(
                    f"redis-server exited at start with status {child.proc and child.proc.returncode}"
                )

        if not wait_until(redis.answers, 10, interval=0.05, watch=exited):
            raise StartupError(f"redis-server did not answer on port {port} in 10s")
        url = redis.url
        self.gateway = self.gateway.model_copy(update={"redis_url": url})
        self.worker = self.worker.model_copy(update={"redis_url": url})

    def _worker_children(self) -> list[Child]:
        return [c for c in self.children.all if c.name.startswith("worker") and not c.retired]

    def worker_ids(self) -> list[str]:
        """The ids of the workers started and not retired (:class:`scaling.local.WorkerPool`)."""
        return [c.env.get("SWITCHYARD_WORKER_ID", "") for c in self._worker_children()]

    def retire(self, worker_id: str) -> None:
        """Drain one worker and let it go: it is not started again when it exits."""
        for child in self._worker_children():
            if child.env.get("SWITCHYARD_WORKER_ID", "") == worker_id:
                child.retired = True
                child.signal(signal.SIGTERM)  # it drains: no new jobs, running ones finish or go back

    def add_worker(self) -> Child:
        """Start one more worker (its metrics on the next port)."""
        self._worker_index += 1
        name = f"worker-{self._worker_index}"
        taken = [self.gateway.port, self.gateway.metrics_port, *self.metrics_ports]
        port = metrics_port(self._metrics_base + self._worker_index, taken)
        self.metrics_ports.append(port)
        env = self._env({**self.worker.environment(), "SWITCHYARD_METRICS_PORT": str(port)})
        if self._share_cpus:  # workers on one CPU host split its cores instead of each taking all
            env["OMP_NUM_THREADS"] = str(model_threads(usable_cpus(), self._most_workers()))

        def fresh_id(child: Child) -> None:
            # A new consumer name at each start: the jobs of the worker that died stay its own until
            # another worker takes them over, and this one starts clean.
            child.env["SWITCHYARD_WORKER_ID"] = f"{socket.gethostname()}-{child.name}-{secrets.token_hex(3)}"

        return self.children.add(Child(name, self._argv("worker"), env, before_start=fresh_id))

    def _most_workers(self) -> int:
        return self.autoscale.max_workers if self.autoscale else self.workers

    @property
    def _share_cpus(self) -> bool:
        """A CPU host's workers that run the model in process and were given no thread count."""
        return (
            self.worker.engine == "vllm"
            and cpu_build()
            and "OMP_NUM_THREADS" not in os.environ
            and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0"
        )

    def _argv(self, role: str) -> list[str]:
        return [sys.executable, "-m", "control.cli", role]

    @staticmethod
    def _env(settings: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
        env.update(settings)
        return env

    def _resolve_model(self, worker: WorkerSettings) -> WorkerSettings:
        """Build the demo model once here, not once per worker; size a CPU host's KV cache for all the
        workers that may run at once (each would otherwise take half of the free memory)."""
        try:
            path, served = resolve_model(worker.model, worker.served_model_name)
        except WorkerStartError as exc:
            raise StartupError(str(exc)) from exc
        update: dict[str, object] = {"model": path, "served_model_name": served}
        if worker.kv_cache_gib is None:
            if worker.model in DEMO_MODELS:
                update["kv_cache_gib"] = DEMO_KV_CACHE_GIB
            elif cpu_build() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                most = self._most_workers()
                size = cpu_kv_cache_bytes(psutil.virtual_memory().available, weight_bytes(path) * most)
                update["kv_cache_gib"] = round(size / most / 2**30, 2)
        return worker.model_copy(update=update)

    def _wait_ready(self) -> None:
        print(
            f"switchyard: starting {self.workers} worker(s) and the gateway (first start builds the "
            "demo model and loads the engine; this takes a minute)...",
            flush=True,
        )

        def watch() -> None:
            if self._signals:  # first: a second Ctrl-C kills the children, which is no failure of theirs
                raise StartupError("interrupted before the system was ready")
            # Before the system ever served, a child that dies is a start-up error, not a restart.
            for child in self.children.all:
                if not child.running():
                    status = child.proc.returncode if child.proc else None
                    raise StartupError(f"{child.name} exited with status {status}; see its message above")

        # Not listening yet, or 503 until a worker is live and warm: both mean "keep waiting".
        if not wait_until(
            lambda: answers_ok(f"{self.base_url}/readyz", timeout=2), READY_TIMEOUT, 0.5, watch
        ):
            raise StartupError(f"the system was not ready after {READY_TIMEOUT:.0f}s")

    def _keep_off_engine_cores(self) -> None:
        """On CPU hosts, move the gateway and Redis off the cores vLLM computes on."""
        engine: set[int] = set()
        others: list[int] = []
        for child in self.children.all:
            if child.pid is None:
                continue
            if child.name.startswith("worker"):
                engine |= engine_compute_cpus(child.pid)
            else:
                others += _with_children(child.pid)  # a gateway with --processes N serves from children
        keep_off(others, engine)

    def _announce(self) -> None:
        model = self.worker.served_model_name or self.worker.model
        redis = redact_url(self.redis.url if self.redis else self.gateway.redis_url)
        key = self.dev_key or "none"
        auth = (
            f"API key (tenant 'dev', kept in {dev_key_file()}):\n  {key}\n"
            if self.dev_key
            else "Authentication is off.\n"
        )
        workers = "\n".join(
            f"  worker-{i + 1}: http://127.0.0.1:{port}/metrics" for i, port in enumerate(self.metrics_ports)
        )
        scaling = (
            f"Workers: {self.autoscale.min_workers} to {self.autoscale.max_workers}, by demand "
            f"(now {self.workers}; see {self.internal_url}/scaling)\n"
            if self.autoscale
            else ""
        )
        print(
            f"""
Switchyard is serving {model} at {self.base_url}/v1   (Redis: {redis})
{auth}{scaling}
Metrics (Prometheus):
  gateway:  {self.internal_url}/metrics
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

    # -- running -----------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Start dead children again (and re-register the dev key when Redis came back), and scale."""
        scaler = LocalAutoscaler(self, self.gateway, self.worker) if self.autoscale else None
        try:
            next_scale = 0.0
            while not self._signals:
                self.children.check()
                await self._after_redis_restart()
                if scaler is not None and time.monotonic() >= next_scale:
                    await scaler.tick()
                    next_scale = time.monotonic() + scaler.period
                await asyncio.sleep(TICK)
        finally:
            if scaler is not None:
                await scaler.close()

    async def _after_redis_restart(self) -> None:
        """Keys survive in the append-only file; the dev key is registered again all the same."""
        child = self.children.named("redis")
        if child is None or self.redis is None or child.restarts == self._redis_starts:
            return
        if not self.redis.answers():
            return  # not up yet: next tick
        self._redis_starts = child.restarts
        if self.dev_key is not None:
            with contextlib.suppress(StartupError):
                await asyncio.to_thread(ensure_dev_key, self.gateway)

    # -- stopping ----------------------------------------------------------------------------------

    def _stop(self) -> None:
        self.monitoring.stop()
        served = [c for c in self.children.all if c.name != "redis"]
        redis = [c for c in self.children.all if c.name == "redis"]
        hurry = len(self._signals) > 1
        self.children.all = served
        self.children.stop_all(
            0 if hurry else max(self.gateway.shutdown_grace, self.worker.drain_timeout) + 15
        )
        self.children.all = redis
        self.children.stop_all(5)
        if self.redis is not None:
            self.redis.remove_data()
        summary = ", ".join(f"{c.name} {c.restarts}" for c in served + redis if c.restarts)
        if summary:
            print(f"switchyard: restarts while serving: {summary}", flush=True)


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
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:  # exited meanwhile: nothing left to move
        return [pid]
