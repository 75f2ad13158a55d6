"""Child processes that are restarted when they die: with backoff, and given up on in a crash loop.

Used by ``switchyard up`` (Redis, gateway, workers) and by a gateway running as several processes.
Each child runs in a session of its own, so a terminal's Ctrl-C reaches only the parent, which then
stops the children in order; a child's whole process group is killed when it is stopped or found
dead (a worker's vLLM engine process must not outlive it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from control.processes import stop_process

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When to start a dead child again, and when to stop trying.

    A child that ran less than ``healthy_after`` seconds failed quickly; each quick failure in a row
    doubles the wait before the next start (from ``first_delay`` up to ``max_delay``), and
    ``give_up_after`` of them in a row is a crash loop. A child that ran longer starts again at once.
    """

    first_delay: float = 1.0
    max_delay: float = 30.0
    healthy_after: float = 60.0
    give_up_after: int = 5

    def after_exit(self, ran_for: float, quick_failures: int) -> tuple[float | None, int]:
        """(seconds to wait before starting it again, or None to give up; quick failures so far)."""
        if ran_for >= self.healthy_after:
            return 0.0, 0
        failures = quick_failures + 1
        if failures >= self.give_up_after:
            return None, failures
        return min(self.max_delay, self.first_delay * 2 ** (failures - 1)), failures


class CrashLoop(RuntimeError):
    """A child kept dying soon after each start."""


@dataclass(eq=False)
class Child:
    name: str
    argv: Sequence[str]
    env: dict[str, str]
    log_to: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_failures: int = 0
    due: float | None = None
    """When a restart is due (the child is dead and waiting for its backoff)."""
    retired: bool = False
    """Stopped on purpose: not to be restarted."""
    last_status: int | None = None
    before_start: Callable[[Child], None] | None = None
    """Called before each start (e.g. to give a worker a fresh id)."""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.before_start is not None:
            self.before_start(self)
        out = self.log_to.open("ab") if self.log_to is not None else None
        try:
            self.proc = subprocess.Popen(
                list(self.argv),
                env=self.env,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
            )
        finally:
            if out is not None:
                out.close()
        self.started_at = time.monotonic()
        self.due = None

    def signal(self, sig: int) -> None:
        """Signal the child process itself (as ``docker stop`` or Kubernetes do)."""
        if self.running():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, grace: float) -> int | None:
        """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL of its whole process group."""
        self.retired = True
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        return stop_process(self.proc, grace=0, group=True, signals=())

    def reap(self) -> None:
        """After the child exited: kill what is left of its process group (an orphaned engine)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


class Children:
    """A set of children kept running: :meth:`check` restarts the dead ones as their policy says."""

    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self.all: list[Child] = []

    def add(self, child: Child, start: bool = True) -> Child:
        self.all.append(child)
        if start:
            child.start()
        return child

    def named(self, name: str) -> Child | None:
        return next((c for c in self.all if c.name == name), None)

    def check(self, now: float | None = None) -> list[Child]:
        """Notice children that died and start those whose backoff is over; returns the ones that
        died just now. Raises CrashLoop when one keeps failing."""
        now = time.monotonic() if now is None else now
        died = []
        for child in self.all:
            if child.retired:
                if not child.running():
                    child.reap()
                continue
            if child.due is None and child.proc is not None and child.proc.poll() is not None:
                died.append(child)
                self._died(child, now)
            if child.due is not None and now >= child.due:
                child.restarts += 1
                log.warning("starting %s again (restart %d)", child.name, child.restarts)
                child.start()
        self.all = [c for c in self.all if not (c.retired and not c.running())]
        return died

    def _died(self, child: Child, now: float) -> None:
        assert child.proc is not None
        child.last_status = child.proc.returncode
        child.reap()
        delay, child.quick_failures = self.policy.after_exit(now - child.started_at, child.quick_failures)
        if delay is None:
            raise CrashLoop(
                f"{child.name} exited with status {child.last_status} {child.quick_failures} times in a "
                f"row, each within {self.policy.healthy_after:.0f}s of starting; not starting it again "
                "(see its output above)"
            )
        log.warning(
            "%s exited with status %s; starting it again in %.0fs", child.name, child.last_status, delay
        )
        child.due = now + delay

    def stop_all(self, grace: float, order: Callable[[Child], int] = lambda c: 0) -> None:
        """Stop every child: all get SIGTERM first, then each up to ``grace`` seconds to exit (in
        ``order``), then SIGKILL of what is left."""
        children = sorted(self.all, key=order)
        for child in children:
            child.retired = True
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            child.stop(max(0.0, deadline - time.monotonic()))
        self.all = []
