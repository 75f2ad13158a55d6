"""How every study reports: figures as text, Markdown and text tables, strict JSON, PNG charts, and
where results go.

Studies keep what is theirs (which figures, which rows, what a verdict says); the shapes they share
are written once here, so two reports of the same figure never disagree on how it is printed.

A run's summary (``summary.md``, its chart, the figures' JSON) is kept as written; its raw data (one
record per request, server and client logs) is kept gzip-compressed as ``NAME.gz``, and
:func:`read_text` / :func:`read_json` read a result either way, so ``NAME`` finds ``NAME.gz``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import shutil
import statistics
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESULTS = Path(__file__).resolve().parent / "results"
"""Where studies write by default, one directory per run (``tmp-*`` ones are not kept in git)."""


def results_dir(study: str) -> Path:
    """A run meant to be kept: ``loadtest/results/<date>-<study>``."""
    return RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-{study}"


def scratch_dir(study: str) -> Path:
    """A run to look at and throw away: ``loadtest/results/tmp-<study>-<time>``."""
    return RESULTS / f"tmp-{study}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


# --- figures -------------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no data."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def cut_point(values: Sequence[float], q: int) -> float:
    """The ``q``-th of the 99 cut points Python's ``statistics.quantiles`` gives (its exclusive
    method, which needs two values; NaN otherwise). The prefix-affinity study reports these."""
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else math.nan


def ratio(numerator: Any, denominator: Any) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is zero."""
    if isinstance(numerator, int | float) and isinstance(denominator, int | float) and denominator:
        return float(numerator) / float(denominator)
    return None


def fmt(value: Any, pattern: str) -> str:
    """A figure in a table cell: ``-`` when there is none (missing, or NaN from no data)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return pattern.format(int(value)) if pattern == "{:d}" else pattern.format(float(value))


# --- tables --------------------------------------------------------------------------------------


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Header and rows as aligned plain text: the first column to the left, the others to the right."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)] for r in rows
    ]
    return "\n".join("  ".join(line) for line in lines)


def markdown_table(rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """Header and rows as a Markdown table; ``align`` has an ``l`` or ``r`` per column (default: the
    first column to the left, figures to the right)."""
    if not rows:
        return ""
    head, *body = rows
    align = align or "l" + "r" * (len(head) - 1)
    rule = ["---" if side == "l" else "---:" for side in align]
    return "\n".join("| " + " | ".join(row) + " |" for row in [head, rule, *body])


# --- files ---------------------------------------------------------------------------------------


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float (e.g. a percentile of no data) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def json_text(doc: Any) -> str:
    """``doc`` as strict JSON (no NaN: strict parsers reject it; paths as text), with a final newline."""
    return json.dumps(json_ready(doc), indent=2, default=str) + "\n"


def raw(path: Path) -> Path:
    """Where raw data named ``path`` is kept: ``path.gz`` (or ``path`` if it already ends so)."""
    return path if path.suffix == ".gz" else path.with_name(f"{path.name}.gz")


def write_raw(path: Path, text: str) -> Path:
    """Write raw data (e.g. one record per request) compressed; returns where it went."""
    kept = raw(path)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(gzip.compress(text.encode(), mtime=0))  # mtime 0: same data, same bytes
    return kept


def compress(path: Path) -> Path:
    """Compress a finished raw file in place (a log once its process has ended): ``path.gz``."""
    kept = raw(path)
    with path.open("rb") as src, kept.open("wb") as out, gzip.GzipFile("", "wb", fileobj=out, mtime=0) as gz:
        shutil.copyfileobj(src, gz)
    path.unlink()
    return kept


def read_text(path: Path) -> str:
    """A result's text, kept as ``path`` or compressed (``path`` ending in ``.gz``, or ``path.gz``)."""
    if not path.exists() and raw(path).exists():
        path = raw(path)
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode()


def read_json(path: Path) -> Any:
    """A result's JSON, kept plain or compressed (see :func:`read_text`)."""
    return json.loads(read_text(path))


@contextlib.contextmanager
def chart(path: Path, rows: int = 1, cols: int = 1, **subplots: Any) -> Iterator[tuple[Figure, Any]]:
    """A figure of ``rows`` x ``cols`` axes (``plt.subplots``' options) to draw on in the block,
    then laid out and written to ``path`` as a PNG of 100 dpi."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
