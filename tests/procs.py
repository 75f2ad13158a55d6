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

ROOT = Path(__file__).resolve().parent.parent


def spawn(role: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``switchyard <role>`` in its own session, output to ``log``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    full.update(env)
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "shared.cli", role],
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
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    procs: tuple[subprocess.Popen[bytes], ...] = (),
    logs: tuple[Path, ...] = (),
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=False):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"process exited ({proc.returncode}) while waiting for {what}:\n"
                    + log.read_text()[-3000:]
                )
        if check():
            return
        time.sleep(0.2)
    tail = "\n".join(log.read_text()[-2000:] for log in logs)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
