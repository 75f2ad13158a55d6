"""The scale report from synthetic levels: scaling, balance, what saturated, the files it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtest import scalereport as sr
from loadtest.benchreport import RequestResult, window_tokens_per_s

QUIET = {"gateway": 0.1, "redis": 0.02, "client": 0.1, "worker-1": 0.05, "host": 0.3, "other": 0.03}


def level(workers: int, tokens: float, jobs: list[int], cores: dict[str, float] | None = None) -> sr.Level:
    return sr.Level(
        workers=workers, streams=32 * workers, window_s=30.0, tokens_per_s=tokens,
        client_tokens_per_s=tokens, requests_ok=sum(jobs), errors=0, ttft_p50_ms=90.0, ttft_p95_ms=150.0,
        jobs=jobs, burst=12 * workers, burst_jobs=[12] * workers, cores=cores or QUIET,
    )  # fmt: skip


def report(*levels: sr.Level) -> sr.ScaleReport:
    return sr.ScaleReport({"host_cpus": 2, "command": "python loadtest/scale.py"}, list(levels))


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [([10, 10], 0.0), ([9, 11], 0.1), ([30, 10], 0.5), ([6, 10, 8, 8], 0.25), ([0, 0], None), ([], None)],
)
def test_imbalance_is_the_largest_distance_from_the_mean(jobs: list[int], expected: float | None) -> None:
    assert sr.imbalance(jobs) == (None if expected is None else pytest.approx(expected))


def test_efficiency_is_against_n_times_the_one_worker_level() -> None:
    rep = report(level(1, 750, [80]), level(2, 1500, [80, 80]), level(4, 2700, [70, 70, 70, 70]))
    assert [sr.efficiency(lv, rep.base) for lv in rep.levels] == [1.0, 1.0, pytest.approx(0.9)]
    assert sr.efficiency(level(2, 1500, [1, 1]), None) is None


def test_what_saturated_is_the_benchmarks_own_doing() -> None:
    gateway = QUIET | {"gateway": 0.9}
    assert sr.limits(level(8, 5000, [1] * 8, gateway), host_cpus=2) == ["gateway"]
    ours = QUIET | {"host": 1.9, "other": 0.05}
    assert sr.limits(level(8, 5000, [1] * 8, ours), host_cpus=2) == ["host"]
    others = QUIET | {"host": 1.95, "other": 1.6}  # the host was full, of someone else's work
    assert sr.limits(level(1, 700, [1], others), host_cpus=2) == []


def test_verdicts_say_which_target_is_met_and_where_the_path_saturated() -> None:
    rep = report(
        level(1, 750, [80]),
        level(2, 1480, [81, 79]),
        level(4, 2400, [90, 50, 70, 70], QUIET | {"host": 1.95, "other": 0.1}),
    )
    text = "\n".join(sr.verdicts(rep))
    assert "2 workers: 1.97x one worker's tokens/s (0.99 of 2x; >= 0.9: met)" in text
    assert "jobs per worker ±1% of the mean (<= ±15%: met)" in text
    assert "4 workers: 3.20x" in text and "(0.80 of 4x; >= 0.9: NOT met)" in text
    assert "±29% of the mean (<= ±15%: NOT met)" in text
    assert "the path saturated first at 4 workers (host:" in text
    busy = report(level(1, 750, [80], QUIET | {"other": 1.5}))
    assert any("other work on the host used up to 1.50 cores" in v for v in sr.verdicts(busy))


def test_the_window_counts_requests_by_when_they_ended_and_ttft_by_when_they_were_sent() -> None:
    results = [
        RequestResult(ok=True, sent=0.0, ttft=0.1, latency=1.0, output_tokens=8),  # ended before
        RequestResult(ok=True, sent=1.5, ttft=0.2, latency=1.0, output_tokens=8),
        RequestResult(ok=False, sent=2.0, ttft=0.3, latency=1.0, output_tokens=8),
        RequestResult(ok=True, sent=3.9, ttft=0.4, latency=1.0, output_tokens=8),  # ends after
    ]
    assert window_tokens_per_s(results, 2.0, 4.0) == 4.0
    assert sr.ttfts_ms(results, 1.0, 4.0) == [200.0, 400.0]
    assert math.isnan(window_tokens_per_s(results, 4.0, 4.0))


def test_the_report_files(tmp_path: Path) -> None:
    rep = report(level(1, 750, [80]), level(2, 1500, [80, 80]))
    doc = json.loads(sr.to_json(rep))
    assert [lv["jobs"] for lv in doc["levels"]] == [[80], [80, 80]]
    assert doc["efficiency"] == {"1": 1.0, "2": 1.0} and doc["imbalance"]["2"] == 0.0
    summary = sr.render_summary(rep)
    assert "| 2 | 64 | 1500 | 2.00 | 1.00 | 80 80 | ±0% | 12 12 |" in summary
    assert "![tokens/s and jobs per worker](scale.png)" in summary
    sr.write_chart(rep, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
