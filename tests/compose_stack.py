"""compose.yaml run for real: podman-compose brings a project up, podman reaches its containers.

Every project has a name of its own (containers, network and volumes carry it) and its own
published ports, so a test's stack never meets a user's ``switchyard`` project.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"


def podman_compose() -> str | None:
    """podman-compose from this environment (the dev extra installs it), else from PATH."""
    beside = Path(sys.executable).with_name("podman-compose")
    return str(beside) if beside.exists() else shutil.which("podman-compose")


def containers_conf(path: Path) -> Path:
    """A containers.conf for hosts like ours: runc (crun fails on hybrid cgroups), cgroupfs (no
    systemd), and ulimits within the host's own (podman's defaults exceed them, and then no container
    starts). podman reads it through CONTAINERS_CONF."""
    nofile, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    path.write_text(
        "[containers]\n"
        # nproc counts every thread of the user on the host, root's included: 4096 leaves room.
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        "[network]\n"
        'network_backend = "netavark"\n'
    )
    return path


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    service: str
    state: str
    pid: int
    restarts: int
    exit_code: int


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    log: Path
    gateway_port: int
    prometheus_port: int
    started_at: float = 0.0
    """When ``up`` was asked for (monotonic clock)."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def run(self, argv: list[str], timeout: float = 600, check: bool = True) -> str:
        """Run a command with the stack's environment; its output goes to the stack's log too."""
        done = subprocess.run(
            argv, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        with self.log.open("a") as out:
            shown = done.stdout if len(done.stdout) < 4000 else f"[{len(done.stdout)} characters]\n"
            out.write(f"$ {' '.join(argv)}\n{shown}{done.stderr}(exit {done.returncode})\n")
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done.stdout

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        tool = podman_compose()
        assert tool is not None
        argv = [tool, "-f", str(COMPOSE), "-p", self.project, "--profile", "monitoring", *args]
        return self.run(argv, timeout=timeout, check=check)

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return self.run(["podman", *args], timeout=timeout, check=check)

    def containers(self, service: str) -> list[Container]:
        """The service's containers, running or not, oldest first."""
        ids = self.podman(
            "ps", "-a", "-q", "--no-trunc",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).split()  # fmt: skip
        if not ids:
            return []
        found = []
        for c in json.loads(self.podman("inspect", *ids)):
            found.append(
                Container(
                    id=c["Id"],
                    name=c["Name"],
                    service=service,
                    state=c["State"]["Status"],
                    pid=int(c["State"]["Pid"]),
                    restarts=int(c.get("RestartCount", 0)),
                    exit_code=int(c["State"]["ExitCode"]),
                )
            )
        return sorted(found, key=lambda c: c.name)

    def container(self, service: str) -> Container:
        (only,) = self.containers(service)
        return only

    def exec(self, container: Container, *argv: str, timeout: float = 120) -> str:
        return self.podman("exec", container.id, *argv, timeout=timeout)

    def switchyard(self, *argv: str) -> str:
        """A ``switchyard`` command run in the gateway's container, as the README's users do."""
        return self.exec(self.container("gateway"), "switchyard", *argv)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.switchyard("status", "--json"))
        return doc

    def live_workers(self, model: str) -> list[dict[str, Any]]:
        models = [m for m in self.status()["models"] if m["model"] == model]
        return [w for m in models for w in m["workers"] if w["live"]]

    def remove(self) -> None:
        """Everything of the project gone, anonymous volumes (Prometheus's data) included.

        Containers first, by the project's label: podman-compose's ``down`` knows one container per
        service and not the replicas ``--scale`` added, Redis's cannot go while those depending on it
        are there, and the anonymous volumes go only with their containers (``rm -v``). Then ``down``
        for the named volumes and the network."""
        label = f"label=io.podman.compose.project={self.project}"

        def listed(*args: str) -> list[str]:
            return self.podman(*args, "--filter", label, "-q", timeout=600).split()

        def attempt(*args: str) -> None:  # on a busy host podman can take minutes: try every step
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.podman(*args, check=False, timeout=600)

        for _ in range(3):  # each pass removes what nothing depends on any more
            ids = listed("ps", "-a")
            if not ids:
                break
            attempt("rm", "-f", "-v", "-t", "5", *ids)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.compose("down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=600)
        for kind in ("volume", "network"):
            for name in listed(kind, "ls"):
                attempt(kind, "rm", "-f", name)
        left = listed("ps", "-a") + listed("volume", "ls") + listed("network", "ls")
        if left:
            raise RuntimeError(f"project {self.project} left behind {left}")

    def state(self, tail: int = 40) -> str:
        """Every container's state and the end of its log, for a failure's message."""
        out = [self.podman("ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}")]
        ids = self.podman("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}")
        for ident in ids.split():
            logs = self.podman("logs", "--tail", str(tail), ident, check=False)
            out.append(f"--- {ident}\n{logs}")
        return "\n".join(out)

    def wait(
        self, check: Callable[[], bool], timeout: float, what: str | Callable[[], str], interval: float = 1.0
    ) -> float:
        """Seconds until ``check()`` is true; after ``timeout`` fail with ``what`` (a string, or a
        function giving one then) and the stack's state."""
        begun = time.monotonic()
        while True:
            try:
                if check():
                    return time.monotonic() - begun
            except (
                RuntimeError,
                OSError,
                ValueError,
                KeyError,
                httpx.HTTPError,
                openai.APIConnectionError,
                subprocess.TimeoutExpired,
            ):
                pass  # not up yet, or a probe that took too long on a busy host: ask again
            if time.monotonic() - begun > timeout:
                said = what if isinstance(what, str) else what()
                raise AssertionError(f"{said}: not after {timeout:.0f}s\n{self.state()}")
            time.sleep(interval)


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment without the caller's Switchyard settings: compose.yaml interpolates
    SWITCHYARD_* variables, and a stray one would change the stack under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_") and k != "REDIS_URL"}
    return {**env, **extra}
