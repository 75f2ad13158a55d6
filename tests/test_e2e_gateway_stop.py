"""A gateway beside the session's system, stopped the way gateways stop: one with a short grace cuts
its streams with an error the SDK raises, and a SIGKILLed one's jobs are dropped by the worker
(nobody listens for them any more).

Apart from ``test_e2e_fleet.py`` so that its ``switchyard up --workers 2`` has stopped before these
start: on a small host its engines would compete with the session's worker for the CPU.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from redis.asyncio import Redis

from control.processes import free_port
from shared.fleet import live_workers
from tests.conftest import MAX_MODEL_LEN, System
from tests.procs import ready, spawn, stacks, stop, wait_until

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "Tell me about the harbour."}]


def abandoned(system: System) -> float:
    """Jobs the session's worker ended because nobody listened for them any more."""
    for line in httpx.get(system.worker_metrics_url).text.splitlines():
        if line.startswith("switchyard:worker_jobs_total") and 'outcome="abandoned"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


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
    try:
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key=system.api_key, max_retries=0, timeout=120)
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
        stop(proc)


async def test_jobs_of_a_killed_gateway_stop_running(system: System, redis: Redis, tmp_path: Path) -> None:
    proc, base = extra_gateway(system, tmp_path / "gw.log")
    try:
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key=system.api_key, max_retries=0, timeout=120)
        opened = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=system.model, messages=USER, max_tokens=MAX_MODEL_LEN - 64, stream=True,
                    extra_body={"ignore_eos": True},
                )
                for _ in range(4)
            )
        )  # fmt: skip
        await opened[0].__anext__()

        async def inflight() -> int:
            (worker,) = await live_workers(redis, system.names, ttl=3)
            return worker.inflight

        for _ in range(50):
            if await inflight() >= 4:
                break
            await asyncio.sleep(0.1)
        assert await inflight() >= 4
        before = abandoned(system)
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        for _ in range(100):
            if await inflight() == 0:
                break
            await asyncio.sleep(0.1)
        took = time.monotonic() - killed
        assert await inflight() == 0, "the worker still generates for a gateway that is gone"
        assert abandoned(system) == before + 4
        print(f"the worker dropped the dead gateway's jobs {took:.1f}s after the kill")
    finally:
        stop(proc)
