"""The scale benchmark end to end at the smallest size: fleets of one and two simulated workers as
real processes, a burst and a short steady load, and the whole report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import scale

pytestmark = pytest.mark.e2e


def test_a_short_scale_run_writes_the_whole_report(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    argv = ["--workers", "1,2", "--preset", "h100", "--speed", "5", "--capacity", "8"]
    argv += ["--streams-per-worker", "4", "--burst-per-worker", "3", "--output-tokens", "16"]
    argv += ["--prompt-tokens", "16", "--warmup", "2", "--duration", "4", "--out", str(out)]
    assert scale.main(argv) == 0

    doc = json.loads((out / "scale.json").read_text())
    one, two = doc["levels"]
    assert (one["workers"], two["workers"]) == (1, 2)
    for lv in (one, two):
        assert lv["errors"] == 0 and lv["requests_ok"] > 0 and lv["tokens_per_s"] > 0
        assert len(lv["jobs"]) == lv["workers"] and sum(lv["jobs"]) > 0
        assert sum(lv["burst_jobs"]) == lv["burst"]  # every job of the burst was counted on a worker
        assert {"gateway", "redis", "client", "host", "other", "worker-1"} <= set(lv["cores"])
    assert doc["efficiency"]["1"] == 1.0
    assert "| 2 | 8 |" in (out / "summary.md").read_text()
    assert (out / "scale.png").stat().st_size > 0
    assert (out / "logs" / "2-workers" / "worker-2.log.gz").exists()
