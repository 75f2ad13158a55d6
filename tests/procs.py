"""Real gateway and worker processes for the end-to-end tests, and helpers to wait on them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from control.processes import stop_process
from control.processes import wait_until as poll_until

ROOT = Path(__file__).resolve().parent.parent


def spawn(role: str, env: dict[str, str], log: Path, *flags: str) -> subprocess.Popen[bytes]:
    """Start ``switchyard <role> [flags]`` in its own session, output to ``log``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    full.update(env)
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "control.cli", role, *flags],
            env=full,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL the whole process group (vLLM's engine process included)."""
    return stop_process(proc, grace, group=True)


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    procs: tuple[subprocess.Popen[bytes], ...] = (),
    logs: tuple[Path, ...] = (),
) -> None:
    """Poll ``check``; fail at once, with the log, if one of ``procs`` exits meanwhile."""

    def alive() -> None:
        for proc, log in zip(procs, logs, strict=False):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"process exited ({proc.returncode}) while waiting for {what}:\n"
                    + log.read_text()[-3000:]
                )

    if not poll_until(check, timeout, watch=alive):
        tail = "\n".join(log.read_text()[-2000:] for log in logs)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")


async def wait_for(
    predicate: Callable[[], Awaitable[object]], within: float, what: str = "condition"
) -> float:
    """Seconds until ``await predicate()`` holds; fails after ``within`` seconds."""
    begun = time.monotonic()
    while time.monotonic() - begun < within:
        if await predicate():
            return time.monotonic() - begun
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not met in {within}s")


def ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def stacks(pids: int | list[int], log: Path, tail: int = 12000) -> str:
    """Have processes ``pids`` write their threads' and tasks' stacks to ``log`` (``kill -USR1``),
    one after the other in the order given, and return the end of ``log`` before them followed by
    the dumps: what a process that stopped answering was waiting for (the last pid's at the very
    end, where a truncated report still shows it)."""
    before = log.read_text(errors="replace")
    for pid in [pids] if isinstance(pids, int) else pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1.0)
    now = log.read_text(errors="replace")
    return now[max(0, len(before) - tail) : len(before)] + "\n--- stack dumps:\n" + now[len(before) :]


def socket_transports() -> list[str]:
    """Each socket transport of the running event loop: its descriptor, whether it means to read,
    whether the loop's selector has it, and what waits unread in the kernel's buffer for it."""
    import fcntl
    import gc
    import termios
    from asyncio.selector_events import _SelectorSocketTransport

    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    registered = {key.fd: key.events for key in selector.get_map().values()}
    rows = []
    for t in gc.get_objects():
        if isinstance(t, _SelectorSocketTransport) and t._loop is loop and t._sock is not None:
            fd = t._sock_fd
            try:
                unread = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
                waiting = int.from_bytes(unread, sys.byteorder)
            except OSError:
                waiting = -1
            rows.append(
                f"fd {fd}: paused={t._paused} closing={t.is_closing()} "
                f"selector events={registered.get(fd)} unread bytes={waiting}"
            )
    return sorted(rows, key=lambda r: int(r.split()[1].rstrip(":")))
