"""Where a first token's time goes at one concurrency: ``switchyard up`` as shipped, driven by vLLM's
own client, and the latency histograms of its gateway and worker read before and after the run.

    python -m loadtest tails --concurrency 64 --num-prompts 1280 --repeat 2

Each round starts ``switchyard up`` with the settings ``defaults`` gives it, sends as many warm-up
requests as streams, reads the gateway's and the worker's ``/metrics``, runs the measured requests,
and reads them again. It prints the client's TTFT beside what each histogram saw of that run: its
mean, and the bucket bounds under which half, 90% and 99% of its observations fell. Between the
client's TTFT and the engine's own are the gateway's path to the queue, the queue, and the way back;
the histograms say which one grew. It measures the tree it is run from: to compare two trees, run it
from each checkout in turn, a round at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.processes import StartupError, check_port_free, free_port
from loadtest import defaults, runner
from loadtest.report import json_text, results_dir

HISTOGRAMS = (
    ("gateway", "switchyard:time_to_first_token_seconds", "gateway TTFT (job made -> first token)"),
    ("gateway", "switchyard:request_queue_time_seconds", "gateway queue time (enqueued -> started)"),
    ("worker", "switchyard:worker_queue_time_seconds", "worker queue time (job made -> taken)"),
    ("worker", "vllm:time_to_first_token_seconds", "engine TTFT (in the engine -> first token)"),
    ("gateway", "switchyard:gateway_event_loop_lag_seconds", "gateway event-loop lag"),
)


@dataclass
class Histogram:
    """One histogram of a ``/metrics`` page, its label sets added up."""

    buckets: dict[float, float] = field(default_factory=dict)
    """Upper bound -> observations at or below it (cumulative, as Prometheus gives them)."""
    total: float = 0.0
    count: float = 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        """What was observed between ``earlier`` and this reading."""
        return Histogram(
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total - earlier.total,
            self.count - earlier.count,
        )

    def bound(self, q: float) -> float:
        """The smallest bucket bound under which at least ``q`` of the observations fell."""
        found = self.bound_or_none(q)
        return math.inf if found is None else found

    def bound_or_none(self, q: float) -> float | None:
        """:meth:`bound`, None when no bucket holds that many (as when there are none)."""
        return next((le for le in sorted(self.buckets) if self.buckets[le] >= q * self.count - 1e-9), None)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


def parse(text: str, **labels: str) -> dict[str, Histogram]:
    """Every histogram of a Prometheus text page, by name, of its samples that carry ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            part = next((p for p in ("_bucket", "_sum", "_count") if sample.name.endswith(p)), None)
            if part is None or any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            h = found.setdefault(sample.name.removesuffix(part), Histogram())
            if part == "_bucket":
                if "le" in sample.labels:
                    bound = float(sample.labels["le"])  # "+Inf" included
                    h.buckets[bound] = h.buckets.get(bound, 0.0) + sample.value
            elif part == "_sum":
                h.total += sample.value
            else:
                h.count += sample.value
    return {name: h for name, h in found.items() if h.buckets}


Readings = dict[str, dict[str, Histogram]]
"""Role (gateway, worker) -> its histograms by name."""


def rows(before: Readings, after: Readings) -> list[dict[str, Any]]:
    """Per histogram of :data:`HISTOGRAMS`: what the run between the two readings observed."""
    out = []
    for role, name, label in HISTOGRAMS:
        if name not in after.get(role, {}):
            continue
        run = after[role][name].minus(before.get(role, {}).get(name, Histogram()))
        if run.count <= 0:
            continue
        out.append(
            {
                "figure": label,
                "count": int(run.count),
                "mean_ms": 1000 * run.mean,
                **{f"p{round(q * 100)}_under_ms": 1000 * run.bound(q) for q in (0.5, 0.9, 0.99)},
            }
        )
    return out


def two_free_ports() -> int:
    """A port free together with the next one (the gateway's metrics, then worker 1's)."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(StartupError):
            check_port_free("0.0.0.0", port + 1)  # as `switchyard up` checks worker 1's
            return port
    raise RuntimeError("no two adjacent free ports")


def scrape(ports: dict[str, int]) -> Readings:
    return {role: parse(runner.scrape(f"http://127.0.0.1:{p}/metrics", 10)) for role, p in ports.items()}


def bench(
    target: runner.Target, args: argparse.Namespace, model_dir: Path, prompts: int, path: Path
) -> dict[str, Any]:
    argv = defaults.bench_argv(target, args, model_dir, args.concurrency, prompts, path)
    runner.client("vllmbench", argv, quiet=True, timeout=3600)
    return dict(json.loads(path.read_text())) if path.exists() else {"failed": prompts}


def run_round(args: argparse.Namespace, model_dir: Path, round_: int) -> dict[str, Any]:
    metrics = two_free_ports()
    target = defaults.switchyard_up(args, model_dir, "switchyard up", {}, "--metrics-port", str(metrics))
    log = args.out / f"switchyard-up-r{round_}.log"
    ports = {"gateway": metrics, "worker": metrics + 1}
    with runner.running(target, log) as proc:
        runner.wait_ready(proc, target, args.model_name, defaults.KEY, 600, log)
        bench(target, args, model_dir, args.concurrency, args.out / f"warmup-r{round_}.json")
        before = scrape(ports)
        client = bench(target, args, model_dir, args.num_prompts, args.out / f"bench-r{round_}.json")
        after = scrape(ports)
    return {"client": client, "histograms": rows(before, after)}


def table(result: dict[str, Any]) -> str:
    c = result["client"]
    lines = [
        "| figure | n | mean ms | p50 under ms | p90 under ms | p99 under ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| client TTFT (vLLM's client; exact p50 / p99) | {c.get('completed', 0)} | "
        f"{c.get('mean_ttft_ms', math.nan):.1f} | {c.get('median_ttft_ms', math.nan):.1f} | - | "
        f"{c.get('p99_ttft_ms', math.nan):.1f} |",
    ]
    for r in result["histograms"]:
        lines.append(
            f"| {r['figure']} | {r['count']} | {r['mean_ms']:.1f} | {_ms(r['p50_under_ms'])} | "
            f"{_ms(r['p90_under_ms'])} | {_ms(r['p99_under_ms'])} |"
        )
    return "\n".join(lines)


def _ms(value: float) -> str:
    return "+Inf" if math.isinf(value) else f"{value:g}"


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest tails", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=1280)
    p.add_argument("--repeat", type=int, default=1, help="rounds, each on a fresh `switchyard up`")
    defaults.add_server_args(p)
    p.add_argument("--out", type=Path, default=results_dir("tails"))
    return p.parse_args(None if argv is None else list(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = defaults.model_dir_of(args)
    results, parts = [], []
    for round_ in range(1, args.repeat + 1):
        result = run_round(args, model_dir, round_)
        results.append(result)
        c = result["client"]
        parts += [
            f"## Round {round_}: {c.get('output_throughput', 0):,.0f} output tokens/s, "
            f"{c.get('failed', 0)} failed",
            "",
            table(result),
            "",
        ]
        print("\n".join(parts[-4:]), flush=True)
    head = (
        f"# Where the first token's time goes: `switchyard up`, {args.concurrency} streams\n\n"
        f"vLLM's benchmark client, random dataset, {args.input_len} prompt / {args.output_len} output "
        f"tokens, {args.num_prompts} prompts after {args.concurrency} warm-ups; histogram figures are "
        "bucket bounds (Prometheus buckets), the client's are exact.\n"
    )
    (args.out / "summary.md").write_text("\n".join([head, *parts]))
    (args.out / "tails.json").write_text(json_text(results))
    return 0 if all(not r["client"].get("failed") for r in results) else 1
