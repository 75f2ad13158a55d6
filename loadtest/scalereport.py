"""What a ``scale.py`` run measured, and how it is reported: plain data and pure aggregation.

The method (what is started, what load, which window) is described in ``scale.py``. One
:class:`Level` per fleet size; the one-worker level is the baseline every other is compared with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.benchreport import RequestResult
from loadtest.report import chart, fmt, json_text, markdown_table, mean, text_table

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SCALING_TARGET = 0.9
"""N workers should give at least this times N times one worker's output tokens/s."""
BALANCE_TARGET = 0.15
"""Jobs per worker within this fraction of the mean."""
SATURATED_CORE = 0.85
"""A single-threaded process (gateway, Redis, the client) using this much of a core is the limit."""
SATURATED_HOST = 0.9
"""The host is the limit when this fraction of its CPUs is busy (every process then waits for one)."""
ROLES = ("gateway", "redis", "client")


@dataclass
class Level:
    """One fleet size: the steady load's figures over the measured window, and the burst before it."""

    workers: int
    streams: int
    window_s: float
    tokens_per_s: float
    """Output tokens/s the workers generated in the window (their counters)."""
    client_tokens_per_s: float
    """Output tokens/s of the requests that finished in the window (what the clients received)."""
    requests_ok: int
    errors: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    jobs: list[int]
    """Jobs each worker completed in the window."""
    burst: int
    burst_jobs: list[int]
    """Jobs each worker took of the burst sent at once to the idle fleet."""
    cores: dict[str, float]
    """CPU used over the window, in cores: gateway, redis, client, each worker, host (all of the
    machine's busy time) and other (the host's busy time no process of this benchmark used)."""
    error_samples: dict[str, int] = field(default_factory=dict)

    @property
    def worker_cores(self) -> float:
        return sum(v for k, v in self.cores.items() if k.startswith("worker-"))


@dataclass
class ScaleReport:
    meta: dict[str, Any]
    levels: list[Level]

    @property
    def base(self) -> Level | None:
        """The one-worker level, the baseline."""
        return next((lv for lv in self.levels if lv.workers == 1), None)


def ttfts_ms(results: Iterable[RequestResult], start: float, end: float) -> list[float]:
    """TTFT of the successful requests sent in [start, end]."""
    return [r.ttft * 1000 for r in results if r.ok and r.ttft is not None and start <= r.sent <= end]


def imbalance(jobs: Sequence[int]) -> float | None:
    """Largest distance of a worker's jobs from the mean, as a fraction of the mean."""
    if not jobs or not sum(jobs):
        return None
    average = mean(jobs)
    return max(abs(j - average) for j in jobs) / average


def efficiency(level: Level, base: Level | None) -> float | None:
    """Output tokens/s over N times the one-worker level's (1.0: perfect scaling)."""
    if base is None or not base.tokens_per_s or math.isnan(level.tokens_per_s):
        return None
    return level.tokens_per_s / (level.workers * base.tokens_per_s)


def limits(level: Level, host_cpus: int) -> list[str]:
    """What the benchmark saturated in the window: a role near a whole core, or the host's CPUs
    (by the benchmark's own processes: a host kept busy by other work is a note, not a finding)."""
    found = [role for role in ROLES if level.cores.get(role, 0.0) >= SATURATED_CORE]
    ours = level.cores.get("host", 0.0) - level.cores.get("other", 0.0)
    if ours >= SATURATED_HOST * host_cpus:
        found.append("host")
    return found


def table_rows(report: ScaleReport) -> list[list[str]]:
    host = int(report.meta.get("host_cpus") or 1)
    rows = [[
        "workers", "streams", "tokens/s", "x 1 worker", "of N x", "jobs per worker", "spread",
        "burst per worker", "TTFT p50/p95 ms", "gateway", "redis", "workers", "client", "other",
        "host", "saturated",
    ]]  # fmt: skip
    for lv in report.levels:
        eff = efficiency(lv, report.base)
        rows.append([
            str(lv.workers), str(lv.streams), fmt(lv.tokens_per_s, "{:.0f}"),
            fmt(None if eff is None else eff * lv.workers, "{:.2f}"), fmt(eff, "{:.2f}"),
            " ".join(str(j) for j in lv.jobs), _pct(imbalance(lv.jobs)),
            " ".join(str(j) for j in lv.burst_jobs),
            f"{fmt(lv.ttft_p50_ms, '{:.0f}')}/{fmt(lv.ttft_p95_ms, '{:.0f}')}",
            *(fmt(lv.cores.get(k), "{:.2f}") for k in ("gateway", "redis")), fmt(lv.worker_cores, "{:.2f}"),
            *(fmt(lv.cores.get(k), "{:.2f}") for k in ("client", "other", "host")),
            ", ".join(limits(lv, host)) or "-",
        ])  # fmt: skip
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"±{100 * value:.0f}%"


def verdicts(report: ScaleReport) -> list[str]:
    """The targets, each as met or not, and where the path saturated."""
    host = int(report.meta.get("host_cpus") or 1)
    out = []
    base = report.base
    if base is None:
        out.append("no one-worker level: scaling cannot be judged (add 1 to --workers)")
    for lv in report.levels:
        if lv.workers == 1:
            continue
        eff = efficiency(lv, base)
        spread = imbalance(lv.jobs)
        scaled = "-" if eff is None else ("met" if eff >= SCALING_TARGET else "NOT met")
        balanced = "-" if spread is None else ("met" if spread <= BALANCE_TARGET else "NOT met")
        out.append(
            f"{lv.workers} workers: {fmt(None if eff is None else eff * lv.workers, '{:.2f}')}x one "
            f"worker's tokens/s ({fmt(eff, '{:.2f}')} of {lv.workers}x; >= {SCALING_TARGET}: {scaled}); "
            f"jobs per worker {_pct(spread)} of the mean (<= ±{100 * BALANCE_TARGET:.0f}%: {balanced})"
        )
    saturated = [(lv, limits(lv, host)) for lv in report.levels if limits(lv, host)]
    if saturated:
        lv, what = saturated[0]
        out.append(
            f"the path saturated first at {lv.workers} workers ({', '.join(what)}: gateway "
            f"{lv.cores.get('gateway', 0):.2f}, Redis {lv.cores.get('redis', 0):.2f}, client "
            f"{lv.cores.get('client', 0):.2f} cores; host {lv.cores.get('host', 0):.2f} of {host})"
        )
    else:
        top = max(report.levels, key=lambda lv: lv.workers, default=None)
        if top is not None:
            out.append(
                f"nothing saturated up to {top.workers} workers (gateway {top.cores.get('gateway', 0):.2f}, "
                f"Redis {top.cores.get('redis', 0):.2f} cores; host {top.cores.get('host', 0):.2f} of {host})"
            )
    other = max((lv.cores.get("other", 0.0) for lv in report.levels), default=0.0)
    if other >= 0.25:
        out.append(
            f"other work on the host used up to {other:.2f} cores during a window: figures from a busy "
            "host understate what the fleet can do"
        )
    errors = sum(lv.errors for lv in report.levels)
    if errors:
        samples = {k: v for lv in report.levels for k, v in lv.error_samples.items()}
        out.append(f"{errors} requests failed, e.g. {next(iter(samples), '?')}")
    return out


def render_text_report(report: ScaleReport) -> str:
    return "\n".join([text_table(table_rows(report)), "", *(f"- {v}" for v in verdicts(report))])


def render_summary(report: ScaleReport) -> str:
    """summary.md: how it was run, the table, the verdicts, the chart."""
    m = report.meta
    return "\n".join([
        f"# Scaling out simulated workers — {m.get('started', '')}",
        "",
        f"`{m.get('command', '')}`",
        "",
        f"{m.get('host_cpus')} CPUs. Each worker: simulated engine, preset `{m.get('preset')}` at "
        f"{m.get('speed')}x, capacity {m.get('capacity')}. Load: {m.get('streams_per_worker')} closed-loop "
        f"streaming requests per worker ({m.get('tenants')} tenant(s)), {m.get('prompt_tokens')}-token "
        f"prompts, exactly {m.get('output_tokens')} output tokens; measured for {m.get('duration')} s after "
        f"{m.get('warmup')} s of warm-up. Before it, a burst of {m.get('burst_per_worker')} requests per "
        "worker sent at once to the idle fleet (a new tenant's first requests).",
        "",
        "Columns: output tokens/s the workers generated; that over one worker's (x 1 worker) and over "
        "N times one worker's (of N x); jobs each worker completed in the window and the largest "
        "distance from their mean; CPU in cores over the window (workers: all of them; other: busy "
        "time no process of the benchmark used).",
        "",
        markdown_table(table_rows(report)),
        "",
        *(f"- {v}" for v in verdicts(report)),
        "",
        "![tokens/s and jobs per worker](scale.png)",
        "",
    ])  # fmt: skip


def to_json(report: ScaleReport) -> str:
    doc = asdict(report) | {
        "efficiency": {str(lv.workers): efficiency(lv, report.base) for lv in report.levels},
        "imbalance": {str(lv.workers): imbalance(lv.jobs) for lv in report.levels},
        "verdicts": verdicts(report),
    }
    return json_text(doc)


def write_chart(report: ScaleReport, path: Path) -> None:
    """Tokens/s against N with the N x and 0.9 N x lines; jobs per worker over their mean; CPU."""
    with chart(path, 1, 3, figsize=(16, 4.8)) as (_, (speed, balance, cpu)):
        plot_throughput(speed, report)
        plot_balance(balance, report)
        plot_cpu(cpu, report)


def plot_throughput(ax: Axes, report: ScaleReport) -> None:
    ns = [lv.workers for lv in report.levels]
    ax.plot(ns, [lv.tokens_per_s for lv in report.levels], marker="o", label="measured")
    base = report.base
    if base is not None:
        top = max(ns)
        one = base.tokens_per_s
        ax.plot([1, top], [one, top * one], ls=":", c="grey", label="N x 1 worker")
        low = SCALING_TARGET
        ax.plot([1, top], [low * one, low * top * one], ls="--", c="tab:red", label=f"{low} N x 1 worker")
    ax.set(xlabel="workers", ylabel="output tokens/s", title="Throughput", xticks=ns)
    ax.set_ylim(bottom=0)
    ax.legend()


def plot_balance(ax: Axes, report: ScaleReport) -> None:
    series: tuple[tuple[str, Callable[[Level], list[int]], dict[str, str]], ...] = (
        ("steady load", lambda lv: lv.jobs, {"c": "tab:blue"}),
        ("burst", lambda lv: lv.burst_jobs, {"facecolors": "none", "edgecolors": "tab:orange"}),
    )
    for label, pick, style in series:
        xs: list[int] = []
        ys: list[float] = []
        for lv in report.levels:
            jobs = pick(lv)
            if sum(jobs):
                xs += [lv.workers] * len(jobs)
                ys += [j / mean(jobs) for j in jobs]
        ax.scatter(xs, ys, s=22, label=label, **style)  # type: ignore[arg-type]
    ax.axhspan(1 - BALANCE_TARGET, 1 + BALANCE_TARGET, color="tab:green", alpha=0.12, label="±15%")
    ax.axhline(1.0, c="grey", lw=0.8)
    ns = [lv.workers for lv in report.levels]
    ax.set(xlabel="workers", ylabel="jobs per worker / mean", title="Jobs per worker", xticks=ns)
    ax.set_ylim(0, 2)
    ax.legend()


def plot_cpu(ax: Axes, report: ScaleReport) -> None:
    ns = [str(lv.workers) for lv in report.levels]
    bottom = [0.0] * len(ns)
    for role, values in (
        ("gateway", [lv.cores.get("gateway", 0.0) for lv in report.levels]),
        ("redis", [lv.cores.get("redis", 0.0) for lv in report.levels]),
        ("workers", [lv.worker_cores for lv in report.levels]),
        ("client", [lv.cores.get("client", 0.0) for lv in report.levels]),
        ("other", [lv.cores.get("other", 0.0) for lv in report.levels]),
    ):
        ax.bar(ns, values, bottom=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.axhline(float(report.meta.get("host_cpus") or 1), c="tab:red", ls="--", lw=0.8, label="host CPUs")
    ax.set(xlabel="workers", ylabel="cores", title="CPU over the window")
    ax.legend(fontsize="small")
