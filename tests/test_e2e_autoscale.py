"""`switchyard up --autoscale 0:3` on real processes: it scales to zero when idle, a burst sent
while no worker runs waits in its stream, workers are started for it and every request completes
whole, and then they are retired again. The simulated engine stands in for vLLM here (workers start
in a second, so the scaling itself is what the test watches); the same run with the real engine is
``python loadtest/autoscale.py`` (its figures are in docs/fleet.md)."""

from __future__ import annotations

import asyncio
from argparse import Namespace
from pathlib import Path

import httpx
import pytest

from control.processes import free_port
from loadtest.autoscale import Burst, until_zero, up_flags, watch_burst
from tests.procs import ready, spawn, stop, wait_until

pytestmark = pytest.mark.e2e


async def test_a_burst_from_zero_brings_workers_that_go_away_again(tmp_path: Path) -> None:
    args = Namespace(
        max=3,
        capacity=4,
        engine="sim",
        sim_preset="cpu-demo",
        scale_down_after=3.0,
        cooldown=1.0,
        out=tmp_path,
    )
    port, redis_port, metrics_port = free_port(), free_port(), free_port()
    log = tmp_path / "up.log"
    flags, env = up_flags(args, port, redis_port, metrics_port)
    proc = spawn("up", env, log, *flags)
    base, redis_url = f"http://127.0.0.1:{port}", f"redis://127.0.0.1:{redis_port}/0"
    try:
        wait_until(lambda: ready(base), 180, "switchyard up --autoscale 0:3", procs=(proc,), logs=(log,))
        key = (tmp_path / "config" / "switchyard" / "dev-key").read_text().strip()
        await until_zero(redis_url, "switchyard-demo", 60)
        async with httpx.AsyncClient(base_url=base) as http:  # scaled to zero, yet servable
            assert (await http.get("/readyz")).status_code == 200
            models = await http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
            assert [m["id"] for m in models.json()["data"]] == ["switchyard-demo"]
        burst = Burst(requests=24, tokens=128)
        internal = f"http://127.0.0.1:{metrics_port}"
        samples = await watch_burst(
            base, internal, redis_url, key, "switchyard-demo", burst, every=0.25, settle=60
        )
        assert burst.whole == 24, burst.ends
        most = max(s.workers for s in samples)
        assert 2 <= most <= 3, samples
        assert max(s.waiting for s in samples) > 0  # the burst did wait for workers
        assert samples[-1].workers == 0, "the workers were not retired after the burst"
        assert max(s.desired for s in samples) >= 2, samples  # the decision /scaling exports
        print(f"first token after {min(burst.ttft):.1f}s from zero workers; at most {most} workers")
    finally:
        await asyncio.to_thread(stop, proc, 120)
