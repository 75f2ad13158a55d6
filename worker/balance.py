"""How a worker shares its model's work with the other live workers: pure policy, proven by table tests.

Workers pull; nothing assigns a job to a worker. Left to itself, pulling is balanced only by luck:
jobs that arrive while workers wait in a blocking ``XREADGROUP`` go to whichever has waited longest
(Redis serves blocked readers first come, first served, and a worker re-queues there each time
its read times out, at an arbitrary phase), and jobs that are already waiting go to whichever worker
reads first, as many as it has room for, while the others are between reads. Measured with two idle
simulated workers: a burst of 24 jobs split 3 : 21, and a steady load of 48 streams 36 : 60 jobs.

So each worker, knowing what every live worker of its model holds now (``XPENDING`` of the model's
streams, one round trip) and their capacities (their heartbeats):

- takes of the jobs waiting only its :func:`share`: its part when they are spread so that every
  worker's load (jobs held / capacity) rises to the same level, and leaves the rest to the others for
  :data:`SHARE_GRACE` seconds (:class:`Spread`); after that anyone with room takes them, so jobs left
  for a worker that died, stalls or has not seen the stream yet wait no longer than that;
- :func:`stands_back` from the next job while it holds more than one job above its fair share of
  the fleet's jobs: it does not wait in a blocking read then, so the jobs that arrive go to the
  workers below their share, which do.

The grace is a trade: where the workers' engines share the host's CPUs (three vLLM CPU engines on
two cores), a worker whose loop gets no CPU for longer than it misses its part of a burst (48 jobs
split as unevenly as 16 : 4 : 28, whether the gateway sent their admissions together or one by
one); a 2 s grace evened that out but kept the burst's jobs waiting for the starved worker, its
rounds up to twice as long (``loadtest/results/2026-12-07-fair-lean/gateway.md``).

A worker alone (no other live worker of its model) reads as before: all it has room for.
Capacity-aware delivery, tenant fairness (:mod:`worker.planner`) and failover are untouched: a share
never exceeds the worker's free slots, it caps how many jobs one read takes in all and the read plan
still spreads them over the tenants' streams, and nothing here decides whose jobs are retaken.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SHARE_GRACE = 0.3
"""Seconds jobs left for other workers stay theirs; after that any worker with room takes them.
Longer than a worker needs to see a new tenant's stream (``STREAMS_REFRESH``) and come round."""
SLACK = 1
"""Jobs a worker may hold above its fair share before it stands back: without any, workers whose
loads differ by one job would stand back in turn."""


@dataclass(frozen=True, slots=True)
class Load:
    """What one worker holds now and how many jobs it runs at most."""

    held: int
    capacity: int

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.held)


def level(waiting: int, loads: Sequence[Load]) -> float:
    """The load fraction (held / capacity) every worker below it would rise to if ``waiting`` jobs
    were spread over ``loads`` to even them out; 1.0 when they fill every slot."""
    fractions = sorted((w.held / w.capacity, w.held, w.capacity) for w in loads if w.capacity > 0)
    held = capacity = 0
    for index, (_, h, c) in enumerate(fractions):
        held, capacity = held + h, capacity + c
        # Between this worker's fraction and the next one's, only the workers so far are filled.
        reached = (waiting + held) / capacity
        upto = fractions[index + 1][0] if index + 1 < len(fractions) else 1.0
        if reached <= upto:
            return min(reached, 1.0)
    return 1.0


def share(waiting: int, me: Load, peers: Sequence[Load]) -> int:
    """Jobs of ``waiting`` this worker takes now: its part when they are spread to even out every
    worker's load. Rounded up, so that workers of equal load each take one rather than each leave
    it to the other."""
    if waiting <= 0 or me.free == 0:
        return 0
    top = level(waiting, [me, *peers])
    part = math.ceil(top * me.capacity - me.held - 1e-9)
    return max(0, min(part, me.free, waiting))


def stands_back(me: Load, peers: Sequence[Load], slack: int = SLACK) -> bool:
    """Whether this worker leaves the next job to the others: it holds more than ``slack`` jobs above
    its fair share of every job the fleet holds (in proportion to its capacity), and some other
    worker has room."""
    if not any(p.free for p in peers):
        return False
    held = me.held + sum(p.held for p in peers)
    capacity = me.capacity + sum(p.capacity for p in peers)
    return me.held > me.capacity * held / capacity + slack


class Spread:
    """Jobs to take of those waiting, remembering since when some were left for the others."""

    def __init__(self, grace: float = SHARE_GRACE) -> None:
        self._grace = grace
        self._left_since: float | None = None

    def take(self, waiting: int, me: Load, peers: Sequence[Load], now: float) -> int:
        """Jobs to read now of ``waiting`` (jobs no worker has taken yet in the streams this worker
        may read): its :func:`share`, or everything it has room for once jobs have been waiting for
        the others for longer than the grace period (they did not come for them)."""
        everything = min(waiting, me.free)
        part = share(waiting, me, peers)
        if part >= everything:
            self._left_since = None
            return everything
        if self._left_since is None:
            self._left_since = now
        if now - self._left_since >= self._grace:
            self._left_since = None
            return everything
        return part

    def settled(self) -> None:
        """Nothing is waiting: no job is left for anyone."""
        self._left_since = None
