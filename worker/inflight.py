"""The jobs a worker holds right now: their tasks and claims, and why any of them was stopped."""

from __future__ import annotations

import asyncio
from collections import Counter

from worker.channel import Claim
from worker.outcome import StopReason


class Inflight:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: dict[str, tuple[asyncio.Task[None], Claim]] = {}
        self._stopped: dict[str, StopReason] = {}
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

    def remove(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._stopped.pop(job_id, None)
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

    def entries(self) -> dict[str, list[str]]:
        """Stream -> ids of the entries held on it. Safe to call from another thread: one C-level
        copy of the table, under the GIL."""
        by_stream: dict[str, list[str]] = {}
        for _, claim in list(self._jobs.values()):
            by_stream.setdefault(claim.stream, []).append(claim.entry_id)
        return by_stream

    def stop(self, job_id: str, reason: StopReason) -> bool:
        """Cancel a job's task, remembering why; False if the job is not here."""
        held = self._jobs.get(job_id)
        if held is None:
            return False
        self._stopped[job_id] = reason
        held[0].cancel()
        return True

    def stop_entry(self, stream: str, entry_id: str, reason: StopReason) -> str | None:
        """Cancel the job of a stream entry; its id, or None if no held job has that entry."""
        for task, claim in list(self._jobs.values()):
            if claim.stream == stream and claim.entry_id == entry_id:
                self._stopped[claim.job.id] = reason
                task.cancel()
                return claim.job.id
        return None

    def stop_reason(self, job_id: str) -> StopReason | None:
        """Why a job's task was cancelled (None: the worker is shutting down)."""
        return self._stopped.get(job_id)
