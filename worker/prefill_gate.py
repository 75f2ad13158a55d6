"""When a job's prompt enters the engine: one tenant's prompts at a time while tenants share a worker.

The engine prefills every prompt waiting at the start of a step in that step (up to its token
budget), and every sequence in the batch waits for the step to end. A flood's jobs, all of one
length, end together and their successors arrive together: a dozen prompts then share one step
that takes several times a decode step, and the other tenant's prompt that arrives beside them, or
during that step, waits for all of it. Its time to first token follows the flood's waves (the
simulated engine's scheduler, A100 timing, 12 flooding jobs and 4 of another tenant: the other
tenant's TTFT p95 2.6x what it is alone).

So while more than one tenant has jobs on the worker, at most ``limit`` jobs of each tenant wait
for their first token in the engine at once; a tenant's further jobs enter as earlier ones produce
theirs (one step later), spreading a wave of prompts over the steps that decode anyway. Every
tenant's prompts still enter at once up to that number, so a tenant that sends a few jobs at a time
never waits here, and a tenant alone on the worker (a benchmark, a single team) is never held. The
engine's throughput is unchanged: decode steps carry the prompts they would have carried in one
burst. In the same model, the limit at 1 brings that 2.6x to 1.5x, with the flood's own TTFT lower
too and the same tokens/s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping


def may_enter(tenant: str, prefilling: Mapping[str, int], holding: Mapping[str, int], limit: int) -> bool:
    """Whether a job of ``tenant`` may go to the engine now. ``prefilling``: each tenant's jobs in
    the engine without a first token yet; ``holding``: each tenant's jobs on the worker (this one
    included, whether it waits here or runs)."""
    if limit <= 0:
        return True
    if not any(n > 0 for t, n in holding.items() if t != tenant):
        return True  # alone on the worker: nobody to keep room for
    return prefilling.get(tenant, 0) < limit


class Entry:
    """A job past the gate; :meth:`prefilled` once its first output came."""

    def __init__(self, gate: PrefillGate, tenant: str) -> None:
        self._gate = gate
        self._tenant = tenant
        self.waiting_prefill = True

    def prefilled(self) -> None:
        if self.waiting_prefill:
            self.waiting_prefill = False
            self._gate._prefilled(self._tenant)


class PrefillGate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._prefilling: Counter[str] = Counter()
        self._holding: Counter[str] = Counter()
        self._waiters: dict[asyncio.Future[None], None] = {}
        """In the order they came: woken in that order, the first to check goes first."""

    @contextlib.asynccontextmanager
    async def job(self, tenant: str) -> AsyncIterator[Entry]:
        """Hold a place for one job of ``tenant`` until it ends; entered once it may go to the
        engine. Cancelling the wait, or any exit, gives the place back."""
        self._holding[tenant] += 1
        entry: Entry | None = None
        try:
            while not may_enter(tenant, self._prefilling, self._holding, self.limit):
                woken = asyncio.get_running_loop().create_future()
                self._waiters[woken] = None
                try:
                    await woken
                finally:
                    self._waiters.pop(woken, None)
            self._prefilling[tenant] += 1
            entry = Entry(self, tenant)
            yield entry
        finally:
            if entry is not None:
                entry.prefilled()
            self._holding[tenant] -= 1
            if not self._holding[tenant]:
                del self._holding[tenant]
            self._wake()

    @property
    def waiting(self) -> int:
        """Jobs waiting to enter."""
        return len(self._waiters)

    def _prefilled(self, tenant: str) -> None:
        self._prefilling[tenant] -= 1
        if not self._prefilling[tenant]:
            del self._prefilling[tenant]
        self._wake()

    def _wake(self) -> None:
        """Let every waiter check again (few wait at once: jobs of tenants over their limit)."""
        for woken in self._waiters:
            if not woken.done():
                woken.set_result(None)
