"""PNG charts of a sweep: throughput and latency against concurrency, one line per target."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot's import
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from loadtest.sweepreport import LevelResult, SweepReport

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
    """Write every chart of CHARTS into ``out_dir``; returns their paths."""
    paths = []
    for filename, panels in CHARTS:
        cols = 2
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
        flat: Sequence[Axes] = axes.ravel().tolist()
        for ax, (key, title) in zip(flat, panels, strict=False):
            plot_series(ax, report.targets, key, title)
        fig.suptitle(f"{report.meta.get('label', 'load sweep')} — {filename.removesuffix('.png')}")
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
