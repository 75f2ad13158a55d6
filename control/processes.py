"""Child processes and ports: start-up checks, "poll until it answers", and "stop it: TERM, wait, KILL".

One copy of each for the supervisor, the embedded Redis, the Prometheus launcher, the tests and the
load tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence


class StartupError(Exception):
    """Something a user can fix before the process can serve (address taken, Redis down, bad path)."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} is already in use; pick another with {flag}"
                ) from exc
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def answers_ok(url: str, timeout: float) -> bool:
    """Whether ``url`` answers 200 now; not listening yet, or any other status, is False."""
    with (
        contextlib.suppress(urllib.error.URLError, OSError),
        urllib.request.urlopen(url, timeout=timeout) as resp,
    ):
        return bool(resp.status == 200)
    return False


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    interval: float = 0.2,
    watch: Callable[[], None] | None = None,
) -> bool:
    """Poll ``check`` until it is true (True) or ``timeout`` seconds pass (False). ``watch`` runs
    before each poll and may raise to give up early (a child that died, a stop request)."""
    deadline = time.monotonic() + timeout
    while True:
        if watch is not None:
            watch()
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def group_alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether any process of ``proc``'s process group (it leads one) is still there."""
    proc.poll()  # reap the leader, or a zombie leader keeps the group "alive"
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal(proc: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)


def stop_process(
    proc: subprocess.Popen[bytes],
    grace: float = 10.0,
    group: bool = False,
    signals: Sequence[int] = (signal.SIGTERM,),
) -> int:
    """Send each of ``signals`` in turn, waiting up to ``grace`` seconds after each for the process
    (with ``group``: every process of its group, e.g. vLLM's engine beside a worker) to exit, then
    SIGKILL what is left. Returns the exit status of ``proc``."""
    alive: Callable[[], bool] = (lambda: group_alive(proc)) if group else (lambda: proc.poll() is None)
    for sig in signals:
        if not alive():
            break
        _signal(proc, sig, group)
        wait_until(lambda: not alive(), grace)
    _signal(proc, signal.SIGKILL, group)
    return proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def terminate_as_interrupt() -> None:
    """Make SIGTERM stop this process as Ctrl-C does: with a KeyboardInterrupt, so its ``finally``
    blocks and context managers run. For a process that starts others in their own sessions (the
    test suite, the load tests): killed by a plain SIGTERM (a CI timeout, ``kill``), it would leave
    its Redis, gateways, workers and their engine processes running with nobody to stop them."""
    signal.signal(signal.SIGTERM, _interrupt)
