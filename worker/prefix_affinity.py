"""Prefix affinity: which worker should run a job whose prompt shares its prefix with earlier ones.

vLLM keeps the prompts it has seen in its prefix cache, so a job whose prompt starts as an earlier
one did (the turns of one conversation, requests with one long system prompt) is served fastest by
the worker that ran that earlier job. Gateways put a digest of the prompt's first tokens on each job
(``Job.affinity``); every worker maps a digest to the same worker by rendezvous hashing over the
model's live workers, so a digest keeps its worker while the fleet does, and only the digests of a
worker that leaves or joins move.

Delivery stays pull-based: whichever worker reads a job decides. It runs the job itself when the
digest is its own, or when the worker the digest belongs to is busier than it by more than
``SLACK`` jobs or full (the job spills, as under load it should); otherwise it hands the job over
(see ``worker/handover.py``). A job is handed over at most once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

SLACK = 4
"""How many more jobs than this worker the preferred one may hold and still be handed a job."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Another live worker of the model, as its heartbeat describes it."""

    id: str
    inflight: int
    capacity: int


def preferred(digest: str, workers: Iterable[str]) -> str | None:
    """The worker a digest belongs to: the highest hash of (digest, worker) — the same answer on
    every worker that sees the same fleet."""

    def weight(worker: str) -> bytes:
        return hashlib.blake2b(f"{digest} {worker}".encode(), digest_size=8).digest()

    return max(workers, key=weight, default=None)


def hand_to(digest: str, me: str, my_load: int, peers: Iterable[Peer]) -> Peer | None:
    """The worker to hand this job to, or None to run it here. (Its heartbeat may be a beat old:
    :func:`worker.handover.hand_over` checks its room again, exactly.)"""
    by_id = {p.id: p for p in peers if p.id != me}
    target = preferred(digest, [me, *by_id])
    if target is None or target == me:
        return None
    peer = by_id[target]
    if peer.inflight >= peer.capacity or peer.inflight > my_load + SLACK:
        return None  # busy: the job spills here, where there is room
    return peer
