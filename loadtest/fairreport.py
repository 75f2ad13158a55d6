"""What a ``fairness.py`` run measured, and how it is reported: plain data and pure aggregation.

The method (who floods whom, what the phases are, why the worker's capacity is kept low) is
described in ``fairness.py``. Tenant A is the flooder, tenant B the victim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.benchreport import BenchReport
from loadtest.report import fmt, json_text, mean, ratio, text_table


@dataclass(frozen=True)
class QueueSample:
    """One look at Redis during a phase: the tenants' streams and the engines' own queues."""

    t: float  # seconds since the phase started
    flooder_backlog: int  # XLEN of A's stream: jobs waiting or running (finished jobs leave it)
    flooder_running: int  # XPENDING: taken by a worker, not finished
    victim_backlog: int
    victim_running: int
    engine_running: int  # vLLM's running sequences over the model's live workers (heartbeats)
    engine_waiting: int  # sent to vLLM and not running: queued (FCFS, blind to tenants) or not collected

    @property
    def flooder_waiting(self) -> int:
        return max(0, self.flooder_backlog - self.flooder_running)

    @property
    def victim_waiting(self) -> int:
        return max(0, self.victim_backlog - self.victim_running)


def queue_summary(samples: Sequence[QueueSample], start: float, end: float) -> dict[str, float | None]:
    """Queue figures over the samples taken in [start, end] (B's measured window); None without any."""
    inside = [s for s in samples if start <= s.t <= end]

    def peak(values: list[int]) -> float | None:
        return float(max(values)) if values else None

    def average(values: list[int]) -> float | None:
        return mean(values) if values else None

    return {
        "samples": float(len(inside)),
        "flooder_waiting_mean": average([s.flooder_waiting for s in inside]),
        "flooder_waiting_max": peak([s.flooder_waiting for s in inside]),
        "flooder_running_mean": average([s.flooder_running for s in inside]),
        "victim_waiting_mean": average([s.victim_waiting for s in inside]),
        "victim_waiting_max": peak([s.victim_waiting for s in inside]),
        "engine_running_mean": average([s.engine_running for s in inside]),
        "engine_waiting_max": peak([s.engine_waiting for s in inside]),
    }


@dataclass
class FairnessReport:
    """Both phases: B alone, then B while A floods; A's figures cover A's whole run."""

    options: dict[str, Any]
    alone: BenchReport
    victim: BenchReport
    flooder: BenchReport
    flood_tokens_per_s: float  # A and B together over B's window under the flood
    queue_alone: dict[str, float | None]
    queue_flood: dict[str, float | None]
    worker_capacity: int | None  # jobs the model's workers take at once, from their heartbeats
    shared_queue: BenchReport | None = None
    """B again under the flood, its requests sent with A's key into A's queue: one FCFS queue."""
    gateway_alone: dict[str, float | None] = field(default_factory=dict)
    """B's mean wait for a worker to start its job and mean TTFT as its gateway measured them (ms)."""
    gateway_flood: dict[str, float | None] = field(default_factory=dict)
    cpu_alone: dict[str, float] = field(default_factory=dict)
    """Cores used in phase 1: each process of the system (when started here), this client, the host
    (all its busy time) and other (busy time none of them used); phase 2 below, its lead included."""
    cpu_flood: dict[str, float] = field(default_factory=dict)

    @property
    def ttft_p95_ratio(self) -> float | None:
        return ratio(self.victim.ttft_p95_ms, self.alone.ttft_p95_ms)

    @property
    def runs(self) -> list[BenchReport]:
        """Every measured run: B alone, B and A under the flood, B in A's queue if measured."""
        return [self.alone, self.victim, self.flooder, *([self.shared_queue] if self.shared_queue else [])]

    @property
    def shared_ttft_p95_ratio(self) -> float | None:
        return (
            None
            if self.shared_queue is None
            else ratio(self.shared_queue.ttft_p95_ms, self.alone.ttft_p95_ms)
        )


def _pair(a: float | None, b: float | None, pattern: str = "{:.1f}") -> str:
    return f"{fmt(a, pattern)} / {fmt(b, pattern)}"


def table_rows(rep: FairnessReport) -> list[list[str]]:
    """Header plus one row per figure: B alone, B under the flood, their ratio where it means
    something; with the shared-queue phase, B in A's queue and its ratio to alone as well."""
    alone, victim, flooder, shared = rep.alone, rep.victim, rep.flooder, rep.shared_queue
    qa, qf = rep.queue_alone, rep.queue_flood
    rows = [["", "B alone", "B + A's flood", "flood / alone"]]

    def compared(label: str, key: str, pattern: str) -> None:
        x, y = getattr(alone, key), getattr(victim, key)
        rows.append([label, fmt(x, pattern), fmt(y, pattern), fmt(ratio(y, x), "{:.2f}")])
        if shared is not None:
            z = getattr(shared, key)
            rows[-1] += [fmt(z, pattern), fmt(ratio(z, x), "{:.2f}")]

    compared("B TTFT p50 (ms)", "ttft_p50_ms", "{:.0f}")
    compared("B TTFT p95 (ms)", "ttft_p95_ms", "{:.0f}")
    compared("B TTFT p99 (ms)", "ttft_p99_ms", "{:.0f}")
    compared("B e2e p95 (ms)", "e2e_p95_ms", "{:.0f}")
    compared("B output tokens/s", "output_tokens_per_s", "{:.0f}")
    rows += [
        ["B requests ok / errors", f"{alone.requests_ok} / {alone.errors}",
         f"{victim.requests_ok} / {victim.errors}", "-"],
        ["A TTFT p50 / p95 (ms)", "-", _pair(flooder.ttft_p50_ms, flooder.ttft_p95_ms, "{:.0f}"), "-"],
        ["A output tokens/s", "-", fmt(flooder.output_tokens_per_s, "{:.0f}"), "-"],
        ["A requests ok / errors", "-", f"{flooder.requests_ok} / {flooder.errors}", "-"],
        ["all output tokens/s", fmt(alone.output_tokens_per_s, "{:.0f}"),
         fmt(rep.flood_tokens_per_s, "{:.0f}"),
         fmt(ratio(rep.flood_tokens_per_s, alone.output_tokens_per_s), "{:.2f}")],
        ["A jobs waiting in Redis, mean / max", "-",
         _pair(qf["flooder_waiting_mean"], qf["flooder_waiting_max"]), "-"],
        ["B jobs waiting in Redis, mean / max", _pair(qa["victim_waiting_mean"], qa["victim_waiting_max"]),
         _pair(qf["victim_waiting_mean"], qf["victim_waiting_max"]), "-"],
        ["engine running mean / waiting max", _pair(qa["engine_running_mean"], qa["engine_waiting_max"]),
         _pair(qf["engine_running_mean"], qf["engine_waiting_max"]), "-"],
        ["client CPU (% of wall)", fmt(alone.client_cpu_pct, "{:.0f}"), fmt(victim.client_cpu_pct, "{:.0f}"),
         "-"],
    ]  # fmt: skip
    ga, gf = rep.gateway_alone, rep.gateway_flood
    for label, key in (("B mean TTFT at the gateway (ms)", "ttft_mean_ms"),
                       ("  of which waiting to start (ms)", "queue_mean_ms"),
                       ("B TTFT p99 at the gateway, bucket bound (ms)", "ttft_p99_le_ms"),
                       ("B wait to start p99, bucket bound (ms)", "queue_p99_le_ms"),
                       ("gateway event-loop lag, mean (ms)", "lag_mean_ms"),
                       ("  p99, bucket bound (ms)", "lag_p99_le_ms")):  # fmt: skip
        x, y = ga.get(key), gf.get(key)
        if x is not None or y is not None:
            rows.append([label, fmt(x, "{:.0f}"), fmt(y, "{:.0f}"), fmt(ratio(y, x), "{:.2f}")])
    ca, cf = rep.cpu_alone, rep.cpu_flood
    if ca and cf:
        rows += [
            ["host CPU busy (cores)", fmt(ca.get("host"), "{:.2f}"), fmt(cf.get("host"), "{:.2f}"), "-"],
            ["  of it others' work", fmt(ca.get("other"), "{:.2f}"), fmt(cf.get("other"), "{:.2f}"), "-"],
        ]
        for name in sorted(k for k in cf if k not in ("host", "other")):
            rows.append([f"  {name}", fmt(ca.get(name), "{:.2f}"), fmt(cf.get(name), "{:.2f}"), "-"])
    if shared is not None:
        rows[0] += ["B in A's queue", "A's queue / alone"]
        for row in rows:
            if row[0] == "B requests ok / errors":
                row += [f"{shared.requests_ok} / {shared.errors}"]
            row += ["-"] * (len(rows[0]) - len(row))
    return rows


def headline(rep: FairnessReport) -> str:
    o = rep.options
    return (
        f"B's TTFT p95: {fmt(rep.alone.ttft_p95_ms, '{:.0f}')} ms alone, "
        f"{fmt(rep.victim.ttft_p95_ms, '{:.0f}')} ms under A's flood (x{fmt(rep.ttft_p95_ratio, '{:.2f}')})"
        + (
            ""
            if rep.shared_queue is None
            else f", {fmt(rep.shared_queue.ttft_p95_ms, '{:.0f}')} ms in A's queue "
            f"(x{fmt(rep.shared_ttft_p95_ratio, '{:.2f}')})"
        )
        + "\n"
        f"A: {o['flood_concurrency']} streams ({o['flooder_priority']}), B: {o['concurrency']} streams "
        f"(interactive), {o.get('workers', 1)} {o.get('engine', 'vllm')} worker(s) with "
        f"{fmt(rep.worker_capacity, '{:d}')} slots in all"
    )


def notes(rep: FairnessReport) -> list[str]:
    """What makes the figures mean less than they seem to."""
    out = []
    waiting = rep.queue_flood["flooder_waiting_max"]
    if waiting is None:
        out.append("queues not observed (no Redis to read): cannot tell whether A's jobs waited in Redis")
    elif waiting == 0:
        out.append(
            "WARNING: A never had jobs waiting in Redis, so there was no queue to be fair about; the "
            "figures show only how the engine shares its batch (lower the worker's capacity or raise "
            "the flood)"
        )
    engine_waiting = rep.queue_flood["engine_waiting_max"]
    if engine_waiting:
        out.append(
            f"the engine held up to {engine_waiting:.0f} sequences it was not running (from worker "
            "heartbeats: sent but not yet scheduled, which the engine serves first come first "
            "served, or finished but not yet collected by the worker)"
        )
    errors = sum(r.errors for r in rep.runs)
    if errors:
        samples = {k: v for r in rep.runs for k, v in r.error_samples.items()}
        out.append(f"{errors} requests failed, e.g. {next(iter(samples), '?')}")
    return out


def render_text(rep: FairnessReport) -> str:
    table = text_table(table_rows(rep))
    return "\n".join([headline(rep), "", table, *(f"- {n}" for n in notes(rep))])


def to_json(rep: FairnessReport) -> str:
    """The whole run as strict JSON: options, the three bench reports (per request too), queues."""
    doc = asdict(rep) | {
        "ttft_p95_ratio": rep.ttft_p95_ratio,
        "shared_ttft_p95_ratio": rep.shared_ttft_p95_ratio,
    }
    return json_text(doc)
