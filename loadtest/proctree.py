"""A benchmarked server as a process tree (Linux ``/proc``): its CPU time, and stopping all of it.

A server may start helpers in sessions of their own (Switchyard's supervisor does, for Redis, the
gateway and each worker; vLLM's engine and worker processes stay in the server's group), so both
are found by walking parent pids, not by process group.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from control.processes import group_alive, wait_until

# (signal, seconds to wait for the server's process group to go) — escalated in this order.
STOP_SEQUENCE = ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))
LEFTOVER_GRACE_S = 5.0


class ProcessInfo(NamedTuple):
    ppid: int
    ticks: int  # CPU clock ticks used, user + system, including reaped children
    own_ticks: int  # the same of the process alone
    zombie: bool  # exited, not yet reaped: nothing left to stop


ProcessTable = dict[int, ProcessInfo]


def read_process_table() -> ProcessTable:
    table: ProcessTable = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the command name may hold spaces
        except OSError:  # the process ended while we looked
            continue
        own = int(fields[11]) + int(fields[12])  # utime, stime; then the reaped children's
        ticks = own + int(fields[13]) + int(fields[14])
        table[int(stat.parent.name)] = ProcessInfo(int(fields[1]), ticks, own, fields[0] == "Z")
    return table


def running(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies excluded: their parent or init will reap them)."""
    table = read_process_table()
    return {pid for pid in pids if pid in table and not table[pid].zombie}


def descendants(root: int, table: ProcessTable) -> set[int]:
    """``root`` and every process below it that is still listed."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, info in table.items():
        children[info.ppid].append(pid)
    tree: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in tree:
            tree.add(pid)
            todo.extend(children[pid])
    return tree


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far: whole machine (busy), the server's tree, this process's reaped children."""

    wall: float
    machine_busy: float
    server: float
    children: float


def _machine_ticks() -> list[int]:
    """The first line of ``/proc/stat``: user, nice, system, idle, iowait, irq, softirq, steal."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every CPU, everything but idle and iowait)."""
    cpu = _machine_ticks()
    return (sum(cpu) - cpu[3] - cpu[4]) / os.sysconf("SC_CLK_TCK")


def machine_steal() -> float:
    """CPU seconds the hypervisor has taken from this machine's CPUs (``steal`` in ``/proc/stat``):
    time in which nothing here ran although something wanted to."""
    return _machine_ticks()[7] / os.sysconf("SC_CLK_TCK")


def tree_seconds(root: int, table: ProcessTable) -> float:
    """CPU seconds used by ``root`` and every process below it (reaped children included)."""
    return sum(table[pid].ticks for pid in descendants(root, table)) / os.sysconf("SC_CLK_TCK")


def own_seconds(pids: Iterable[int]) -> float:
    """CPU seconds used by the processes ``pids`` themselves (not their children), those still listed."""
    table = read_process_table()
    return sum(table[pid].own_ticks for pid in pids if pid in table) / os.sysconf("SC_CLK_TCK")


def command_line(pid: int) -> str:
    """A process's arguments joined by spaces ("" once it has gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def cpu_sample(server_pid: int) -> CpuSample:
    server = tree_seconds(server_pid, read_process_table())
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSample(time.monotonic(), machine_busy(), server, usage.ru_utime + usage.ru_stime)


def cpu_window(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Who used the CPU between two samples; "other" is load from outside this benchmark."""
    wall = after.wall - before.wall
    server, bench = after.server - before.server, after.children - before.children
    other = max(0.0, after.machine_busy - before.machine_busy - server - bench)
    return {
        "window_s": wall,
        "server_cpu_s": server,
        "bench_process_cpu_s": bench,
        "other_cpu_s": other,
        "other_load_cores": other / wall if wall > 0 else 0.0,
    }


def _stop_group(proc: subprocess.Popen[bytes]) -> str:
    for sig, grace in STOP_SEQUENCE:
        if not group_alive(proc):
            return "already exited"
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return sig.name
        if wait_until(lambda: not group_alive(proc), grace):
            return sig.name
    return "SIGKILL (group still listed: leftover zombies?)"


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


def stop_tree(proc: subprocess.Popen[bytes]) -> str:
    """Stop the server: its process group escalating from SIGINT, then any descendant it left behind.

    Returns how it ended. The descendants are listed before the first signal, so helpers in other
    sessions that the server failed to stop are still found once it has exited.
    """
    family = descendants(proc.pid, read_process_table()) - {proc.pid}
    how = _stop_group(proc)
    leftovers = running(family)
    if leftovers:
        found = len(leftovers)
        _signal_all(leftovers, signal.SIGTERM)
        wait_until(lambda: not running(leftovers), LEFTOVER_GRACE_S)
        leftovers = running(leftovers)
        _signal_all(leftovers, signal.SIGKILL)
        how += f"; then stopped {found} leftover descendant(s)"
    return how


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process tree, by this process (``client``) and by the
    whole host (``host``)."""
    table = read_process_table()
    used = {name: tree_seconds(pid, table) for name, pid in pids.items()}
    return used | {"client": time.process_time(), "host": machine_busy()}


def cores(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Cores each entry of two :func:`cpu_seconds` readings used over ``wall`` seconds, and
    ``other``: the host's busy time none of them used (work from elsewhere)."""
    used = {k: (after[k] - before.get(k, 0.0)) / wall for k in after} if wall > 0 else {}
    ours = sum(v for k, v in used.items() if k != "host")
    return used | {"other": max(0.0, used.get("host", 0.0) - ours)}
