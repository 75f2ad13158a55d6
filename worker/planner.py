"""How many jobs a worker takes from each tenant's stream: pure policy, proven by table tests.

:class:`ReadPlan` shares each read between priority classes and tenants; :class:`Headroom` keeps
room for tenants that used the worker (or, in a fleet, any worker: :func:`fleet_shares`) lately
while another floods it; :func:`within` caps a plan by that room.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping


class Headroom:
    """Room a worker keeps for other tenants while one floods it, so their jobs need not wait.

    Per-tenant streams decide who goes next only when a slot frees up. A flood that holds every slot
    makes another tenant's job wait for the flood's jobs to end (and jobs of equal length end
    together, in waves). So while other streams are active (they held slots within the last
    ``window`` seconds), a stream may hold at most ``capacity`` minus the slots the others held at
    their recent peaks, counting at least one each, and keeping at most a quarter of the capacity
    for them. An active stream thus finds a free slot at once, up to what it used lately; a stream
    alone on the worker, or whose peers went quiet for ``window`` seconds, may use every slot. Room
    is kept only for streams of the same or a higher priority class: batch tenants yield.
    """

    def __init__(self, window: float, capacity: int) -> None:
        self._window = window
        self._capacity = capacity
        self._peaks: dict[str, tuple[int, float]] = {}  # active stream -> (peak held, when reached)

    def update(self, held: Counter[str], now: float) -> None:
        """Record the slots each stream holds now (in a fleet: its share, see :func:`fleet_shares`)."""
        for stream in set(self._peaks) | set(held):
            count = held.get(stream, 0)
            peak, at = self._peaks.get(stream, (0, now))
            if count >= peak or now - at > self._window:
                peak, at = count, now
            if peak:
                self._peaks[stream] = (peak, at)
            else:
                self._peaks.pop(stream, None)

    def room(
        self, streams: Iterable[str], held: Counter[str], free: int, weights: dict[str, int] | None = None
    ) -> dict[str, int]:
        """Free slots each of ``streams`` may take now (streams with none are left out). With
        ``weights`` (priority class weights), a stream keeps room only for streams weighing as much
        or more: a batch tenant's recent jobs do not hold an interactive flood back."""
        limit = self._capacity // 4 if self._window > 0 else 0
        weight = (weights or {}).get
        wanted = {s: max(1, peak) for s, (peak, _) in self._peaks.items()}
        rooms = {}
        for stream in streams:
            others = (n for s, n in wanted.items() if s != stream and weight(s, 1) >= weight(stream, 1))
            kept = min(limit, sum(others))
            room = min(free, self._capacity - kept - held.get(stream, 0))
            if room > 0:
                rooms[stream] = room
        return rooms


def fleet_shares(pending: Mapping[str, int], capacity: int, fleet_capacity: int) -> Counter[str]:
    """The slots each stream's jobs would hold on this worker if every job the fleet runs were
    spread over its workers by capacity (rounded up): what :class:`Headroom` remembers in a fleet.

    A worker's own counts say little there: a tenant's jobs land on any worker, and one that has
    not had any lately would keep no room for it and let a flood take every slot, on every worker
    in turn, until the tenant's jobs wait for the flood's to end wherever they arrive. Its share of
    the tenant's jobs across the fleet is what the tenant will want of this worker next."""
    if fleet_capacity <= 0:
        return Counter()
    return Counter({s: math.ceil(n * capacity / fleet_capacity) for s, n in pending.items() if n > 0})


class ReadPlan:
    """How many jobs to take from each tenant stream in one read, weighted by priority class.

    XREADGROUP's COUNT applies to each stream it names, so one read over every tenant's stream takes
    up to COUNT from each: a tenant flooding its stream gets no more per read than a tenant with one
    job waiting. Priority classes are read separately, with per-stream counts in proportion to their
    weights; fractions carry over between reads (a deficit round robin), so interactive 4 : batch 1
    holds even when the worker has room for one job at a time.

    A read may take all the room it is given: a worker alone takes a whole burst in one read (jobs
    of equal length end together, and their successors arrive together), and in a fleet
    :mod:`worker.balance` has already cut the room to this worker's share of the jobs waiting.
    """

    def __init__(self) -> None:
        self._credit: dict[int, float] = {}

    def plan(self, weights: dict[str, int], free: int) -> list[tuple[list[str], int]]:
        """(streams, count per stream) for each class due a read now, highest weight first."""
        if not weights:
            return []
        top = max(weights.values())
        per_stream = max(1, free * top // sum(weights.values()))
        reads = []
        for weight in sorted(set(weights.values()), reverse=True):
            share = per_stream * weight / top
            credit = min(self._credit.get(weight, 0.0) + share, max(share, 1.0))
            count = int(credit)
            self._credit[weight] = credit - count
            if count:
                reads.append(([s for s, w in weights.items() if w == weight], count))
        return reads


def within(reads: list[tuple[list[str], int]], rooms: dict[str, int]) -> list[tuple[list[str], int]]:
    """``reads`` with no stream asked for more jobs than its room (see :class:`Headroom`)."""
    out = []
    for names, count in reads:
        by_count: dict[int, list[str]] = {}
        for name in names:
            by_count.setdefault(min(count, rooms[name]), []).append(name)
        out += [(group, n) for n, group in sorted(by_count.items(), reverse=True)]
    return out
