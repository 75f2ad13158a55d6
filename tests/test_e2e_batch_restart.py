"""A batch survives its background jobs process and its worker being SIGKILLed mid-batch: every line
ends with exactly one result (none lost, none duplicated), and two jobs processes never both feed it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import System, forget_workers, worker_env
from tests.procs import spawn, stop, wait_until
from tests.test_e2e_batches import FINAL, chat_line, jobs_env, results, submit, wait_for

pytestmark = pytest.mark.e2e

MODEL = "restart-demo"
LINES = 80
TOKENS = 128
"""Long enough that the batch is still running when the test kills the worker, however fast the
path: with 48 tokens and 60 lines a quiet host finished the last lines between two polls."""


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and its group (vLLM's engine with it): no goodbye, no hand-back."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start_worker(system: System, name: str, logs: Path) -> subprocess.Popen[bytes]:
    env = worker_env(
        system.env(), system.model_dir, SWITCHYARD_WORKER_ID=name, SWITCHYARD_SERVED_MODEL_NAME=MODEL
    )
    log = logs / f"{name}.log"
    proc = spawn("worker", env, log)
    serving = lambda: f"worker {name} serving".encode() in log.read_bytes()  # noqa: E731
    wait_until(serving, 300, name, procs=(proc,), logs=(log,))
    return proc


def start_jobs(system: System, logs: Path, *names: str) -> dict[str, subprocess.Popen[bytes]]:
    """Background processes started together, so that none runs the batch alone while another is
    still importing."""
    procs = {name: spawn("background", jobs_env(system), logs / f"{name}.log") for name in names}
    for name, proc in procs.items():
        log = logs / f"{name}.log"
        ready = lambda log=log: b"batches and housekeeping" in log.read_bytes()  # noqa: E731
        wait_until(ready, 60, name, procs=(proc,), logs=(log,))
    return procs


@pytest.fixture
def logs(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("batch-restart")
    yield path
    forget_workers(system, MODEL, "rs-1", "rs-2")


def completed(client: OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return counts.completed if counts else 0


def wait_completed(client: OpenAI, batch_id: str, at_least: int, timeout: float = 120) -> None:
    wait_until(lambda: completed(client, batch_id) >= at_least, timeout, f"{at_least} lines done")


def test_no_line_is_lost_or_duplicated_across_restarts(client: OpenAI, system: System, logs: Path) -> None:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["rs-1"] = start_worker(system, "rs-1", logs)
        procs |= start_jobs(system, logs, "jobs-a")
        lines = [chat_line(f"line-{i}", MODEL, tokens=TOKENS, ignore_eos=True) for i in range(LINES)]
        batch = submit(client, lines)

        wait_completed(client, batch.id, 5)
        kill(procs.pop("jobs-a"))  # mid-batch: its lines on the queue lose their listener
        at_kill = completed(client, batch.id)
        assert at_kill < LINES, "the batch finished before the kill: make it longer"
        procs |= start_jobs(system, logs, "jobs-b", "jobs-c")  # two at once: one feeds, one waits

        # A few more lines done shows the new run feeding; the kill comes soon after, so lines are
        # running on the worker even when a busy host makes this test's polls slow.
        wait_completed(client, batch.id, at_kill + 3)
        kill(procs.pop("rs-1"))  # the worker, with lines running on it
        at_worker_kill = completed(client, batch.id)
        assert at_worker_kill < LINES, "the batch finished before the worker was killed"
        procs["rs-2"] = start_worker(system, "rs-2", logs)

        done = wait_for(client, batch.id, FINAL, timeout=240)
    finally:
        for proc in procs.values():
            stop(proc, grace=2)

    assert done.status == "completed", done
    output = results(client, done.output_file_id)
    errors = results(client, done.error_file_id)
    seen = Counter(x["custom_id"] for x in [*output, *errors])
    lost = {x["custom_id"] for x in lines} - set(seen)
    duplicated = {cid: n for cid, n in seen.items() if n > 1}
    report = {
        "lost": len(lost),
        "duplicated": len(duplicated),
        "errors": len(errors),
        "killed_at": at_kill,
        "worker_killed_at": at_worker_kill,
    }
    print("restart test:", json.dumps(report))
    assert not lost and not duplicated, report
    assert not errors, errors[:3]
    assert done.request_counts is not None and done.request_counts.completed == LINES
    for x in output:
        assert x["response"]["body"]["usage"]["completion_tokens"] == TOKENS
    runs = [
        (logs / f"{name}.log").read_text().count(f"{batch.id} completed") for name in ("jobs-b", "jobs-c")
    ]
    assert sorted(runs) == [0, 1], "exactly one of the two jobs processes finished the batch"
    again = (logs / "jobs-b.log").read_text() + (logs / "jobs-c.log").read_text()
    assert "lines of an earlier run again" in again
