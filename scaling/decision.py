"""How many workers a model should have: one pure decision, used by every way Switchyard runs.

``switchyard up --autoscale`` starts and retires workers by it; a gateway exports it per model
(``switchyard:desired_workers`` and ``GET /scaling``), which is what KEDA scales a Kubernetes
worker Deployment on. Its inputs come from the durable backlog in Redis, not from any process's
memory, so every caller sees the same demand.

The rules, in order:
- demand is the jobs that want a slot: waiting in the streams plus running;
- enough workers to hold that demand at ``target_utilization`` of their slots, within
  ``min_workers`` and ``max_workers``, and at least one while anything waits (activation from zero);
- a backlog the current workers drain within ``max_queue_wait`` at their measured rate needs no new
  worker (a burst of short jobs is not worth a start-up);
- more workers are asked for at once; fewer only after demand stayed low for ``scale_down_after``
  seconds, one worker at a time, ``cooldown`` seconds apart (hysteresis: a dip does not retire a
  worker that the next burst needs again).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from shared.fleet import Snapshot
from shared.settings import GatewaySettings


@dataclass(frozen=True, slots=True)
class Load:
    """A model's demand and fleet, as read from Redis."""

    waiting: int
    """Jobs in the model's streams that no worker has taken yet."""
    running: int
    """Jobs taken by a worker and not finished."""
    workers: int
    """Workers serving the model (those starting included, draining ones not)."""
    capacity: int
    """Jobs one worker runs at once."""
    drain_rate: float = 0.0
    """Jobs finished per second lately (0: unknown)."""


@dataclass(frozen=True, slots=True)
class Policy:
    min_workers: int = 0
    max_workers: int = 1_000
    target_utilization: float = 0.75
    max_queue_wait: float = 5.0
    scale_down_after: float = 60.0
    cooldown: float = 15.0


@dataclass(frozen=True, slots=True)
class Memory:
    """What the decision keeps between calls."""

    low_since: float | None = None
    """Since when fewer workers would do (None: not now)."""
    changed_at: float = -math.inf
    """When the decision last asked for fewer workers."""


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    reason: str
    memory: Memory


def scaling_policy(settings: GatewaySettings) -> Policy:
    """The policy the settings (``SWITCHYARD_SCALE_*``) describe."""
    return Policy(
        min_workers=settings.scale_min_workers,
        max_workers=settings.scale_max_workers,
        target_utilization=settings.scale_target_utilization,
        max_queue_wait=settings.scale_max_queue_wait,
        scale_down_after=settings.scale_down_after,
        cooldown=settings.scale_cooldown,
    )


def needed(load: Load, policy: Policy) -> int:
    """Workers the demand needs now, within the policy's bounds (before any hysteresis)."""
    demand = load.waiting + load.running
    per_worker = max(1.0, load.capacity * policy.target_utilization)
    need = math.ceil(demand / per_worker)
    drained_soon = load.drain_rate > 0 and load.waiting / load.drain_rate <= policy.max_queue_wait
    if load.waiting and load.workers and drained_soon:
        need = min(need, load.workers)  # the workers there are drain it soon enough
    if demand:
        need = max(need, 1)
    return max(policy.min_workers, min(policy.max_workers, need))


def decide(load: Load, policy: Policy, memory: Memory, now: float) -> Decision:
    """The number of workers to have now, and what to remember for the next call."""
    need = needed(load, policy)
    have = load.workers
    if need > have:
        return Decision(
            need, f"{load.waiting} waiting, {load.running} running", replace(memory, low_since=None)
        )
    if need == have:
        return Decision(have, "steady", replace(memory, low_since=None))
    low_since = memory.low_since if memory.low_since is not None else now
    if have > policy.max_workers:  # the bound moved below the fleet: no reason to wait
        return Decision(policy.max_workers, "above the maximum", Memory(None, now))
    if now - low_since < policy.scale_down_after or now - memory.changed_at < policy.cooldown:
        return Decision(have, f"low demand for {now - low_since:.0f}s", replace(memory, low_since=low_since))
    return Decision(have - 1, f"low demand for {now - low_since:.0f}s", Memory(low_since, changed_at=now))


DEFAULT_CAPACITY = 256
"""A worker's capacity when no worker of the model was ever seen (a worker's default)."""


def load_of(snap: Snapshot, model: str, drain_rate: float, capacity: int, starting: int = 0) -> Load:
    """The model's load in a fleet snapshot; ``starting``: workers started but not yet live."""
    return Load(
        waiting=snap.waiting(model),
        running=snap.running(model),
        workers=len(snap.serving(model)) + starting,
        capacity=capacity,
        drain_rate=drain_rate,
    )


class Scaler:
    """The decision for every model over time: each model keeps its own memory."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._memory: dict[str, Memory] = {}
        self._capacity: dict[str, int] = {}
        self.latest: dict[str, tuple[Load, Decision]] = {}

    def observe(
        self,
        snap: Snapshot,
        drain_rate: Callable[[str], float],
        capacity: int | None = None,
        starting: Callable[[str], int] = lambda model: 0,
        now: float | None = None,
    ) -> dict[str, Decision]:
        """Decide for every model in ``snap``. ``capacity``: per worker, when the caller knows it (else
        what the model's workers advertise, or last advertised)."""
        now = time.monotonic() if now is None else now
        out = {}
        for model in snap.models():
            seen = [w.capacity for w in snap.workers if w.model == model]
            if seen:
                self._capacity[model] = max(seen)
            per_worker = capacity or self._capacity.get(model, DEFAULT_CAPACITY)
            load = load_of(snap, model, drain_rate(model), per_worker, starting(model))
            decision = decide(load, self.policy, self._memory.get(model, Memory()), now)
            self._memory[model] = decision.memory
            self.latest[model] = (load, decision)
            out[model] = decision
        for gone in set(self.latest) - set(out):
            del self.latest[gone]
        return out
