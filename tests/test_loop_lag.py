"""The gateway's event-loop lag histogram sees a loop that stops, and only then reads it as late."""

from __future__ import annotations

import asyncio
import time

from gateway.metrics import GatewayMetrics

LAG = "switchyard:gateway_event_loop_lag_seconds"


def observed(metrics: GatewayMetrics, le: str | None = None) -> float:
    name, labels = (f"{LAG}_bucket", {"le": le}) if le else (f"{LAG}_count", {})
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_stalled_loop_is_recorded_as_late_by_the_stall() -> None:
    metrics = GatewayMetrics()
    watcher = asyncio.create_task(metrics.watch_loop(period=0.01))
    try:
        await asyncio.sleep(0.1)  # looks at a loop that has nothing else to do
        before = observed(metrics)
        assert before >= 3
        assert observed(metrics, "0.25") == before  # none of them anywhere near the stall below

        time.sleep(0.4)  # noqa: ASYNC251 - the loop stops, as under a long garbage collection
        await asyncio.sleep(0.05)
        after = observed(metrics)
        assert after > before
        assert after - observed(metrics, "0.25") == 1  # one look, late by more than 0.25 s
        assert observed(metrics, "0.5") == after  # and by less than the stall plus its period
    finally:
        watcher.cancel()
