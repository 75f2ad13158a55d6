"""A test suite stopped with SIGTERM (a CI timeout, ``kill``) still stops the processes it started:
its fixtures are torn down as on Ctrl-C (``control.processes.terminate_as_interrupt``, installed by
``tests/conftest.py``). A real pytest, a real child process in its own session, a real signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from control.processes import wait_until

ROOT = Path(__file__).resolve().parent.parent

SUITE = """
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def server():
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    (HERE / "child.pid").write_text(str(proc.pid))
    yield proc
    proc.kill()
    proc.wait()


def test_runs_long(server):
    (HERE / "running").touch()
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_suite_stopped_with_sigterm_stops_what_its_fixtures_started(tmp_path: Path) -> None:
    (tmp_path / "test_long.py").write_text(textwrap.dedent(SUITE))
    plugins = ["-p", "tests.conftest", "-p", "no:cacheprovider"]
    suite = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", *plugins, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    child = None
    try:
        assert wait_until(lambda: (tmp_path / "running").exists(), 60), "the suite did not start its test"
        child = int((tmp_path / "child.pid").read_text())
        assert alive(child)
        suite.send_signal(signal.SIGTERM)
        suite.wait(timeout=30)
        stopped = wait_until(lambda: not alive(child), 10, interval=0.05)
        assert stopped, "the suite died and left the process its fixture started running"
    finally:
        suite.kill()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
