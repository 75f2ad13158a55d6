"""When a full worker makes room for a tenant below its fair share: pure policy, proven by table tests.

A worker reads jobs only while it has a free slot (:mod:`worker.reader`), so a tenant whose jobs
arrive while another's flood holds every slot waits for one of the flood's jobs to end: seconds at
GPU answer lengths, however fair the order of the reads. :class:`~worker.planner.Headroom` keeps
room for tenants that were active lately; a tenant back after a quiet spell finds none.

So while it is full, a worker also waits for jobs of the tenants holding less than their fair share
of its slots (:func:`wanted`), and when it takes one, it stops a job of the tenant most above its
share (:func:`victim`) and parks it (:class:`~worker.inflight.Inflight`): its entry stays pending
under this worker, and as soon as there is room for its tenant again it resumes before any new job
is read, after the tokens it already streamed, as a job a dead worker left does (its client sees a
pause, never a repeat or a gap). It is not put back in its tenant's stream, where it would wait
behind the flood's backlog, perhaps longer than a client waits for a silent stream. A worker that
stops hands its parked jobs back to the queue; one that dies leaves them to be reclaimed like any
job it held. Only jobs that can resume are stopped this way (:func:`resumable`).

A tenant's fair share is the worker's capacity split between the tenants holding slots, and the
one asking, by their priority class weights. A tenant asks only while one more job keeps it within
its share, and a job is taken only from a tenant that stays at or above its share without it, so a
move never makes the split less even and two tenants never take slots from each other in turn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from shared.messages import Job


def shares(active: Iterable[str], capacity: int, weights: Mapping[str, int]) -> dict[str, float]:
    """Each active stream's fair share of ``capacity`` slots, by weight (1 when not given)."""
    streams = set(active)
    total = sum(weights.get(s, 1) for s in streams)
    return {s: capacity * weights.get(s, 1) / total for s in streams} if total else {}


def wanted(
    streams: Iterable[str],
    held: Counter[str],
    preemptible: Counter[str],
    capacity: int,
    weights: Mapping[str, int],
) -> list[str]:
    """The streams whose next job a full worker should take by stopping another tenant's: those for
    which one more job stays within the fair share they would have (holding jobs here or not), while
    some other stream could give one up (:func:`victim`)."""
    holding = {s for s, n in held.items() if n > 0}
    out = []
    for stream in streams:
        fair = shares(holding | {stream}, capacity, weights)
        if held.get(stream, 0) + 1 <= fair[stream] and victim(stream, held, preemptible, capacity, weights):
            out.append(stream)
    return out


def victim(
    stream: str,
    held: Counter[str],
    preemptible: Counter[str],
    capacity: int,
    weights: Mapping[str, int],
) -> str | None:
    """The stream to stop a job of, to make room for a job of ``stream``: the one most above its
    fair share (counting ``stream``'s new job among those held) that keeps its share without the
    job and has a job that can resume (``preemptible`` counts them per stream), of a priority class
    no higher than ``stream``'s (a batch tenant never stops an interactive job); None if none does."""
    holding = {s for s, n in held.items() if n > 0} | {stream}
    fair = shares(holding, capacity, weights)
    weight = weights.get(stream, 1)
    candidates = Counter(
        {s: n for s, n in held.items() if preemptible.get(s, 0) > 0 and weights.get(s, 1) <= weight}
    )
    return _most_over(candidates, fair, stream)


def _most_over(held: Mapping[str, int], fair: Mapping[str, float], besides: str) -> str | None:
    """The stream other than ``besides`` furthest above its share that stays at or above it with
    one job fewer."""
    over = [(n - fair[s], s) for s, n in held.items() if s != besides and s in fair and n - 1 >= fair[s]]
    return max(over)[1] if over else None


def resumable(job: Job) -> bool:
    """Whether a job stopped mid-answer can go on elsewhere from the tokens it already streamed:
    one choice (only those record their progress), no grammar (it would start over from the top
    of the answer), and text, not vectors."""
    return job.sampling.n == 1 and not job.sampling.constrained and job.embed is None
