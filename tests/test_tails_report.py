"""loadtest/tails.py's reading of two /metrics pages: what the run between them observed."""

from __future__ import annotations

import math

from loadtest.tails import Histogram, parse, rows

BEFORE = """\
# HELP switchyard:worker_queue_time_seconds Enqueue (gateway clock) to taken by this worker
# TYPE switchyard:worker_queue_time_seconds histogram
switchyard:worker_queue_time_seconds_bucket{le="0.01",model="a"} 2.0
switchyard:worker_queue_time_seconds_bucket{le="0.05",model="a"} 3.0
switchyard:worker_queue_time_seconds_bucket{le="+Inf",model="a"} 4.0
switchyard:worker_queue_time_seconds_sum{model="a"} 0.5
switchyard:worker_queue_time_seconds_count{model="a"} 4.0
switchyard:worker_queue_time_seconds_created{model="a"} 1.7e9
switchyard:jobs_total{model="a"} 9.0
"""

AFTER = """\
switchyard:worker_queue_time_seconds_bucket{le="0.01",model="a"} 12.0
switchyard:worker_queue_time_seconds_bucket{le="0.05",model="a"} 93.0
switchyard:worker_queue_time_seconds_bucket{le="+Inf",model="a"} 104.0
switchyard:worker_queue_time_seconds_sum{model="a"} 3.5
switchyard:worker_queue_time_seconds_count{model="a"} 104.0
switchyard:worker_queue_time_seconds_bucket{le="0.01",model="b"} 0.0
switchyard:worker_queue_time_seconds_bucket{le="0.05",model="b"} 0.0
switchyard:worker_queue_time_seconds_bucket{le="+Inf",model="b"} 0.0
switchyard:worker_queue_time_seconds_sum{model="b"} 0.0
switchyard:worker_queue_time_seconds_count{model="b"} 0.0
"""


def test_a_page_gives_its_histograms_with_label_sets_added_up() -> None:
    found = parse(AFTER)
    assert list(found) == ["switchyard:worker_queue_time_seconds"]  # counters are not histograms
    h = found["switchyard:worker_queue_time_seconds"]
    assert h.buckets == {0.01: 12.0, 0.05: 93.0, math.inf: 104.0}
    assert (h.total, h.count) == (3.5, 104.0)


def test_the_run_is_the_difference_and_its_quantiles_are_bucket_bounds() -> None:
    run = parse(AFTER)["switchyard:worker_queue_time_seconds"].minus(
        parse(BEFORE)["switchyard:worker_queue_time_seconds"]
    )
    assert run.buckets == {0.01: 10.0, 0.05: 90.0, math.inf: 100.0}
    assert run.mean == 0.03
    assert (run.bound(0.1), run.bound(0.5), run.bound(0.9), run.bound(0.99)) == (0.01, 0.05, 0.05, math.inf)
    assert math.isnan(Histogram().mean)


def test_rows_name_each_histogram_the_run_observed() -> None:
    before = {"worker": parse(BEFORE)}
    after = {"worker": parse(AFTER), "gateway": {}}
    (row,) = rows(before, after)
    assert row["figure"].startswith("worker queue time") and row["count"] == 100
    assert math.isclose(row["mean_ms"], 30.0) and row["p50_under_ms"] == 50.0
    assert rows(after, after) == []  # nothing observed between two equal readings
