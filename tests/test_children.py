"""Supervised children (control/children.py) with real, tiny processes: restarts with backoff, a
crash loop given up on, a long-lived child started again at once, a stop that leaves nothing."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from control.children import Child, Children, CrashLoop, RestartPolicy

FAST = RestartPolicy(first_delay=0.05, max_delay=0.2, healthy_after=1.0, give_up_after=4)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.parametrize(
    ("ran_for", "failures", "expected"),
    [
        (0.5, 0, (1.0, 1)),  # a quick failure: wait, and count it
        (0.5, 1, (2.0, 2)),
        (0.5, 3, (8.0, 4)),
        (0.5, 6, (30.0, 7)),  # capped at max_delay
        (120.0, 3, (0.0, 0)),  # it ran long: start it again at once, the count starts over
        (0.5, 9, (None, 10)),  # the tenth in a row: a crash loop
    ],
)
def test_restart_policy(ran_for: float, failures: int, expected: tuple[float | None, int]) -> None:
    policy = RestartPolicy(first_delay=1, max_delay=30, healthy_after=60, give_up_after=10)
    assert policy.after_exit(ran_for, failures) == expected


def test_a_child_that_keeps_dying_is_restarted_then_given_up_on() -> None:
    children = Children(FAST)
    child = children.add(Child("flaky", python("import sys; sys.exit(3)"), dict(os.environ)))
    with pytest.raises(CrashLoop, match="flaky exited with status 3 4 times in a row"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children.check()
            time.sleep(0.02)
    assert child.restarts == 3


def test_a_child_that_ran_long_is_started_again_at_once_and_its_group_reaped() -> None:
    children = Children(FAST)
    # A child that leaves a grandchild behind in its process group when it dies (as a worker leaves
    # vLLM's engine process): the supervisor must not let it linger.
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(1.2)"
    )
    child = children.add(Child("long", python(code), dict(os.environ)))
    first = child.pid
    time.sleep(0.3)
    grandchildren = psutil.Process(first).children()
    deadline = time.monotonic() + 10
    while child.pid == first and time.monotonic() < deadline:
        children.check()
        time.sleep(0.05)
    assert child.pid != first and child.restarts == 1 and child.quick_failures == 0
    time.sleep(0.2)
    assert not [p for p in grandchildren if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    children.stop_all(grace=2)
    assert not child.running()


def test_stop_all_gives_sigterm_first() -> None:
    children = Children(FAST)
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(60)"
    child = children.add(Child("polite", python(code), dict(os.environ)))
    time.sleep(0.5)
    proc = child.proc
    children.stop_all(grace=5)
    assert proc is not None and proc.returncode == 0 and children.all == []
