"""Stack dumps on demand: ``kill -USR1 <pid>`` makes any Switchyard process write the stack of
every thread and of every asyncio task to its standard error (its log), and keep running.

What a request that hangs is waiting for is then one signal away, on a production host as in a
failing test: a thread stuck in a tokenizer shows in the thread stacks, a coroutine waiting on Redis
or on a lock in the task stacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import sys
from types import FrameType

SIGNAL = signal.SIGUSR1


def install() -> None:
    """Dump stacks on SIGUSR1 from now on: the threads' at once (from C, so even while the
    interpreter is stuck), then the asyncio tasks' when the main thread next runs Python code.
    A process with no usable standard error (detached from it) goes on without."""
    signal.signal(SIGNAL, _dump_tasks)  # first: faulthandler chains to it
    with contextlib.suppress(AttributeError, OSError, RuntimeError, ValueError):
        faulthandler.register(SIGNAL, all_threads=True, chain=True)


def _dump_tasks(signum: int, frame: FrameType | None) -> None:
    """Never raises: it runs between any two bytecodes of the main thread, the event loop's too."""
    loop = asyncio._get_running_loop()  # the loop this (main) thread is running, if any
    if loop is None:
        return
    try:
        text = describe(asyncio.all_tasks(loop))
        # os.write, not print: the signal may have interrupted a write to the same buffered stream
        os.write(sys.stderr.fileno(), text.encode(errors="replace"))
    except Exception:  # a dump that fails must not take the process down
        pass


def describe(tasks: set[asyncio.Task[object]]) -> str:
    """The tasks' chains of awaits, tasks waiting at the same place grouped under one chain, the
    rarest chains last (a request stuck where no other waits is what one looks for)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for task in tasks:
        groups.setdefault(tuple(awaits(task.get_coro())), []).append(task.get_name())
    last = sys.argv[-1] if len(sys.argv) > 1 else ""
    role = os.path.basename(sys.argv[0]) + (f" {last}" if last.isidentifier() else "")  # no secrets
    lines = [
        f"--- pid {os.getpid()} ({role}): {len(tasks)} asyncio task(s) waiting at {len(groups)} "
        "place(s), each chain from the outermost await to the innermost:"
    ]
    for chain, names in sorted(groups.items(), key=lambda g: -len(g[1])):
        shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
        lines.append(f"{len(names)} task(s) ({shown}):")
        lines += [f"  {where}" for where in chain]
    return "\n".join(lines) + "\n"


def awaits(coro: object) -> list[str]:
    """Where a coroutine waits: its own line, then that of each coroutine it awaits, down the
    chain (``Task.print_stack`` shows the outermost one only)."""
    found: list[str] = []
    while coro is not None and len(found) < 50:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        frame = frame or getattr(coro, "ag_frame", None)
        if frame is not None:
            code = frame.f_code
            found.append(f"{_short(code.co_filename)}:{frame.f_lineno} in {code.co_name}")
        coro = next(
            (v for a in ("cr_await", "gi_yieldfrom", "ag_await") if (v := getattr(coro, a, None))),
            None,
        )
    return found


def _short(path: str) -> str:
    """``path`` relative to the import root it was found under: ``redis/asyncio/client.py``."""
    roots = sorted((p for p in sys.path if p and path.startswith(p.rstrip("/") + "/")), key=len)
    return path[len(roots[-1].rstrip("/")) + 1 :] if roots else path
