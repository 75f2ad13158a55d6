"""The autoscaling decision (scaling/decision.py) as tables: pure, no Redis, no processes."""

from __future__ import annotations

import math

import pytest

from scaling.decision import Load, Memory, Policy, decide, needed

POLICY = Policy(
    min_workers=0, max_workers=4, target_utilization=0.5, max_queue_wait=5, scale_down_after=60, cooldown=10
)


@pytest.mark.parametrize(
    ("load", "expected"),
    [
        (Load(waiting=0, running=0, workers=0, capacity=8), 0),  # idle: nothing
        (Load(waiting=1, running=0, workers=0, capacity=8), 1),  # activation from zero
        (Load(waiting=3, running=4, workers=1, capacity=8), 2),  # 7 jobs at 4 a worker
        (Load(waiting=100, running=8, workers=1, capacity=8), 4),  # capped by max_workers
        (Load(waiting=0, running=4, workers=2, capacity=8), 1),  # what runs fits one worker
        # a backlog the fleet drains within max_queue_wait needs no start-up ...
        (Load(waiting=20, running=8, workers=2, capacity=8, drain_rate=10.0), 2),
        # ... one it does not does
        (Load(waiting=20, running=8, workers=2, capacity=8, drain_rate=1.0), 4),
        # drain rate unknown: the backlog counts
        (Load(waiting=20, running=8, workers=2, capacity=8, drain_rate=0.0), 4),
    ],
)
def test_workers_needed(load: Load, expected: int) -> None:
    assert needed(load, POLICY) == expected


def test_min_workers_hold_even_when_idle() -> None:
    assert needed(Load(0, 0, workers=0, capacity=8), Policy(min_workers=2, max_workers=4)) == 2


def test_scale_up_is_immediate_and_scale_down_waits_then_goes_one_by_one() -> None:
    memory, t = Memory(), 0.0
    burst = Load(waiting=30, running=0, workers=0, capacity=8)
    d = decide(burst, POLICY, memory, t)
    assert d.desired == 4
    memory = d.memory
    # Demand gone: nothing changes for scale_down_after seconds.
    idle = Load(waiting=0, running=0, workers=4, capacity=8)
    for t in (1.0, 30.0, 59.0):
        d = decide(idle, POLICY, memory, t)
        assert d.desired == 4, t
        memory = d.memory
    # Then one worker at a time, cooldown seconds apart, down to min_workers (0).
    steps = []
    workers = 4
    for t in [60.0 + i for i in range(0, 45)]:
        d = decide(Load(0, 0, workers=workers, capacity=8), POLICY, memory, t)
        memory = d.memory
        if d.desired != workers:
            steps.append(t)
            workers = d.desired
    assert workers == 0
    assert steps == [61.0, 71.0, 81.0, 91.0]  # low since 1.0 s


def test_a_dip_shorter_than_scale_down_after_keeps_the_workers() -> None:
    memory = Memory()
    busy = Load(waiting=0, running=6, workers=2, capacity=8)
    quiet = Load(waiting=0, running=1, workers=2, capacity=8)
    for t, load in [(0.0, busy), (10.0, quiet), (50.0, quiet), (55.0, busy), (100.0, quiet), (150.0, quiet)]:
        d = decide(load, POLICY, memory, t)
        memory = d.memory
        assert d.desired == 2, t  # the low spell restarted at 100 s: not yet 60 s long at 150 s
    assert decide(quiet, POLICY, memory, 160.0).desired == 1


def test_a_lowered_maximum_applies_at_once() -> None:
    d = decide(Load(0, 8, workers=4, capacity=8), Policy(max_workers=2), Memory(), 0.0)
    assert d.desired == 2


def test_no_demand_no_workers_is_steady() -> None:
    d = decide(Load(0, 0, workers=0, capacity=8), POLICY, Memory(), 0.0)
    assert (d.desired, d.reason) == (0, "steady")
    assert d.memory.changed_at == -math.inf
