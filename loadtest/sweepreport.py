"""A concurrency sweep's figures, from Locust's CSV rows to ``summary.md`` / ``summary.json``: pure logic.

The rows are the ones ``locustfile.py`` produces (``POST /v1/chat/completions``, ``TTFT``, ``TPOT``,
``TOKENS/S``); the client CPU and host load figures come from the sweep driver.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Row = Mapping[str, str]
REQUEST_TYPE, REQUEST_NAME = "POST", "/v1/chat/completions"
TTFT, TPOT, TOKENS = "TTFT", "TPOT", "TOKENS/S"

# (field, column title, format) of the per-target table, in order.
COLUMNS = (
    ("users", "users", "{:d}"),
    ("requests", "requests", "{:d}"),
    ("rps", "req/s", "{:.2f}"),
    ("latency_p50_ms", "latency p50 (ms)", "{:.0f}"),
    ("latency_p95_ms", "p95", "{:.0f}"),
    ("latency_p99_ms", "p99", "{:.0f}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.0f}"),
    ("ttft_p95_ms", "TTFT p95", "{:.0f}"),
    ("tpot_mean_ms", "TPOT mean (ms)", "{:.2f}"),
    ("output_tokens_per_s", "output tok/s", "{:.1f}"),
    ("error_rate", "errors", "{:.2%}"),
    ("client_cpu_pct", "client CPU (% core)", "{:.0f}"),
    ("host_busy_cores", "host busy (cores)", "{:.2f}"),
    ("server_cpu_cores", "server CPU (cores)", "{:.2f}"),
    ("other_load_cores", "other load (cores)", "{:.2f}"),
)
# Ratios primary / compare: (field, column title); above 1 is better for throughput, worse for times.
RATIOS = (
    ("output_tokens_per_s", "output tok/s"),
    ("rps", "req/s"),
    ("latency_p50_ms", "latency p50"),
    ("latency_p95_ms", "latency p95"),
    ("ttft_p50_ms", "TTFT p50"),
    ("ttft_p95_ms", "TTFT p95"),
)


LEGEND = (
    "Each level: users = spawn rate, statistics reset once all users run; figures over the rest of the run.",
    "req/s and output tok/s count successful requests; latency = until the last byte; TTFT = until the first"
    " content chunk (streamed requests); TPOT = (latency - TTFT) / (tokens - 1), mean.",
    "client CPU: the Locust process tree, % of one core; host busy: all of the host's CPUs, in cores"
    " (the host's count is above); server CPU: the server's process tree when its pid was given;"
    " other load: host busy - client - server, i.e. work that is not part of this sweep.",
)


@dataclass
class LevelResult:
    """One concurrency level against one target."""

    users: int
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    ttft_samples: int = 0
    tpot_mean_ms: float | None = None
    output_tokens_per_s: float = 0.0
    error_rate: float = 0.0
    client_cpu_s: float = 0.0
    client_cpu_pct: float = 0.0
    host_busy_cores: float | None = None
    server_cpu_cores: float | None = None
    other_load_cores: float | None = None
    window_s: float = 0.0
    loadavg_before: str = ""
    loadavg_after: str = ""
    exit_code: int | None = None


@dataclass
class SweepReport:
    """Everything ``summary.json`` holds: the run's settings, then each target's levels."""

    meta: dict[str, Any]
    targets: dict[str, list[LevelResult]] = field(default_factory=dict)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a Locust ``*_stats.csv``."""
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def number(text: str | None) -> float | None:
    """A CSV cell as a float; None for "N/A", empty or missing."""
    try:
        value = float(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None
    return value if value is None or math.isfinite(value) else None


def find(rows: Iterable[Row], kind: str, name: str | None = None) -> list[Row]:
    return [r for r in rows if r.get("Type") == kind and (name is None or r.get("Name") == name)]


def level_from_rows(users: int, rows: Sequence[Row]) -> LevelResult:
    """The Locust figures of one level (client CPU and host load are filled in by the caller)."""
    res = LevelResult(users=users)
    for req in find(rows, REQUEST_TYPE, REQUEST_NAME)[:1]:
        res.requests = int(number(req["Request Count"]) or 0)
        res.failures = int(number(req["Failure Count"]) or 0)
        # Locust's Requests/s counts failures too; the table's req/s are the successful ones
        ok_share = (res.requests - res.failures) / res.requests if res.requests else 0.0
        res.rps = (number(req["Requests/s"]) or 0.0) * ok_share
        res.latency_p50_ms, res.latency_p95_ms, res.latency_p99_ms = (
            number(req[p]) for p in ("50%", "95%", "99%")
        )
        res.error_rate = res.failures / res.requests if res.requests else 0.0
    for ttft in find(rows, TTFT)[:1]:
        res.ttft_samples = int(number(ttft["Request Count"]) or 0)
        res.ttft_p50_ms, res.ttft_p95_ms = number(ttft["50%"]), number(ttft["95%"])
    for tpot in find(rows, TPOT)[:1]:
        res.tpot_mean_ms = number(tpot["Average Response Time"])
    res.output_tokens_per_s = sum(
        (number(r["Requests/s"]) or 0.0) * (number(r["Average Content Size"]) or 0.0)
        for r in find(rows, TOKENS)
    )
    return res


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def ratio_rows(primary: Sequence[LevelResult], other: Sequence[LevelResult]) -> list[dict[str, Any]]:
    """Per level present in both: primary / other for each of RATIOS."""
    by_users = {r.users: r for r in other}
    rows = []
    for mine in primary:
        theirs = by_users.get(mine.users)
        if theirs is not None:
            cells = {key: ratio(getattr(mine, key), getattr(theirs, key)) for key, _ in RATIOS}
            rows.append({"users": mine.users, **cells})
    return rows


def fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return pattern.format(int(value)) if pattern == "{:d}" else pattern.format(float(value))


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def level_table(levels: Sequence[LevelResult]) -> str:
    body = [[fmt(getattr(lv, key), pattern) for key, _, pattern in COLUMNS] for lv in levels]
    return markdown_table([title for _, title, _ in COLUMNS], body)


def ratio_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = [[str(r["users"])] + [fmt(r[key], "{:.3f}") for key, _ in RATIOS] for r in rows]
    return markdown_table(["users", *(title for _, title in RATIOS)], body)


def render_markdown(report: SweepReport) -> str:
    """``summary.md``: settings, one table per target, the ratio table when two targets ran."""
    meta = report.meta
    out = [f"# Load sweep {meta.get('started', '')}", ""]
    out += [f"- {key}: {value}" for key, value in meta.items() if not isinstance(value, dict | list)]
    out += ["", "\n>\n".join(f"> {line}" for line in LEGEND)]
    names = list(report.targets)
    for name in names:
        out += ["", f"## {name}", "", level_table(report.targets[name])]
    if len(names) == 2:
        rows = ratio_rows(report.targets[names[0]], report.targets[names[1]])
        out += ["", f"## {names[0]} / {names[1]}", "", ratio_table(rows)]
    out += ["", "## Host load", "", markdown_table(
        ["target", "users", "loadavg before", "loadavg after"],
        [[n, str(lv.users), lv.loadavg_before, lv.loadavg_after] for n in names for lv in report.targets[n]],
    )]  # fmt: skip
    return "\n".join(out) + "\n"


def to_json(report: SweepReport) -> str:
    """``summary.json``: strict JSON (no NaN), ratios included when two targets ran."""
    doc: dict[str, Any] = {"meta": report.meta, "targets": {}}
    for name, levels in report.targets.items():
        doc["targets"][name] = [asdict(lv) for lv in levels]
    names = list(report.targets)
    if len(names) == 2:
        doc["ratios"] = {
            "of": names,
            "levels": ratio_rows(report.targets[names[0]], report.targets[names[1]]),
        }
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"
