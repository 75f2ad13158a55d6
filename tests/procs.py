"""Real gateway and worker processes for the end-to-end tests, and helpers to wait on them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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


def ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def stacks(pids: int | list[int], log: Path, tail: int = 12000) -> str:
    """Have processes ``pids`` write their threads' and tasks' stacks to ``log`` (``kill -USR1``),
    and return the end of ``log``: what a process that stopped answering was waiting for."""
    for pid in [pids] if isinstance(pids, int) else pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)
    return log.read_text(errors="replace")[-tail:]
