"""Pure policy of the batch runner, proven by table tests: how many of a batch's lines to put on
the queue now, and which failures of a line are worth another attempt.

Workers already serve batch-priority streams 1 : 4 against interactive ones, and keep room for
interactive tenants that used them lately. What the runner decides is how much batch work waits
on the queue: enough to fill the slots the fleet has free, so idle capacity is used, and no more
while interactive jobs are waiting for a worker, so they never queue behind a batch's backlog.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import APIError

MAX_ATTEMPTS = 3
"""Times a line is tried when it fails for a reason that is not its own (a lost worker, a timeout)."""

RETRYABLE_STATUS = (502, 503, 504)
FINAL_CODES = frozenset({"job_failed"})
"""5xx codes that are the line's own fault: it killed every worker that ran it (dead-lettered)."""


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the model's fleet looks like now, as far as pacing a batch goes."""

    free_slots: int
    """Jobs the live workers could still take (capacity minus what they hold), from heartbeats."""
    interactive_waiting: int
    """Jobs in interactive streams that no worker has taken yet."""
    batch_waiting: int
    """Lines in batch streams (of every batch) that no worker has taken yet."""


def lines_to_add(in_flight: int, window: int, capacity: Capacity) -> int:
    """Lines to put on the queue now, given ``in_flight`` of this batch's lines on it already.

    * never more than ``window`` in flight;
    * while interactive jobs wait for a worker, none, except that a batch with nothing in flight
      gets one, so it always progresses (at the workers' batch weight);
    * otherwise, enough to fill the free slots net of the batch lines already waiting for one
      (every batch sees those, so several batches do not each fill the same slots), and at least
      one waiting line, so a worker that frees a slot finds batch work at once.
    """
    room = window - in_flight
    if room <= 0:
        return 0
    if capacity.interactive_waiting > 0:
        return 1 if in_flight == 0 else 0
    wanted = max(1 - capacity.batch_waiting, capacity.free_slots - capacity.batch_waiting)
    return max(0, min(room, wanted))


def retryable(error: APIError) -> bool:
    """Whether a line that failed this way should run again (as a new job): the system failed it
    (a worker lost, a stall, Redis gone), not its request."""
    return error.status in RETRYABLE_STATUS and error.code not in FINAL_CODES
