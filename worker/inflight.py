"""The jobs a worker holds right now: their tasks and claims, why any of them was stopped, and the
jobs it stopped to make room for another tenant's (parked: still its own, to resume first)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

from worker.channel import Claim
from worker.outcome import StopReason
from worker.preempt import resumable


class Inflight:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: dict[str, tuple[asyncio.Task[None], Claim]] = {}
        self._stopped: dict[str, StopReason] = {}
        self._parked: dict[str, Claim] = {}
        """Jobs stopped by :meth:`preempt`: their entries stay pending under this worker (its claim
        keeper keeps them fresh), and they resume here, oldest first, before it reads new jobs."""
        self.room = asyncio.Event()
        """Set while the worker can take another job."""
        self.room.set()
        self.finished = asyncio.Event()
        """Set whenever a job ends (readers clear it before waiting on it)."""

    def __len__(self) -> int:
        return len(self._jobs)

    def free(self) -> int:
        return self.capacity - len(self._jobs)

    def add(self, claim: Claim, task: asyncio.Task[None]) -> None:
        self._jobs[claim.job.id] = (task, claim)
        if len(self._jobs) >= self.capacity:
            self.room.clear()

    def remove(self, job_id: str, ended: bool = False) -> None:
        """A job's task ended; a preempted job's claim is parked (see :meth:`parked`), unless the
        job ran to its end (``ended``) before the preemption reached it."""
        held = self._jobs.pop(job_id, None)
        if self._stopped.pop(job_id, None) == "preempted" and held is not None and not ended:
            self._parked[job_id] = replace(held[1], handed_back=True)  # resumes from its progress
        if len(self._jobs) < self.capacity:  # a job started by preempting another may end first
            self.room.set()
        self.finished.set()

    def claim(self, job_id: str) -> Claim | None:
        held = self._jobs.get(job_id)
        return held[1] if held else None

    def tasks(self) -> list[asyncio.Task[None]]:
        return [task for task, _ in self._jobs.values()]

    def held(self) -> Counter[str]:
        """Jobs held per stream."""
        return Counter(claim.stream for _, claim in self._jobs.values())

    def running(self) -> Counter[str]:
        """Jobs held per stream, less those stopped and about to leave."""
        jobs = self._jobs.items()
        return Counter(claim.stream for job_id, (_, claim) in jobs if job_id not in self._stopped)

    def entries(self) -> dict[str, list[str]]:
        """Stream -> ids of the entries held on it, parked ones too. Safe to call from another
        thread: one C-level copy of each table, under the GIL."""
        by_stream: dict[str, list[str]] = {}
        claims = [claim for _, claim in list(self._jobs.values())] + list(self._parked.copy().values())
        for claim in claims:
            by_stream.setdefault(claim.stream, []).append(claim.entry_id)
        return by_stream

    def parked(self) -> list[Claim]:
        """Jobs stopped to make room for another tenant's, oldest first."""
        return list(self._parked.values())

    def unpark(self, job_id: str) -> Claim | None:
        """Take a parked job back (to resume it, hand it back, or because it was lost or cancelled)."""
        return self._parked.pop(job_id, None)

    def preemptible(self) -> Counter[str]:
        """Jobs per stream that could be stopped for another tenant's (see :mod:`worker.preempt`)."""
        return Counter(claim.stream for _, claim in self._preemptible())

    def _preemptible(self) -> list[tuple[str, Claim]]:
        """(job id, claim) of the running jobs that can resume from their progress, oldest first."""
        jobs = self._jobs.items()
        return [(i, claim) for i, (_, claim) in jobs if i not in self._stopped and resumable(claim.job)]

    def preempt(self, stream: str) -> str | None:
        """Stop one of the stream's jobs that can resume from its progress, to be parked: the newest
        that was never stopped before (a job taken up again is not stopped twice while others are
        there), else the newest. Its id, or None if the stream has no such job."""
        jobs = [
            (claim.handed_back, job_id) for job_id, claim in self._preemptible() if claim.stream == stream
        ]
        if not jobs:
            return None
        fresh = [job_id for back, job_id in jobs if not back]
        job_id = (fresh or [job_id for _, job_id in jobs])[-1]
        self.stop(job_id, "preempted")
        return job_id

    def stop(self, job_id: str, reason: StopReason) -> bool:
        """Cancel a job's task, remembering why; False if the job is not here."""
        held = self._jobs.get(job_id)
        if held is None:
            return False
        self._stopped[job_id] = reason
        held[0].cancel()
        return True

    def stop_entry(self, stream: str, entry_id: str, reason: StopReason) -> str | None:
        """Cancel the job of a stream entry (or forget it, parked); its id, or None if no held job
        has that entry."""
        for job_id, claim in list(self._parked.items()):
            if claim.stream == stream and claim.entry_id == entry_id:
                del self._parked[job_id]
                return job_id
        for task, claim in list(self._jobs.values()):
            if claim.stream == stream and claim.entry_id == entry_id:
                self._stopped[claim.job.id] = reason
                task.cancel()
                return claim.job.id
        return None

    def stop_reason(self, job_id: str) -> StopReason | None:
        """Why a job's task was cancelled (None: the worker is shutting down)."""
        return self._stopped.get(job_id)
