"""``kill -USR1`` makes a process write its threads' and asyncio tasks' stacks, and keep running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.procs import ROOT

PROGRAM = """
import asyncio, threading
from control import stacks

stacks.install()
stuck = threading.Event()
threading.Thread(target=stuck.wait, name="stuck-in-a-thread", daemon=True).start()

async def waiting_for_a_reply():
    await deep_inside()

async def deep_inside():
    await asyncio.Event().wait()

async def main():
    task = asyncio.create_task(waiting_for_a_reply())
    alike = [asyncio.create_task(asyncio.Event().wait(), name=f"alike-{i}") for i in range(3)]
    await asyncio.sleep(0.2)  # the task has come to its wait
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_sigusr1_writes_every_thread_and_task_stack_and_the_process_goes_on() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert proc.poll() is None, "the signal stopped the process"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Thread 0x" in err and "threading.py" in err  # every thread, the parked one included
    tasks = err[err.index("asyncio task(s)") :]
    # the task's chain of awaits, down to the innermost coroutine and the line it waits on
    chain = tasks[tasks.index("in waiting_for_a_reply") :].splitlines()
    assert (
        "in deep_inside" in chain[1] and chain[2].startswith("  asyncio/locks.py:") and "in wait" in chain[2]
    )
    # tasks waiting at the same place are listed once, with their count
    assert "3 task(s) (alike-0, alike-1, alike-2):" in tasks, tasks
