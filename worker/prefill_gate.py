"""When a job's prompt enters the engine: a tenant's prompts at the pace its jobs end, not in waves,
while tenants share a worker.

The engine prefills every prompt waiting at the start of a step in that step (up to its token
budget), and every sequence in the batch waits for the step to end. A flood's jobs, all of one
length, end together and their successors arrive together: a dozen prompts then share one step
that takes several times a decode step, and the other tenant's prompt that arrives beside them, or
during that step, waits for all of it. Its time to first token follows the flood's waves.

So while more than one tenant has jobs on the worker, a tenant holding more than an equal share
of them has its jobs wait here while enough of its earlier ones are in the engine without a first
token: enough to keep up with how fast its jobs end (:func:`allowed`), and at least ``limit``. A
tenant whose jobs run many tokens each (the flood above) then sends one prompt at a time, which
rides on a decode step that runs anyway; a tenant of short jobs (classification, one token each)
keeps as many prompts in flight as its rate needs, so pacing never costs throughput. A tenant
alone on the worker (a benchmark, a single team) is never held, nor one within its share.

Run through the simulated engine's scheduler (:mod:`worker.sim_batch`, A100 timing, each client
sending again 2-20 ms after an answer; ``loadtest/fairness.py`` measures the whole system): 12
flooding jobs of 64 tokens beside 4 of another tenant, capacity 16: that tenant's TTFT p95 went
from 2.6x its p95 alone to 1.3x, the flood's own TTFT p50 from 99 to 33 ms, tokens/s the same. 60
jobs of 16 tokens beside it, capacity 64: its p95 275 -> 131 ms, same tokens/s. 64 one-token jobs
beside it: unchanged, 169 jobs/s (a fixed one prompt at a time would have cut them to 51).

Off unless ``SWITCHYARD_PREFILL_PER_TENANT`` sets ``limit``: it pays where a step costs the same with
a prompt riding along, as on GPUs (the simulated workers, A100 timing: the other tenant's p95 under
a 10x flood from 2.48x its p95 alone to 1.14-1.20x, same tokens/s). On vLLM's CPU backend, where
every token a step computes costs time, it cost a third of the tokens/s and did not help
(``loadtest/results/2026-12-02-fairness-gate/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Mapping

HANDOFF_STEPS = 2.0
"""Engine steps, at the least, from one prompt entering to the next one's turn: the step that makes
its first token, and the one already under way when this worker hears of it. Measured when it is
more (:attr:`PrefillGate.handoff`): on a small CPU host the engine's steps are a few milliseconds
and a prompt's way to its first token (the engine's queue, its process, this worker's event loop)
is many of them."""
MARGIN = 2.0
"""How many times the prompts a tenant needs in flight to keep up it may have."""
SMOOTHING = 0.2
"""Weight of a new observation in a moving average (a job's length, a prompt's time to its first
token, a decoded token's time)."""


def allowed(ending_per_step: float, limit: int, handoff: float = HANDOFF_STEPS) -> int:
    """Prompts of one tenant that may wait for their first token at once: ``limit``, or as many as
    keep up with its jobs ending ``ending_per_step`` per engine step when each prompt in flight
    lets the next one in after ``handoff`` steps."""
    return max(limit, math.ceil(ending_per_step * handoff - 1e-9))


def may_enter(
    tenant: str,
    prefilling: Mapping[str, int],
    holding: Mapping[str, int],
    ending: Mapping[str, float],
    limit: int,
    handoff: float = HANDOFF_STEPS,
) -> bool:
    """Whether a job of ``tenant`` may go to the engine now. ``prefilling``: each tenant's jobs in
    the engine without a first token yet; ``holding``: its jobs on the worker (this one included,
    whether it waits here or runs); ``ending``: how many of its jobs end per engine step. Only a
    tenant holding more than an equal share of the worker's jobs is paced: the others' prompts are
    the ones the pacing is for."""
    if limit <= 0:
        return True
    sharing = [n for n in holding.values() if n > 0]
    if len(sharing) < 2:
        return True  # alone on the worker: nobody to keep room for
    if holding.get(tenant, 0) * len(sharing) <= sum(sharing):
        return True  # within its fair share of the worker's jobs: it is not the flood
    return prefilling.get(tenant, 0) < allowed(ending.get(tenant, 0.0), limit, handoff)


class Entry:
    """A job past the gate: :meth:`prefilled` once its first output came, :meth:`finished` with
    the tokens each of its choices generated."""

    def __init__(self, gate: PrefillGate, tenant: str) -> None:
        self._gate = gate
        self._tenant = tenant
        self._entered = time.monotonic()
        self._first: float | None = None

    def prefilled(self) -> None:
        if self._first is None:
            self._first = time.monotonic()
            self._gate._prefilled(self._tenant, self._first - self._entered)

    def _leave(self) -> None:
        """Ended without a first token (cancelled, failed): its place, and no time learned."""
        if self._first is None:
            self._first = time.monotonic()
            self._gate._prefilled(self._tenant, None)

    def finished(self, tokens_per_choice: float) -> None:
        """The job ran to its end: what it generated teaches the gate its tenant's job length and
        the engine's time per decoded token."""
        per_token = None
        if self._first is not None and tokens_per_choice > 1:
            per_token = (time.monotonic() - self._first) / (tokens_per_choice - 1)
        self._gate._learn(self._tenant, tokens_per_choice, per_token)


class _Ungated(Entry):
    """What a gate that is off hands out: nothing to count, nothing to learn."""

    def __init__(self) -> None:
        pass

    def prefilled(self) -> None:
        pass

    def finished(self, tokens_per_choice: float) -> None:
        pass


UNGATED = _Ungated()


class PrefillGate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._prefilling: Counter[str] = Counter()
        self._holding: Counter[str] = Counter()
        self._ending: defaultdict[str, float] = defaultdict(float)
        """Per tenant, the sum over its jobs here of 1 / their expected length: jobs ending per step."""
        self._length: dict[str, float] = {}
        """Per tenant, the mean tokens its choices generated (a moving average)."""
        self._prefill_s: float | None = None
        """Mean seconds from a prompt entering to its first token."""
        self._token_s: float | None = None
        """Mean seconds per decoded token of a job."""
        self._lines: defaultdict[str, deque[object]] = defaultdict(deque)
        """Per tenant, its jobs waiting to enter, in the order they came: only the first may."""
        self._waiters: dict[asyncio.Future[None], None] = {}

    @contextlib.asynccontextmanager
    async def job(self, tenant: str, max_tokens: int) -> AsyncIterator[Entry]:
        """Hold a place for one job of ``tenant`` until it ends; entered once it may go to the
        engine, after the tenant's jobs that came before it. Cancelling the wait, or any exit,
        gives the place back."""
        if self.limit <= 0:  # off: no bookkeeping on every job's way to the engine
            yield UNGATED
            return
        length = max(1.0, min(float(max_tokens), self._length.get(tenant, math.inf)))
        self._holding[tenant] += 1
        self._ending[tenant] += 1 / length
        line = self._lines[tenant]
        line.append(ticket := object())
        entry: Entry | None = None
        self._wake()  # the shares changed: a waiter of another tenant may be within its own now
        try:
            while line[0] is not ticket or not may_enter(
                tenant, self._prefilling, self._holding, self._ending, self.limit, self.handoff
            ):
                woken = asyncio.get_running_loop().create_future()
                self._waiters[woken] = None
                try:
                    await woken
                finally:
                    self._waiters.pop(woken, None)
            line.popleft()
            ticket = None
            self._forget(tenant, line)
            self._prefilling[tenant] += 1
            entry = Entry(self, tenant)
            self._wake()  # the next of its line may enter too
            yield entry
        finally:
            if ticket is not None:  # left while waiting in line
                line.remove(ticket)
                self._forget(tenant, line)
            if entry is not None:
                entry._leave()
            self._holding[tenant] -= 1
            self._ending[tenant] -= 1 / length
            if not self._holding[tenant]:
                del self._holding[tenant], self._ending[tenant]
            self._wake()

    def _forget(self, tenant: str, line: deque[object]) -> None:
        """Drop a tenant's line once nobody waits in it (and only that line: a newer one may
        have replaced it)."""
        if not line and self._lines.get(tenant) is line:
            del self._lines[tenant]

    @property
    def waiting(self) -> int:
        """Jobs waiting to enter."""
        return len(self._waiters)

    @property
    def handoff(self) -> float:
        """Engine steps from a prompt entering to the next one's turn, with :data:`MARGIN`."""
        if self._prefill_s is None or not self._token_s:
            return HANDOFF_STEPS
        return max(HANDOFF_STEPS, MARGIN * self._prefill_s / self._token_s)

    def _prefilled(self, tenant: str, seconds: float | None) -> None:
        if seconds is not None:
            self._prefill_s = _mean(self._prefill_s, seconds)
        self._prefilling[tenant] -= 1
        if not self._prefilling[tenant]:
            del self._prefilling[tenant]
        self._wake()

    def _learn(self, tenant: str, tokens: float, per_token: float | None) -> None:
        self._length[tenant] = _mean(self._length.get(tenant), tokens)
        if per_token is not None:
            self._token_s = _mean(self._token_s, per_token)

    def _wake(self) -> None:
        """Let every waiter check again (few wait at once: jobs of tenants over their limit)."""
        for woken in self._waiters:
            if not woken.done():
                woken.set_result(None)


def _mean(before: float | None, sample: float) -> float:
    return sample if before is None else before + SMOOTHING * (sample - before)
