"""Keep Switchyard's own processes off the CPU cores vLLM's CPU backend binds its compute to.

When vLLM runs a CPU host's model in a process of its own (``VLLM_ENABLE_V1_MULTIPROCESSING=1``;
workers run it in the engine core process otherwise, see ``worker.engine.in_process_model_runner``)
it pins that process's OpenMP threads to some cores and keeps one core for its scheduler. A gateway,
a worker's front end or Redis that the kernel places on a compute core competes with a dozen busy
threads and is starved for hundreds of milliseconds at a time, which shows up directly as time to
first token. Hosts where nothing is pinned (GPU hosts, the in-process runner) are left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def engine_compute_cpus(root_pid: int) -> set[int]:
    """CPUs that processes below ``root_pid`` are restricted to (empty when nothing is pinned)."""
    everything = set(os.sched_getaffinity(0))
    pinned: set[int] = set()
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return set()
    for child in children:
        try:
            cpus = set(child.cpu_affinity() or ())
        except psutil.Error:
            continue
        if cpus and cpus < everything:
            pinned |= cpus
    return pinned


def keep_off(pids: Iterable[int], cpus: set[int]) -> set[int]:
    """Move every thread of ``pids`` to the CPUs outside ``cpus``; returns the CPUs used."""
    allowed = set(os.sched_getaffinity(0)) - cpus
    if not cpus or not allowed:
        return set()
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), allowed)
            except OSError as exc:  # a thread that ended meanwhile, or no permission
                log.debug("could not move thread %s: %s", task.name, exc)
    return allowed
