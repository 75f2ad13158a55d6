"""What a worker does with a job that ends other than by finishing: a pure decision, no I/O.

The delivery guarantees hang on it: a client whose job cannot finish hears why, a job that another
worker can finish is handed back rather than failed, and a worker that lost a job says nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from worker.coalesce import EngineAborted
from worker.engine import EngineFailed, EngineRejected

StopReason = Literal["client", "lost", "preempted"]
"""Why a job's task was cancelled: its client left, another worker took it over, or it made room for
a tenant below its fair share (:mod:`worker.preempt`; None: the worker is shutting down)."""

Kind = Literal["nothing", "acknowledge", "hand_back", "park", "fail"]


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    """``nothing``: another worker owns the job now; ``acknowledge``: end it without a word (its
    client is gone); ``hand_back``: re-queue it for another worker; ``park``: keep it, to resume here
    (it made room for another tenant's job); ``fail``: end it with an error."""
    status: int = 0
    code: str = ""
    message: str = ""
    unexpected: bool = False
    """An error nobody foresaw: logged with its traceback."""


def early_end(error: BaseException, stop: StopReason | None, n: int, stopping: bool) -> Action:
    """The action for a job whose run raised ``error``.

    ``stop`` says why its task was cancelled, ``n`` how many choices it has (only single-choice
    jobs record progress, so only they can be resumed elsewhere), ``stopping`` whether the worker is
    shutting down.
    """
    resumable = n == 1
    if isinstance(error, asyncio.CancelledError):
        if stop == "lost":
            return Action("nothing")
        if stop == "client":
            return Action("acknowledge")
        if stop == "preempted":  # only jobs that can resume are
            return Action("park")
        if resumable:
            return Action("hand_back")
        return Action("fail", 503, "worker_shutdown", "the worker stopped before the job finished")
    if isinstance(error, EngineRejected):
        return Action("fail", 400, "invalid_request", str(error))
    if stopping and resumable:
        # The engine went down with the worker (a signal to the whole process group, as systemd or a
        # terminal's Ctrl-C send): another worker can still finish the job.
        return Action("hand_back")
    if isinstance(error, EngineAborted):
        return Action("fail", 503, "engine_aborted", str(error))
    if isinstance(error, EngineFailed):
        return Action("fail", 500, "engine_error", str(error))
    return Action("fail", 500, "engine_error", f"generation failed: {type(error).__name__}", unexpected=True)
