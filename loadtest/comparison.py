"""Pure figures-to-text logic of the Switchyard vs vLLM comparison (see ``compare.py``).

Everything here works on plain bench reports (the JSON ``bench.py`` writes, plus the driver's CPU
accounting), arranged as ``Reports``: target name -> concurrency level -> report.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from loadtest.report import fmt, markdown_table, ratio, text_table

Reports = dict[str, dict[str, dict[str, Any]]]
TARGETS = ("vllm", "switchyard", "vllm-default")
"""vLLM with the same engine settings as Switchyard, Switchyard, and vLLM in its default
configuration (same model, dtype and context length): ratios are Switchyard / each vLLM."""
BASELINES = ("vllm", "vllm-default")

# Counted across repeated runs rather than taking the median; PER_RUN figures are listed run by run.
SUMMED = ("errors", "warmup_errors", "token_mismatches", "exit_code")
PER_RUN = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "other_load_cores")
# (report key, label, format) in table order.
METRICS = (
    ("output_tokens_per_s", "output tokens/s", "{:.1f}"),
    ("requests_per_s", "requests/s", "{:.2f}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("ttft_p95_ms", "TTFT p95 (ms)", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:.1f}"),
    ("e2e_p50_ms", "e2e p50 (ms)", "{:.1f}"),
    ("e2e_p95_ms", "e2e p95 (ms)", "{:.1f}"),
    ("inter_chunk_mean_ms", "inter-chunk mean (ms)", "{:.2f}"),
    ("tpot_mean_ms", "TPOT mean (ms)", "{:.2f}"),
    ("tokens_per_chunk", "tokens/content chunk", "{:.2f}"),
    ("events_per_request_mean", "SSE events/request", "{:.1f}"),
    ("prompt_tokens_mean", "prompt tokens (server)", "{:.1f}"),
    ("output_tokens", "output tokens (total)", "{:d}"),
    ("token_mismatches", "requests != N tokens", "{:d}"),
    ("errors", "errors", "{:d}"),
    ("client_cpu_s", "client CPU (s)", "{:.2f}"),
    ("client_cpu_pct", "client CPU (% of wall)", "{:.1f}"),
    ("server_cpu_s", "server CPU, incl. warmup (s)", "{:.1f}"),
    ("other_load_cores", "other load on host (cores)", "{:.2f}"),
)
# Design targets (DESIGN.md, "Performance targets"): (key, comparison, bound on the ratio).
CHECKS = (("output_tokens_per_s", ">=", 0.9), ("ttft_p50_ms", "<=", 1.25))
ADDED_TTFT_LIMIT_MS = 5.0  # at concurrency 1
NO_RESULTS = "(no results at this concurrency)"


def level_ratios(reports: Reports, level: str, baseline: str = "vllm") -> dict[str, float | None]:
    """Switchyard / ``baseline`` for every metric at one concurrency level (empty unless both ran)."""
    base, sy = (reports.get(t, {}).get(level) for t in (baseline, "switchyard"))
    if base is None or sy is None:
        return {}
    return {key: ratio(sy.get(key), base.get(key)) for key, _, _ in METRICS}


def check_lines(reports: Reports, level: str) -> list[str]:
    """Pass/fail lines for the design targets at one level, against each vLLM that ran."""
    lines = []
    for baseline in BASELINES:
        ratios = level_ratios(reports, level, baseline)
        for key, op, bound in CHECKS:
            r = ratios.get(key)
            if r is not None:
                ok = r >= bound if op == ">=" else r <= bound
                verdict = "PASS" if ok else "FAIL"
                lines.append(f"{verdict}: {key} ratio to {baseline} {r:.3f} (target {op} {bound})")
    ratios = level_ratios(reports, level)
    if level == "1" and ratios:
        sy, vllm = (reports[t][level]["ttft_p50_ms"] for t in ("switchyard", "vllm"))
        verdict = "PASS" if sy - vllm < ADDED_TTFT_LIMIT_MS else "FAIL"
        lines.append(f"{verdict}: added TTFT p50 = {sy - vllm:.2f} ms (target < {ADDED_TTFT_LIMIT_MS} ms)")
    return lines


def spread_lines(reports: Reports, level: str) -> list[str]:
    """The repeated runs one by one, to show how much the medians can be trusted."""
    lines = []
    for name, by_level in reports.items():
        runs = by_level.get(level, {}).get("runs", {})
        if runs:
            cells = [f"{key} [{', '.join(fmt(v, '{:.1f}') for v in values)}]" for key, values in runs.items()]
            lines.append(f"{name} per run: " + "; ".join(cells))
    return lines


def table_rows(reports: Reports, level: str) -> list[list[str]]:
    """Header plus one row per metric: the targets that ran, then Switchyard's ratio to each vLLM
    that ran beside it; [] if none ran."""
    names = [t for t in TARGETS if level in reports.get(t, {})]
    if not names:
        return []
    ratios = {b: r for b in BASELINES if (r := level_ratios(reports, level, b))}
    rows = [["metric", *names] + [f"switchyard / {b}" for b in ratios]]
    for key, label, pattern in METRICS:
        row = [label] + [fmt(reports[t][level].get(key), pattern) for t in names]
        rows.append(row + [fmt(r.get(key), "{:.3f}") for r in ratios.values()])
    return rows


def render_text(rows: list[list[str]]) -> str:
    return text_table(rows) or NO_RESULTS


def render_markdown(rows: list[list[str]]) -> str:
    return markdown_table(rows) or NO_RESULTS


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from repeated runs: each figure's median, counts summed, a few figures per run."""
    merged = {k: v for k, v in runs[0].items() if k != "requests"}  # config etc. from the first run
    for key, value in merged.items():
        if key in SUMMED:
            merged[key] = sum(r[key] for r in runs)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
            merged[key] = statistics.median(values) if values else None
    merged["error_samples"] = dict(sum((Counter(r["error_samples"]) for r in runs), Counter()))
    merged["runs"] = {key: [r.get(key) for r in runs] for key in PER_RUN}
    return merged


def notes(reports: Reports, level: str) -> list[str]:
    """The lines printed under a level's table: design-target verdicts, then the per-run spread."""
    return check_lines(reports, level) + spread_lines(reports, level)
