"""What a ``bench.py`` run measured, and how it is reported: plain data and pure aggregation.

The method (what TTFT, inter-chunk time, TPOT and tokens/s mean here) is described in ``bench.py``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.report import json_text, mean, percentile

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class BenchConfig:
    """What to send and how hard."""

    base_url: str
    model: str
    concurrency: int = 64
    requests: int = 256
    prompt_tokens: int = 64
    output_tokens: int = 128
    warmup: int = 8
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    calibrate: bool = True


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from the moment it was sent."""

    ok: bool = False
    sent: float = 0.0  # time.perf_counter() when sent
    ttft: float | None = None
    latency: float = 0.0
    chunk_span: float = 0.0  # first content chunk -> last content chunk
    chunks: int = 0  # SSE events whose delta carried non-empty content
    events: int = 0  # all SSE data events (role chunk, content, usage, ...)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class BenchReport:
    """Aggregate figures of the measured phase (warmup excluded)."""

    config: dict[str, Any]
    prompt_words: int
    wall_s: float
    requests_ok: int
    errors: int
    warmup_errors: int
    error_samples: dict[str, int]
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    prompt_tokens_mean: float
    token_mismatches: int  # successful requests whose completion_tokens != --output-tokens
    ttft_p50_ms: float
    ttft_p95_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p95_ms: float
    inter_chunk_mean_ms: float
    tpot_mean_ms: float
    chunks_per_request_mean: float
    events_per_request_mean: float  # every SSE data event, empty deltas and the usage chunk included
    tokens_per_chunk: float
    finish_reasons: dict[str, int]
    client_cpu_s: float
    client_cpu_pct: float
    requests: list[dict[str, Any]] = field(default_factory=list)  # one sample per request, in send order


def summarize(
    cfg: BenchConfig, words: int, results: list[RequestResult], wall: float, cpu: float, warmup_errors: int
) -> BenchReport:
    """Aggregate per-request results into the report."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    e2es = [r.latency * 1000 for r in ok]
    gaps = sum(max(r.chunks - 1, 0) for r in ok)
    tpots = [
        (r.latency - r.ttft) * 1000 / (r.output_tokens - 1)
        for r in ok
        if r.ttft is not None and r.output_tokens > 1
    ]
    out_tokens = sum(r.output_tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    return BenchReport(
        config=asdict(cfg) | {"api_key": "***" if cfg.api_key else None},
        prompt_words=words,
        wall_s=wall,
        requests_ok=len(ok),
        errors=len(results) - len(ok),
        warmup_errors=warmup_errors,
        error_samples=dict(Counter(r.error for r in results if r.error).most_common(5)),
        output_tokens=out_tokens,
        output_tokens_per_s=out_tokens / wall if wall > 0 else math.nan,
        requests_per_s=len(ok) / wall if wall > 0 else math.nan,
        prompt_tokens_mean=mean([r.prompt_tokens for r in ok]),
        token_mismatches=sum(1 for r in ok if r.output_tokens != cfg.output_tokens),
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p95_ms=percentile(ttfts, 95),
        ttft_p99_ms=percentile(ttfts, 99),
        e2e_p50_ms=percentile(e2es, 50),
        e2e_p95_ms=percentile(e2es, 95),
        inter_chunk_mean_ms=sum(r.chunk_span for r in ok) * 1000 / gaps if gaps else math.nan,
        tpot_mean_ms=mean(tpots),
        chunks_per_request_mean=mean([r.chunks for r in ok]),
        events_per_request_mean=mean([r.events for r in ok]),
        tokens_per_chunk=out_tokens / chunks if chunks else math.nan,
        finish_reasons=dict(Counter(r.finish_reason or "none" for r in ok)),
        client_cpu_s=cpu,
        client_cpu_pct=100.0 * cpu / wall if wall > 0 else math.nan,
        requests=request_samples(results),
    )


def request_samples(results: list[RequestResult]) -> list[dict[str, Any]]:
    """Per-request figures for the JSON report, times relative to the first send."""
    ordered = sorted(results, key=lambda r: r.sent)
    base = ordered[0].sent if ordered else 0.0
    return [
        {
            "sent_s": round(r.sent - base, 4),
            "ttft_ms": None if r.ttft is None else round(r.ttft * 1000, 2),
            "e2e_ms": round(r.latency * 1000, 2),
            "output_tokens": r.output_tokens,
            "chunks": r.chunks,
            "events": r.events,
            "error": r.error,
        }
        for r in ordered
    ]


def window_tokens_per_s(results: Iterable[RequestResult], start: float, end: float) -> float:
    """Output tokens/s of the successful requests that finished in [start, end] (perf_counter times).

    Closed loops finish requests steadily, so counting whole requests by their end errs by at most
    one request per stream at each edge of the window.
    """
    if end <= start:
        return math.nan
    tokens = sum(r.output_tokens for r in results if r.ok and start <= r.sent + r.latency <= end)
    return tokens / (end - start)


def format_report(rep: BenchReport) -> str:
    """Human-readable table of a report."""
    c = rep.config
    rows = [
        ("target", f"{c['base_url']}  model={c['model']}"),
        ("load", f"concurrency={c['concurrency']} requests={c['requests']} warmup={c['warmup']}"),
        ("prompt", f"{rep.prompt_words} words -> {rep.prompt_tokens_mean:.1f} tokens (server count, mean)"),
        ("output tokens/request", f"{c['output_tokens']} asked, mismatches={rep.token_mismatches}"),
        ("wall time", f"{rep.wall_s:.2f} s"),
        ("output tokens/s", f"{rep.output_tokens_per_s:.1f}"),
        ("requests/s", f"{rep.requests_per_s:.2f}"),
        ("TTFT p50/p95/p99", f"{rep.ttft_p50_ms:.1f} / {rep.ttft_p95_ms:.1f} / {rep.ttft_p99_ms:.1f} ms"),
        ("e2e p50/p95", f"{rep.e2e_p50_ms:.1f} / {rep.e2e_p95_ms:.1f} ms"),
        ("inter-chunk mean", f"{rep.inter_chunk_mean_ms:.2f} ms"),
        ("TPOT mean", f"{rep.tpot_mean_ms:.2f} ms"),
        (
            "chunks/request",
            f"{rep.chunks_per_request_mean:.1f} with content, {rep.events_per_request_mean:.1f} events",
        ),
        ("tokens/content chunk", f"{rep.tokens_per_chunk:.2f}"),
        ("finish reasons", ", ".join(f"{k}={v}" for k, v in rep.finish_reasons.items()) or "-"),
        ("errors", f"{rep.errors} measured, {rep.warmup_errors} warmup"),
        ("client CPU", f"{rep.client_cpu_s:.2f} s ({rep.client_cpu_pct:.1f}% of wall)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"  error x{n}: {msg}" for msg, n in rep.error_samples.items()]
    return "\n".join(lines)


def to_json(rep: BenchReport) -> str:
    """The report as strict JSON (NaN becomes null)."""
    return json_text(asdict(rep))
