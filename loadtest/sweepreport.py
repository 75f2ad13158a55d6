"""A concurrency sweep's figures, from Locust's CSV rows to ``summary.md``, ``summary.json`` and charts.

The rows are the ones ``locustfile.py`` produces (``POST /v1/chat/completions``, ``TTFT``, ``TPOT``,
``TOKENS/S``); the client CPU and host load figures come from the sweep driver.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.report import chart, fmt, json_text, markdown_table, ratio

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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

HOST_LOAD = ["target", "users", "loadavg before", "loadavg after"]

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


def level_table(levels: Sequence[LevelResult]) -> str:
    body = [[fmt(getattr(lv, key), pattern) for key, _, pattern in COLUMNS] for lv in levels]
    return markdown_table([[title for _, title, _ in COLUMNS], *body], "r" * len(COLUMNS))


def ratio_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = [[str(r["users"])] + [fmt(r[key], "{:.3f}") for key, _ in RATIOS] for r in rows]
    return markdown_table([["users", *(title for _, title in RATIOS)], *body], "r" * (1 + len(RATIOS)))


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
    load = [
        [n, str(lv.users), lv.loadavg_before, lv.loadavg_after] for n in names for lv in report.targets[n]
    ]
    out += ["", "## Host load", "", markdown_table([HOST_LOAD, *load], "r" * len(HOST_LOAD))]
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
    return json_text(doc)


# (chart file, [(field, axis title)]) — one subplot per field.
CHARTS = (
    ("throughput.png", [("output_tokens_per_s", "output tokens/s"), ("rps", "requests/s")]),
    (
        "latency.png",
        [
            ("latency_p50_ms", "latency p50 (ms)"),
            ("latency_p95_ms", "latency p95 (ms)"),
            ("ttft_p50_ms", "TTFT p50 (ms)"),
            ("ttft_p95_ms", "TTFT p95 (ms)"),
        ],
    ),
)


def plot_series(ax: Axes, targets: dict[str, list[LevelResult]], key: str, title: str) -> None:
    """One figure against concurrency, a line per target."""
    for name, levels in targets.items():
        points = [(lv.users, getattr(lv, key)) for lv in levels if getattr(lv, key) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    users = sorted({lv.users for levels in targets.values() for lv in levels})
    if len(users) > 1 and users[0] > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(users, [str(u) for u in users])
    ax.set_xlabel("concurrent users")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():  # a level without samples (e.g. only failures) leaves nothing to label
        ax.legend()


def write_charts(report: SweepReport, out_dir: Path) -> list[Path]:
    """``throughput.png`` and ``latency.png`` (CHARTS) in ``out_dir``; returns their paths."""
    paths = []
    for filename, panels in CHARTS:
        cols = 2
        rows = (len(panels) + cols - 1) // cols
        path = out_dir / filename
        with chart(path, rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False) as (fig, axes):
            for ax, (key, title) in zip(axes.ravel().tolist(), panels, strict=False):
                plot_series(ax, report.targets, key, title)
            fig.suptitle(f"{report.meta.get('label', 'load sweep')} — {filename.removesuffix('.png')}")
        paths.append(path)
    return paths
