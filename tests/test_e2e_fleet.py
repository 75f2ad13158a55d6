"""A fleet that survives its parts, tried the way failures happen, on real processes.

``switchyard up --workers 2`` (supervised): a SIGKILLed worker's streams all finish whole and the
worker is back; a SIGTERMed gateway drains (unready at once, new requests refused, streams finish)
and is started again; a SIGKILLed embedded Redis is started again with its data. Beside the
session's system: a gateway with a short grace cuts its streams with an error the SDK raises, and a
SIGKILLed gateway's jobs are dropped by the worker (nobody listens for them any more).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk
from redis.asyncio import Redis

from control.processes import free_port
from control.stacks import describe
from shared.fleet import live_workers
from shared.messages import WorkerInfo
from shared.names import GROUP, Names, as_text
from tests.conftest import MAX_MODEL_LEN, SESSION_RECLAIM_IDLE, System
from tests.procs import (
    ROOT,
    ready,
    socket_transports,
    spawn,
    stacks,
    stop,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "Tell me about the harbour."}]


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    base_url: str
    redis_url: str
    key: str
    log: Path

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.key, max_retries=0, timeout=180)

    def children(self, role: str) -> list[psutil.Process]:
        found = []
        for p in psutil.Process(self.proc.pid).children():
            try:
                if p.cmdline()[-1] == role or (role == "redis" and "redis-server" in p.cmdline()[0]):
                    found.append(p)
            except psutil.Error:
                continue
        return found


@pytest.fixture(scope="module")
def up(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("up")
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_") and k != "REDIS_URL"}
    env |= {
        "XDG_CONFIG_HOME": str(home / "config"),
        "SWITCHYARD_RECLAIM_IDLE": str(SESSION_RECLAIM_IDLE),
        "SWITCHYARD_HEARTBEAT_INTERVAL": "0.5",
        "SWITCHYARD_WORKER_TTL": "3",
        "SWITCHYARD_SHUTDOWN_GRACE": "60",
    }
    argv = ["up", "--workers", "2", "--port", str(port), "--redis-port", str(redis_port)]
    argv += ["--model", str(demo_model_dir), "--served-model-name", "fleet-demo"]
    argv += ["--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--kv-cache-gib", "1"]
    log = home / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "control.cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(base), 300, "switchyard up --workers 2", procs=(proc,), logs=(log,))
        key = (home / "config" / "switchyard" / "dev-key").read_text().strip()
        system = Up(proc, base, f"redis://127.0.0.1:{redis_port}/0", key, log)
        # Ready means one worker serves; these tests need both.
        wait_until(lambda: len(asyncio.run(worker_records(system.redis_url))) == 2, 300, "two workers")
        family = psutil.Process(proc.pid).children(recursive=True)
        yield system
        family += psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        time.sleep(0.5)
        alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"orphans left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()


Result = tuple[str | None, int, Exception | None]
LONG = MAX_MODEL_LEN - 64
"""Tokens of a stream that must stay in flight a while: the tiny model on an idle host makes 600
tokens in about two seconds, less than a test's few steps may take."""


@pytest_asyncio.fixture
async def up_client(up: Up) -> AsyncIterator[AsyncOpenAI]:
    """A client of up's gateway, closed when its test ends. Every client here is closed: one left
    to the garbage collector closes its sockets from a finalizer and then, from the close it
    schedules, unregisters their descriptor numbers from the event loop, which by then may belong
    to a later test's connections; those are never read again and their requests seem to hang."""
    async with up.client() as c:
        yield c


async def stream(
    client: AsyncOpenAI,
    tokens: int,
    pauses: list[float] | None = None,
    started: asyncio.Event | None = None,
) -> tuple[str | None, int, Exception | None]:
    """(finish reason, tokens received, error) of one streamed request; its longest wait between
    two chunks goes to ``pauses``; ``started`` is set at its first chunk."""
    finish, received = None, 0
    last, longest = None, 0.0
    try:
        chunks = await client.chat.completions.create(
            model="fleet-demo",
            messages=USER,
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in chunks:
            now = time.monotonic()
            if last is None and started is not None:
                started.set()
            longest, last = max(longest, now - last) if last else longest, now
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                received = chunk.usage.completion_tokens
    except openai.APIError as exc:
        return finish, received, exc
    finally:
        if pauses is not None:
            pauses.append(longest)
    return finish, received, None


async def worker_records(redis_url: str) -> list[WorkerInfo]:
    redis = Redis.from_url(redis_url)
    try:
        return await live_workers(redis, Names(), ttl=3)
    finally:
        await redis.aclose()


async def under_way(started: list[asyncio.Event], streams: list[asyncio.Task[Result]], up: Up) -> None:
    """Return once every stream has sent its first chunk or ended; after 60 s fail the test with
    what each did and the fleet's state."""

    async def begun_or_ended(event: asyncio.Event, task: asyncio.Task[Result]) -> None:
        waiter = asyncio.ensure_future(event.wait())
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()

    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*map(begun_or_ended, started, streams))
    except TimeoutError:
        begun = sum(e.is_set() for e in started)
        ended = [s.result() for s in streams if s.done()]
        for s in streams:
            s.cancel()
        state = fleet_state(up)
        pytest.fail(f"{begun} of {len(streams)} streams under way after 60 s; ended: {ended}\n{state}")


async def held(up: Up) -> Counter[str]:
    """Unfinished jobs each worker holds right now (a job leaves the stream when it ends)."""
    redis = Redis.from_url(up.redis_url)
    try:
        pending = await redis.xpending(Names().jobs_stream("fleet-demo", "dev"), GROUP)
    finally:
        await redis.aclose()
    return Counter({as_text(c["name"]): int(c["pending"]) for c in pending["consumers"] or ()})


def fleet_state(up: Up) -> str:
    """What the fleet holds now, for a failure's message: ``switchyard status`` (each stream's
    waiting and pending jobs, by consumer), every worker's job outcomes, the test's own client
    tasks and TCP connections to the gateway, the end of up's log, and the workers' and then the
    gateway's stacks."""
    status = subprocess.run(
        [sys.executable, "-m", "control.cli", "status", "--redis-url", up.redis_url],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    outcomes = []
    for proc in up.children("worker"):
        port = int(proc.environ()["SWITCHYARD_METRICS_PORT"])
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        counters = [line for line in text.splitlines() if line.startswith("switchyard:worker_jobs_total")]
        outcomes += [f"worker :{port} {line}" for line in counters]
    gateway_port = up.base_url.rsplit(":", 1)[1]
    sockets = subprocess.run(
        ["ss", "-tnpi", f"( sport = :{gateway_port} or dport = :{gateway_port} )"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    pids = [p.pid for p in (*up.children("worker"), *up.children("gateway"))]  # the gateway's last
    return (
        f"switchyard status:\n{status.stdout}{status.stderr}\nworker job outcomes:\n"
        + "\n".join(outcomes)
        + f"\nthis test's tasks:\n{describe(asyncio.all_tasks())}"
        + "\nthis test's socket transports:\n"
        + "\n".join(socket_transports())
        + f"\nTCP connections to the gateway (ss -tnpi):\n{sockets.stdout}{sockets.stderr}"
        + f"\nup's log, with the stacks of its gateway and workers:\n{stacks(pids, up.log, tail=6000)}"
    )


def completed_by_worker(up: Up) -> dict[int, float]:
    """Jobs each worker completed, by its metrics port."""
    out = {}
    for proc in up.children("worker"):
        port = int(proc.environ()["SWITCHYARD_METRICS_PORT"])
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        done = [line for line in text.splitlines() if 'outcome="completed"' in line]
        out[port] = float(done[0].rsplit(" ", 1)[1]) if done else 0.0
    return out


async def test_the_turns_of_a_conversation_run_on_one_worker(up: Up, up_client: AsyncOpenAI) -> None:
    client = up_client
    for _ in range(2):  # two conversations: each keeps to its worker, wherever each is read
        before = await asyncio.to_thread(completed_by_worker, up)
        opening = "Read this and answer. " + " ".join(f"harbour {i} lights" for i in range(60))
        messages: list[dict[str, str]] = [{"role": "user", "content": opening}]
        for _ in range(4):
            reply = await client.chat.completions.create(model="fleet-demo", messages=messages, max_tokens=8)  # type: ignore[arg-type]
            messages += [
                {"role": "assistant", "content": reply.choices[0].message.content or ""},
                {"role": "user", "content": "And then?"},
            ]
        after = await asyncio.to_thread(completed_by_worker, up)
        assert sorted(after[p] - before[p] for p in after) == [0, 4], (before, after)


async def test_a_killed_worker_costs_no_stream_and_comes_back(up: Up, up_client: AsyncOpenAI) -> None:
    client = up_client
    pauses: list[float] = []
    started = [asyncio.Event() for _ in range(24)]
    streams = [asyncio.create_task(stream(client, LONG, pauses, e)) for e in started]
    await under_way(started, streams, up)
    holding = await held(up)  # exact now, where a heartbeat may be half a second old
    busiest, jobs = holding.most_common(1)[0] if holding else ("", 0)
    if jobs == 0:
        for s in streams:
            s.cancel()
        pytest.fail(f"no worker holds any of the 24 streams\n{fleet_state(up)}")
    victim = next(p for p in up.children("worker") if p.environ().get("SWITCHYARD_WORKER_ID") == busiest)
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)  # the process alone, as the OOM killer does
    results = await asyncio.gather(*streams)
    assert Counter(results) == Counter({("length", LONG, None): 24}), results
    back = None
    for _ in range(120):
        live = [w for w in await worker_records(up.redis_url) if w.id != busiest]
        if len(live) == 2:
            back = time.monotonic() - killed
            break
        await asyncio.sleep(1)
    assert back is not None, "the killed worker was not started again"
    print(
        f"killed a worker holding {jobs} of 24 streams: longest pause {max(pauses):.1f}s,",
        end=" ",
    )
    print(f"the worker was back after {back:.1f}s")
    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "control.cli", "status", "--json", "--redis-url", up.redis_url],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    model = json.loads(status.stdout)["models"][0]
    assert sum(w["live"] for w in model["workers"]) == 2


async def test_a_gateway_told_to_stop_finishes_its_streams_first(up: Up, up_client: AsyncOpenAI) -> None:
    client = up_client
    started = [asyncio.Event() for _ in range(16)]
    streams = [asyncio.create_task(stream(client, LONG, started=e)) for e in started]
    # SIGTERM once every stream is under way (one that already ended must have ended whole).
    await under_way(started, streams, up)
    early = [s.result() for s in streams if s.done()]
    assert all(r == ("length", LONG, None) for r in early), early
    assert len(early) < 8, f"{len(early)} of 16 streams ended before the gateway was told to stop"
    (gateway,) = up.children("gateway")
    gateway.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=up.base_url) as http:
        readyz = await http.get("/readyz")
        assert readyz.status_code == 503 and readyz.json()["reason"] == "shutting down"
        refused = await http.post(
            "/v1/completions",
            json={"model": "fleet-demo", "prompt": "hi", "max_tokens": 2},
            headers={"authorization": f"Bearer {up.key}"},
        )
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "shutting_down"
    results = await asyncio.gather(*streams)
    assert Counter(results) == Counter({("length", LONG, None): 16}), results
    wait_until(lambda: ready(up.base_url), 120, "the gateway started again")
    assert "gateway exited with status 0" in up.log.read_text()


async def test_a_killed_redis_is_started_again_with_its_data(up: Up, up_client: AsyncOpenAI) -> None:
    client = up_client
    started = [asyncio.Event() for _ in range(6)]
    streams = [asyncio.create_task(stream(client, LONG, started=e)) for e in started]
    await under_way(started, streams, up)
    (redis,) = up.children("redis")
    redis.send_signal(signal.SIGKILL)
    results = await asyncio.gather(*streams)
    for finish, received, error in results:  # cut short, but never silently
        assert (finish == "length" and received == LONG) or error is not None, results
    wait_until(lambda: ready(up.base_url), 120, "serving again after Redis came back")
    reply = await client.chat.completions.create(model="fleet-demo", messages=USER, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")  # the dev key survived too


# -- a gateway beside the session's system -----------------------------------------------------------


def outcomes(system: System) -> dict[str, float]:
    """The session's worker's jobs so far, by how they ended."""
    found = {}
    for line in httpx.get(system.worker_metrics_url).text.splitlines():
        if line.startswith("switchyard:worker_jobs_total"):
            found[line.split('outcome="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return found


def extra_gateway(system: System, log: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = spawn("gateway", system.env(SWITCHYARD_PORT=str(port), SWITCHYARD_WORKER_TTL="3", **env), log)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: ready(base), 120, "an extra gateway", procs=(proc,), logs=(log,))
    return proc, base


async def test_a_short_grace_cuts_streams_with_an_error_the_sdk_raises(
    system: System, tmp_path: Path
) -> None:
    proc, base = extra_gateway(system, tmp_path / "gw.log", SWITCHYARD_SHUTDOWN_GRACE="1")
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=system.api_key, max_retries=0, timeout=120)
    try:
        streams = [
            asyncio.create_task(
                client.chat.completions.create(
                    model=system.model, messages=USER, max_tokens=MAX_MODEL_LEN - 64, stream=True,
                    extra_body={"ignore_eos": True},
                )
            )
            for _ in range(8)
        ]  # fmt: skip
        begun = time.monotonic()
        results = await asyncio.gather(*streams, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            pytest.fail(
                f"{len(failed)} of 8 streams did not start in {time.monotonic() - begun:.0f} s: "
                f"{failed!r}\ngateway log and stacks:\n{stacks(proc.pid, tmp_path / 'gw.log')}"
            )
        opened = [r for r in results if not isinstance(r, BaseException)]
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)

        async def read(chunks: openai.AsyncStream) -> str:  # type: ignore[type-arg]
            try:
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        return "finished"
            except openai.APIError as exc:
                assert "shutting down" in str(exc) or "stopped before" in str(exc), exc
                return "error"
            return "silent"

        outcomes = await asyncio.gather(*(read(c) for c in opened))
        assert Counter(outcomes)["silent"] == 0, outcomes
        assert Counter(outcomes)["error"] > 0, outcomes
        assert proc.wait(timeout=30) == 0
    finally:
        await client.close()
        stop(proc)


async def test_jobs_of_a_killed_gateway_stop_running(system: System, redis: Redis, tmp_path: Path) -> None:
    stream = system.names.jobs_stream(system.model, "main")

    async def no_jobs() -> bool:  # a job leaves its stream when it ends
        return not await redis.xlen(stream)

    # The previous test's jobs end once the worker hears their gateway is gone.
    await wait_for(no_jobs, 30, "no earlier test's jobs on the worker")
    proc, base = extra_gateway(system, tmp_path / "gw.log")
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=system.api_key, max_retries=0, timeout=120)
    opened: list[openai.AsyncStream[ChatCompletionChunk]] = []

    async def first_chunk() -> float:
        """Open a stream; when its first chunk came (each stream read as soon as it answers)."""
        chunks = await client.chat.completions.create(
            model=system.model, messages=USER, max_tokens=MAX_MODEL_LEN - 64, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        opened.append(chunks)
        await chunks.__anext__()
        return time.monotonic()

    try:
        # Kill as soon as every job has sent tokens: on an idle host the tiny model finishes 960
        # tokens in a few seconds, so waiting longer could kill a gateway whose jobs are done.
        firsts = await asyncio.gather(*(first_chunk() for _ in range(4)))
        before = outcomes(system)
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        # The jobs need not have started together (a busy host), so one may have ended before the
        # kill; every job still held then must end within 10 s, and none by running to its end.
        gone = True
        try:
            await wait_for(no_jobs, 10)
        except AssertionError:  # judged below, with what ended
            gone = False
        took = time.monotonic() - killed
        await asyncio.sleep(0.3)  # a job's counter moves just after it leaves the stream
        after = outcomes(system)
        ended = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        state = (
            f"ended after the kill: {ended} (before it: {before}), {took:.1f}s after it; "
            f"the first chunks came {max(firsts) - min(firsts):.1f}s apart"
        )
        assert gone, f"jobs still held: {state}"
        assert set(ended) == {"abandoned"}, state
        assert sum(ended.values()) >= 1, state  # the kill interrupted them, not their ends
        print(state)
    finally:
        for chunks in opened:  # closed here, not by the garbage collector mid-iteration
            with contextlib.suppress(Exception):  # its gateway is gone: the close may fail
                await chunks.close()
        await client.close()
        stop(proc)
