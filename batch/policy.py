"""Pure policy of the batch runner, proven by table tests: how many of a batch's lines to put on
the queue now, and which failures of a line are worth another attempt.

Workers serve batch-priority streams 1 : 4 against interactive ones when both have jobs waiting,
but a worker with free slots takes whatever comes, and an engine shares each step among all its
sequences: a batch that filled every free slot would slow every interactive stream in proportion.
So the runner keeps the same ratio in the engine: while interactive jobs run, batches together
get one line in flight for every four interactive jobs running (at least one, so a batch always
progresses); only capacity nobody interactive uses (no interactive job ran lately) is filled up to
the window; and while interactive jobs wait for a worker, batches add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.errors import APIError
from shared.tenants import PRIORITY_WEIGHT

MAX_ATTEMPTS = 3
"""Times a line is tried when it fails for a reason that is not its own (a lost worker, a timeout)."""

RETRYABLE_STATUS = (502, 503, 504)
FINAL_CODES = frozenset({"job_failed"})
"""5xx codes that are the line's own fault: it killed every worker that ran it (dead-lettered)."""


SHARE = PRIORITY_WEIGHT["batch"] / PRIORITY_WEIGHT["interactive"]
"""Batch lines in flight per interactive job running: the workers' priority weights."""


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the model's fleet looks like now, as far as pacing a batch goes."""

    free_slots: int
    """Jobs the live workers could still take (capacity minus what they hold), from heartbeats."""
    interactive_waiting: int
    """Jobs in interactive streams that no worker has taken yet."""
    batch_waiting: int
    """Lines in batch streams (of every batch) that no worker has taken yet."""
    interactive_running: int = 0
    """Interactive jobs workers hold (the recent peak: bursts come and go between two readings)."""
    batch_running: int = 0
    """Lines of every batch that workers hold."""


def lines_to_add(in_flight: int, window: int, capacity: Capacity) -> int:
    """Lines to put on the queue now, given ``in_flight`` of this batch's lines on it already.

    * never more than ``window`` in flight;
    * while interactive jobs wait for a worker, none, except that a batch with nothing in flight
      gets one, so it always progresses (at the workers' batch weight);
    * while interactive jobs run, all batches together up to ``SHARE`` of them (at least one),
      again with one for a batch that has nothing in flight;
    * otherwise (idle capacity), enough to fill the free slots net of the batch lines already
      waiting for one (every batch sees those, so several batches do not each fill the same slots),
      and at least one waiting line, so a worker that frees a slot finds batch work at once.
    """
    room = window - in_flight
    if room <= 0:
        return 0
    first = 1 if in_flight == 0 else 0
    if capacity.interactive_waiting > 0:
        return first
    if capacity.interactive_running > 0:
        share = max(1, int(capacity.interactive_running * SHARE))
        wanted = share - capacity.batch_running - capacity.batch_waiting
        return min(room, max(first, wanted))
    wanted = max(1 - capacity.batch_waiting, capacity.free_slots - capacity.batch_waiting)
    return max(0, min(room, wanted))


def retryable(error: APIError) -> bool:
    """Whether a line that failed this way should run again (as a new job): the system failed it
    (a worker lost, a stall, Redis gone), not its request."""
    return error.status in RETRYABLE_STATUS and error.code not in FINAL_CODES
