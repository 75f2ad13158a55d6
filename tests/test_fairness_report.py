"""The fairness report from synthetic requests and queue samples: windows, queues, table, notes, JSON."""

from __future__ import annotations

import json
import math

import pytest

from loadtest import fairreport as fr
from loadtest.benchreport import BenchConfig, BenchReport, RequestResult, summarize, window_tokens_per_s

CFG = BenchConfig(base_url="http://h/v1", model="m", concurrency=4, requests=0, output_tokens=8)


def request(sent: float, ttft: float, latency: float, ok: bool = True, tokens: int = 8) -> RequestResult:
    return RequestResult(ok=ok, sent=sent, ttft=ttft, latency=latency, chunks=tokens, output_tokens=tokens,
                         finish_reason="length", error=None if ok else "HTTP 503: overloaded")  # fmt: skip


def report(ttfts: list[float], wall: float = 10.0, errors: int = 0) -> BenchReport:
    results = [request(i, t, t + 0.5) for i, t in enumerate(ttfts)]
    results += [request(99, 0.1, 0.1, ok=False) for _ in range(errors)]
    return summarize(CFG, 48, results, wall, cpu=1.0, warmup_errors=0)


def sample(
    t: float, a: tuple[int, int], b: tuple[int, int] = (0, 0), engine: tuple[int, int] = (16, 0)
) -> fr.QueueSample:
    """Backlog (XLEN) and running (XPENDING) of A and B, engine running and waiting."""
    return fr.QueueSample(t, a[0], a[1], b[0], b[1], engine[0], engine[1])


def test_window_counts_successful_requests_that_finished_inside_it() -> None:
    results = [
        request(0.0, 0.1, 1.0),  # ends at 1.0: before the window
        request(1.5, 0.1, 1.0),  # ends at 2.5: inside
        request(2.0, 0.1, 2.0, tokens=4),  # ends at 4.0: inside, on the edge
        request(3.0, 0.1, 0.5, ok=False),  # failed: its tokens do not count
        request(3.5, 0.1, 1.0),  # ends at 4.5: after
    ]
    assert window_tokens_per_s(results, 2.0, 4.0) == pytest.approx((8 + 4) / 2.0)
    assert math.isnan(window_tokens_per_s(results, 4.0, 4.0))


def test_queue_summary_uses_the_window_and_subtracts_running_jobs() -> None:
    samples = [
        sample(0.5, (40, 16)),  # before B's window: left out
        sample(1.0, (40, 16), (2, 2)),
        sample(2.0, (36, 16), (3, 1), engine=(16, 2)),
        sample(9.0, (0, 0)),  # after it
    ]
    q = fr.queue_summary(samples, 1.0, 2.0)
    assert q["samples"] == 2
    assert (q["flooder_waiting_mean"], q["flooder_waiting_max"]) == (22.0, 24.0)
    assert q["flooder_running_mean"] == 16.0
    assert (q["victim_waiting_mean"], q["victim_waiting_max"]) == (1.0, 2.0)
    assert (q["engine_running_mean"], q["engine_waiting_max"]) == (16.0, 2.0)
    assert set(fr.queue_summary(samples, 20.0, 30.0).values()) == {0.0, None}


def fairness(queue_flood: dict[str, float | None] | None = None, victim_errors: int = 0) -> fr.FairnessReport:
    samples = [sample(1.0, (30, 16), (1, 1)), sample(2.0, (34, 16), (2, 1))]
    return fr.FairnessReport(
        options={"concurrency": 4, "flood_concurrency": 40, "flooder_priority": "interactive"},
        alone=report([0.1] * 19 + [0.2]),
        victim=report([0.1] * 19 + [0.3], errors=victim_errors),
        flooder=report([1.0] * 20, wall=12.0),
        flood_tokens_per_s=250.0,
        queue_alone=fr.queue_summary([sample(1.0, (0, 0), engine=(4, 0))], 0.0, 10.0),
        queue_flood=queue_flood if queue_flood is not None else fr.queue_summary(samples, 0.0, 10.0),
        worker_capacity=16,
    )


def test_table_compares_b_alone_with_b_under_the_flood() -> None:
    rep = fairness()
    rows = {r[0]: r[1:] for r in fr.table_rows(rep)}
    assert rows[""] == ["B alone", "B + A's flood", "flood / alone"]
    alone_p95, flood_p95 = rep.alone.ttft_p95_ms, rep.victim.ttft_p95_ms
    assert rows["B TTFT p95 (ms)"] == [f"{alone_p95:.0f}", f"{flood_p95:.0f}", f"{flood_p95 / alone_p95:.2f}"]
    assert rep.ttft_p95_ratio == pytest.approx(flood_p95 / alone_p95)
    assert rows["A TTFT p50 / p95 (ms)"] == ["-", "1000 / 1000", "-"]
    assert rows["all output tokens/s"] == ["16", "250", f"{250 / 16:.2f}"]  # 20 requests x 8 tokens / 10 s
    assert rows["A jobs waiting in Redis, mean / max"] == ["-", "16.0 / 18.0", "-"]
    assert rows["B jobs waiting in Redis, mean / max"] == ["0.0 / 0.0", "0.5 / 1.0", "-"]
    text = fr.render_text(rep)
    assert text.startswith(f"B's TTFT p95: {alone_p95:.0f} ms alone, {flood_p95:.0f} ms under A's flood (x")
    assert "A: 40 streams (interactive), B: 4 streams (interactive), 1 vllm worker(s) with 16 slots" in text
    assert "WARNING" not in text


def test_the_shared_queue_phase_adds_its_column_and_ratio() -> None:
    rep = fairness()
    rep.shared_queue = report([0.9] * 19 + [1.2], errors=1)
    rows = {r[0]: r[1:] for r in fr.table_rows(rep)}
    assert rows[""] == ["B alone", "B + A's flood", "flood / alone", "B in A's queue", "A's queue / alone"]
    alone_p95, shared_p95 = rep.alone.ttft_p95_ms, rep.shared_queue.ttft_p95_ms
    assert rows["B TTFT p95 (ms)"][3:] == [f"{shared_p95:.0f}", f"{shared_p95 / alone_p95:.2f}"]
    assert rows["B requests ok / errors"] == ["20 / 0", "20 / 0", "-", "20 / 1", "-"]
    assert rows["A TTFT p50 / p95 (ms)"] == ["-", "1000 / 1000", "-", "-", "-"]
    assert rep.shared_ttft_p95_ratio == pytest.approx(shared_p95 / alone_p95)
    text = fr.render_text(rep)
    assert f", {shared_p95:.0f} ms in A's queue (x{shared_p95 / alone_p95:.2f})" in text.splitlines()[0]
    assert any(n.startswith("1 requests failed") for n in fr.notes(rep))
    assert json.loads(fr.to_json(rep))["shared_ttft_p95_ratio"] == pytest.approx(rep.shared_ttft_p95_ratio)


def test_gateway_split_is_the_mean_over_the_phase_and_adds_rows() -> None:
    from loadtest.fairness import gateway_split
    from loadtest.tails import Histogram

    before = {
        "queue": Histogram({0.005: 9.0, 0.25: 10.0, math.inf: 10.0}, 1.0, 10.0),
        "ttft": Histogram({}, 2.0, 10.0),
        "lag": Histogram({0.005: 90.0, 0.025: 100.0}, 0.1, 100.0),
    }
    after = {
        "queue": Histogram({0.005: 17.0, 0.25: 19.0, math.inf: 20.0}, 1.5, 20.0),
        "ttft": Histogram({}, 3.0, 20.0),
        "lag": Histogram({0.005: 200.0, 0.025: 299.0}, 0.5, 300.0),
    }
    split = gateway_split(before, after)
    assert split["queue_mean_ms"] == pytest.approx(50.0) and split["ttft_mean_ms"] == pytest.approx(100.0)
    # the loop was looked at 200 times in the phase, 0.4 s late in all; 199 of them within 25 ms
    assert split["lag_mean_ms"] == pytest.approx(2.0) and split["lag_p99_le_ms"] == pytest.approx(25.0)
    # of the phase's 10 waits, 8 within 5 ms, 9 within 250 ms, the last beyond: p99 only under +Inf
    assert split["queue_p99_le_ms"] == float("inf") and split["ttft_p99_le_ms"] is None
    after["queue"].buckets[0.25] = 20.0  # all 10 within 250 ms
    assert gateway_split(before, after)["queue_p99_le_ms"] == pytest.approx(250.0)
    nothing = {f"{k}_{stat}": None for k in ("queue", "ttft", "lag") for stat in ("mean_ms", "p99_le_ms")}
    assert gateway_split(before, before) == nothing  # no requests, and no look at the loop
    assert gateway_split(None, after) == nothing  # no metrics
    rep = fairness()
    rows = {r[0]: r[1:] for r in fr.table_rows(rep)}
    assert "B mean TTFT at the gateway (ms)" not in rows  # not measured: no rows
    rep.gateway_alone = {"queue_mean_ms": 2.0, "ttft_mean_ms": 20.0, "queue_p99_le_ms": 5.0}
    rep.gateway_flood = split
    rows = {r[0]: r[1:] for r in fr.table_rows(rep)}
    assert rows["B mean TTFT at the gateway (ms)"] == ["20", "100", "5.00"]
    assert rows["  of which waiting to start (ms)"] == ["2", "50", "25.00"]
    assert rows["B wait to start p99, bucket bound (ms)"][0] == "5"
    assert rows["gateway event-loop lag, mean (ms)"] == ["-", "2", "-"]


def test_cpu_rows_show_the_host_and_each_process_when_measured() -> None:
    rep = fairness()
    assert "host CPU busy (cores)" not in {r[0] for r in fr.table_rows(rep)}
    rep.cpu_alone = {"gateway": 0.1, "worker-1": 0.05, "client": 0.04, "host": 0.5, "other": 0.31}
    rep.cpu_flood = {"gateway": 0.4, "worker-1": 0.2, "client": 0.3, "host": 1.9, "other": 1.0}
    rows = {r[0]: r[1:] for r in fr.table_rows(rep)}
    assert rows["host CPU busy (cores)"] == ["0.50", "1.90", "-"]
    assert rows["  of it others' work"] == ["0.31", "1.00", "-"]
    assert rows["  gateway"] == ["0.10", "0.40", "-"] and rows["  worker-1"] == ["0.05", "0.20", "-"]


def test_notes_say_when_there_was_no_queue_or_the_engine_queued() -> None:
    no_queue = fr.queue_summary([sample(1.0, (16, 16))], 0.0, 10.0)
    assert any("never had jobs waiting" in n for n in fr.notes(fairness(no_queue)))
    unseen = fr.queue_summary([], 0.0, 10.0)
    assert any("not observed" in n for n in fr.notes(fairness(unseen)))
    engine = fr.queue_summary([sample(1.0, (30, 16), engine=(16, 5))], 0.0, 10.0)
    assert any("up to 5 sequences" in n for n in fr.notes(fairness(engine)))
    assert any(n.startswith("2 requests failed, e.g. HTTP 503") for n in fr.notes(fairness(victim_errors=2)))


def test_json_is_strict_and_holds_every_part() -> None:
    rep = fairness(fr.queue_summary([], 0.0, 10.0))
    text = fr.to_json(rep)
    assert "NaN" not in text  # Python's json would read it back; strict JSON parsers would not
    doc = json.loads(text)
    assert doc["queue_flood"]["flooder_waiting_max"] is None
    assert doc["ttft_p95_ratio"] == pytest.approx(rep.ttft_p95_ratio)
    assert doc["victim"]["config"]["concurrency"] == 4 and len(doc["flooder"]["requests"]) == 20
