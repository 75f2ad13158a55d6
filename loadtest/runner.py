"""The system a study measures: started as a user starts it, waited for, asked, and stopped.

A server (``switchyard up``, vLLM's own OpenAI server, or any command a study is given) runs in a
session of its own with its output in a log. It is ready once ``GET /v1/models`` lists the model,
or, for ``switchyard up`` (which may serve with no worker yet), once it says it serves. It is stopped
whole, helpers in other sessions included (:func:`proctree.stop_tree`). Load clients that must not
share this process's CPU (``bench``, ``vllmbench``) run through the same entry as the studies.
Simulated fleets, started process by process, are ``simfleet.py``'s.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx

from control.keys import create
from control.processes import free_port, wait_until
from loadtest import proctree
from loadtest.report import compress
from shared.settings import RedisSettings
from shared.tenants import Tenant, new_key

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SWITCHYARD_CMD = (
    "switchyard up --port {port} --model {model_dir} --served-model-name {model_name}"
    " --redis-port {redis_port} {engine_args}"
)
UP_BANNER = "Press Ctrl-C to stop."
"""What ``switchyard up`` prints once the whole system serves."""


class ServerError(RuntimeError):
    """The server did not start, did not become ready, or died."""


@dataclass(frozen=True)
class EngineSettings:
    """The engine configuration both targets must run with; the single source of truth."""

    dtype: str = "float32"
    enforce_eager: bool = True
    max_model_len: int = 2048
    max_num_seqs: int = 256
    kv_cache_gib: int = 2
    executor: str = "uni"
    """Where vLLM runs the model on a CPU host: ``uni`` in the engine core process (what Switchyard's
    workers do there), ``mp`` in a process of its own (vLLM's CPU default, whose shared-memory
    queues spin on both cores of a small host)."""

    def vllm_args(self) -> list[str]:
        """The settings as flags of vLLM's OpenAI server."""
        args = ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]
        args += ["--max-num-seqs", str(self.max_num_seqs)]
        args += ["--distributed-executor-backend", "uni"] if self.executor == "uni" else []
        return args + (["--enforce-eager"] if self.enforce_eager else [])

    def switchyard_args(self) -> list[str]:
        """The settings as flags of ``switchyard up`` (eager mode goes through :meth:`env`)."""
        return [
            *("--dtype", self.dtype, "--max-model-len", str(self.max_model_len)),
            *("--capacity", str(self.max_num_seqs), "--kv-cache-gib", str(self.kv_cache_gib)),
        ]

    def env(self) -> dict[str, str]:
        """Environment for both targets: vLLM's CPU KV-cache size and executor (vLLM takes ``uni`` on
        CPU only with multiprocessing off; Switchyard's workers read the same variable), Switchyard
        workers' eager mode."""
        return {
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if self.executor == "uni" else "1",
            "SWITCHYARD_ENFORCE_EAGER": str(self.enforce_eager).lower(),
        }


@dataclass(frozen=True)
class Target:
    """One server to measure: how to start it and where it will listen."""

    name: str
    argv: list[str]
    env: dict[str, str]
    """Set on top of this process's environment."""
    port: int
    redis_url: str | None = None  # the embedded Redis of a Switchyard target's default command
    isolated: bool = False
    """This process's ``SWITCHYARD_*`` and ``REDIS_URL`` are not passed on: the study decides every
    setting (else a setting in the environment reaches the system, as when a user starts it)."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def cli(role: str, *flags: str) -> list[str]:
    """A ``switchyard`` command of this checkout: ``python -m control.cli ROLE FLAGS``."""
    return [sys.executable, "-m", "control.cli", role, *flags]


def up(name: str, flags: Sequence[str], env: dict[str, str], port: int) -> Target:
    """``switchyard up FLAGS`` (which must listen on ``port``), every setting the study's."""
    return Target(name, cli("up", *flags), env, port, isolated=True)


def switchyard_target(
    cmd: str, engine: EngineSettings, model_dir: Path, model_name: str, api_key: str | None
) -> Target:
    """Switchyard started by the command template ``cmd`` (see compare's ``--switchyard-cmd``) on
    free ports."""
    port, redis_port = free_port(), free_port()
    fields = asdict(engine) | {
        "port": port, "redis_port": redis_port, "model_dir": model_dir, "model_name": model_name,
        "api_key": api_key or "", "engine_args": shlex.join(engine.switchyard_args()),
        "vllm_engine_args": shlex.join(engine.vllm_args()),
    }  # fmt: skip
    argv = shlex.split(cmd.format(**fields))
    # switchyard up registers this key for its development tenant instead of making one.
    env = engine.env() | {"SWITCHYARD_DEV_KEY": api_key or ""}
    return Target("switchyard", argv, env, port, redis_url=f"redis://127.0.0.1:{redis_port}/0")


def spawn(
    argv: Sequence[str], env: dict[str, str], log: Path, isolated: bool = False
) -> subprocess.Popen[bytes]:
    """``argv`` in a session of its own, from this checkout, output to ``log``; the virtualenv's
    commands first on PATH, ``env`` over this process's environment (see :attr:`Target.isolated`)."""
    full = dict(os.environ)
    if isolated:
        full = {k: v for k, v in full.items() if not k.startswith("SWITCHYARD_") and k != "REDIS_URL"}
    full |= env
    full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full.get('PATH', '')}"
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full.get("PYTHONPATH", "")) if p)
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env=full, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def start(target: Target, log: Path) -> subprocess.Popen[bytes]:
    return spawn(target.argv, target.env, log, target.isolated)


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(
    proc: subprocess.Popen[bytes], target: Target, model: str, api_key: str | None, timeout: float, log: Path
) -> float:
    """Poll ``GET /v1/models`` until it lists ``model``; returns seconds waited."""
    begun = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = "no answer yet"

    with httpx.Client(timeout=5.0, trust_env=False, headers=headers) as client:

        def lists_model() -> bool:
            nonlocal last
            try:
                resp = client.get(f"{target.base_url}/models")
                ids = [m.get("id") for m in resp.json().get("data", [])] if resp.status_code == 200 else []
                last = f"HTTP {resp.status_code}, models {ids}"
                return model in ids
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                return False

        if wait_until(lists_model, timeout, interval=1.0, watch=lambda: exited(proc, target, log)):
            return time.monotonic() - begun
    raise ServerError(f"{target.name} not ready after {timeout:.0f} s ({last}):\n{log_tail(log)}")


def wait_serving(proc: subprocess.Popen[bytes], target: Target, log: Path, timeout: float = 600.0) -> float:
    """Wait until ``switchyard up`` says the whole system serves; returns seconds waited."""
    begun = time.monotonic()

    def says_so() -> bool:
        return UP_BANNER in log.read_text(errors="replace")

    if wait_until(says_so, timeout, interval=1.0, watch=lambda: exited(proc, target, log)):
        return time.monotonic() - begun
    raise ServerError(f"{target.name} not serving after {timeout:.0f} s:\n{log_tail(log)}")


def exited(proc: subprocess.Popen[bytes], target: Target, log: Path) -> None:
    """Raise :class:`ServerError`, with the log's tail, if the server has exited."""
    if proc.poll() is not None:
        raise ServerError(f"{target.name} exited with {proc.returncode}:\n{log_tail(log)}")


def stop(name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Stop a server and everything it started, say how it ended, and compress its log."""
    print(f"{name} stopped by {proctree.stop_tree(proc)}", flush=True)
    compress(log)


@contextlib.contextmanager
def running(target: Target, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The server started for the block (not yet ready: see :func:`wait_ready`), always stopped."""
    proc = start(target, log)
    try:
        yield proc
    finally:
        stop(target.name, proc, log)


@contextlib.contextmanager
def serving(target: Target, log: Path, timeout: float = 600.0) -> Iterator[subprocess.Popen[bytes]]:
    """``switchyard up`` for the block, from the moment it says it serves; always stopped."""
    with running(target, log) as proc:
        wait_serving(proc, target, log, timeout)
        yield proc


@dataclass(frozen=True)
class System:
    """A ``switchyard up`` started by :func:`switchyard_system`."""

    target: Target
    proc: subprocess.Popen[bytes]
    redis_url: str


@contextlib.contextmanager
def switchyard_system(
    model_dir: Path, model_name: str, capacity: int, workers: int, log: Path, ready_timeout: float,
    env: dict[str, str] | None = None,
) -> Iterator[System]:  # fmt: skip
    """``switchyard up`` as compare starts it (embedded Redis, a gateway, ``workers`` workers on the
    model, compare's engine settings with ``capacity`` jobs a worker; ``env`` added), ready, for the
    block."""
    ready_key = new_key()[1]  # the dev tenant's, only to poll readiness
    cmd = DEFAULT_SWITCHYARD_CMD + f" --workers {workers}"
    target = switchyard_target(cmd, EngineSettings(max_num_seqs=capacity), model_dir, model_name, ready_key)
    target = replace(target, env=target.env | (env or {}))
    assert target.redis_url is not None  # the default command runs an embedded Redis
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting: {' '.join(target.argv)} (log: {log})", flush=True)
    with running(target, log) as proc:
        ready = wait_ready(proc, target, model_name, ready_key, ready_timeout, log)
        print(f"ready after {ready:.0f} s", flush=True)
        yield System(target, proc, target.redis_url)


def resolve_model(model_dir: Path | None, model_name: str | None) -> tuple[Path, str]:
    """``model_dir`` as given, or the demo model (built on first use), and the name to serve it as
    (``model_name``, or the directory's or the demo's)."""
    if model_dir is not None:
        return Path(model_dir).resolve(), model_name or model_dir.name
    from worker.demo_model import DEMO_MODEL_NAME, ensure_demo_model

    return Path(ensure_demo_model()), model_name or DEMO_MODEL_NAME


def add_tenants(settings: RedisSettings, *tenants: Tenant) -> list[str]:
    """Create (or update) each tenant in the system's Redis and return a new API key for each."""
    return [create(settings, tenant) for tenant in tenants]


def first_model(base_url: str, key: str) -> str:
    """The first model a running system lists."""
    headers = {"Authorization": f"Bearer {key}"}
    resp = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=10, trust_env=False)
    resp.raise_for_status()
    models = [m["id"] for m in resp.json().get("data", [])]
    if not models:
        raise RuntimeError(f"{base_url} serves no model yet")
    return str(models[0])


def client(
    study: str, flags: Sequence[str], quiet: bool = False, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m loadtest STUDY FLAGS`` (a load client: bench or vllmbench) as a process of its own,
    so that its CPU is its own; ``quiet`` keeps its output (in the result) off the terminal."""
    argv = [sys.executable, "-m", "loadtest", study, *flags]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=quiet, text=True, timeout=timeout, check=False)


def roles(root: int) -> dict[str, list[int]]:
    """The processes of a ``switchyard up`` tree by role: gateway (its processes), worker, redis."""
    found: dict[str, list[int]] = {"gateway": [], "worker": [], "redis": []}
    for pid in sorted(proctree.descendants(root, proctree.read_process_table()) - {root}):
        line = proctree.command_line(pid)
        if "redis-server" in line:
            found["redis"].append(pid)
        elif "control.cli gateway" in line:
            found["gateway"].append(pid)
        elif "control.cli worker" in line:
            found["worker"].append(pid)
    return found


def scrape(url: str, timeout: float = 5.0) -> str:
    """The text of a Prometheus endpoint."""
    return httpx.get(url, timeout=timeout, trust_env=False).text


def counter(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (its ``_total`` series) whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, f"{name}_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total
