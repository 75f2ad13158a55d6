"""What the serving path costs per token: CPU time per 1,000 output tokens of each of its parts.

    python -m loadtest pathcost                              # 64, 256, 1,024 streams, both servers
    python -m loadtest pathcost --streams 64 --no-vllm       # Switchyard only
    python -m loadtest pathcost --gateway-processes 1,2 --sim-speed 20 --streams 1024  # the ceiling
    python -m loadtest pathcost --no-vllm --streams 64 --output-tokens 16,128     # per request, per event

Switchyard runs with the simulated engine (``switchyard up --engine sim``): no model computes, so
what is measured is the path itself: the gateway process(es), Redis, and the worker (its own code
and the simulator's few microseconds a token). vLLM's own OpenAI server runs on the real demo model
with its default configuration, and its front-end process (HTTP, detokenizing, SSE: the process that
is not the engine core) is measured the same way, at the same numbers of streams, in the same run.
Both are driven by the same closed-loop client (``bench.py``); its CPU is reported apart.

Per level: output tokens/s, CPU ms per 1,000 output tokens of every part and of the whole path, the
busiest part's share of a core (what saturates first), tokens per SSE event, and Redis messages
(PUBLISH, including those inside scripts) per token. Written as ``pathcost.json`` and ``summary.md``
under ``--out``, beside each server's log and the client's raw reports (gzip-compressed).

With several answer lengths (``--output-tokens 16,128``) each part's CPU is also split into what it
pays per request and per SSE event: a least-squares fit of CPU = a * requests + b * events over the
levels of one server and one number of streams (the same processes, so their warm-up is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis

from control.processes import free_port
from loadtest import proctree, runner
from loadtest.report import fmt, json_text, markdown_table, raw, read_json, results_dir
from loadtest.runner import Target

KEY = "sy-0123456789ab-pathcostpathcostpathcostpathcostpathcos"


@dataclass
class Level:
    server: str
    streams: int
    output_tokens: int = 0
    requests: int = 0
    """Requests answered while CPU was measured (the client's warm-up included)."""
    events: float = 0.0
    """SSE data events those requests received (``[DONE]`` aside)."""
    tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds of each measured part during the run."""
    ms_per_1k: dict[str, float] = field(default_factory=dict)
    path_ms_per_1k: float = 0.0
    busiest: str = ""
    busiest_core_share: float = 0.0
    tokens_per_event: float = 0.0
    redis_messages_per_token: float | None = None
    client_cpu_s: float = 0.0
    ttft_p50_ms: float = 0.0
    errors: int = 0


def published(port: int) -> int:
    """PUBLISH commands Redis has run, those inside scripts included."""
    stats = cast(dict[str, Any], redis.Redis(port=port).info("commandstats"))  # a sync client's reply
    return int(stats.get("cmdstat_publish", {}).get("calls", 0))


WARMUP = 8
"""The client's own warm-up requests, inside the measured CPU window."""


@dataclass
class Split:
    """A part's CPU per request and per SSE event, fitted over levels that differ in answer length."""

    server: str
    streams: int
    part: str
    ms_per_request: float
    ms_per_event: float
    worst_residual: float
    """The fit's largest miss on a level's CPU, as a share of it."""


def fit(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Least-squares ``a, b`` of ``z = a * x + b * y`` over ``(x, y, z)`` points (exact with two), and
    the largest miss as a share of ``z``."""
    xx = sum(x * x for x, _, _ in points)
    xy = sum(x * y for x, y, _ in points)
    yy = sum(y * y for _, y, _ in points)
    xz = sum(x * z for x, _, z in points)
    yz = sum(y * z for _, y, z in points)
    det = xx * yy - xy * xy
    if det == 0:
        raise ValueError("the points do not separate the two terms")
    a, b = (yy * xz - xy * yz) / det, (xx * yz - xy * xz) / det
    worst = max((abs(a * x + b * y - z) / z for x, y, z in points if z > 0), default=0.0)
    return a, b, worst


def split(levels: list[Level]) -> list[Split]:
    """Each part's CPU = a * requests + b * events, for each server and number of streams measured
    at two or more answer lengths."""
    groups: dict[tuple[str, int], list[Level]] = {}
    for lv in levels:
        groups.setdefault((lv.server, lv.streams), []).append(lv)
    fits: list[Split] = []
    for (server, streams), group in groups.items():
        if len({lv.output_tokens for lv in group}) < 2:
            continue
        for part in group[0].cpu_s:
            a, b, worst = fit([(lv.requests, lv.events, lv.cpu_s[part]) for lv in group])
            fits.append(Split(server, streams, part, round(a * 1e3, 3), round(b * 1e3, 4), round(worst, 3)))
    return fits


def bench(base_url: str, model: str, streams: int, requests: int, tokens: int, out: Path) -> dict[str, Any]:
    argv = ["--base-url", base_url, "--model", model, "--api-key", KEY]
    argv += ["--concurrency", str(streams), "--requests", str(requests), "--output-tokens", str(tokens)]
    # No calibration probes and a short warm-up: their requests would count against the measured
    # tokens' CPU (CPU is read around the whole client run).
    argv += ["--warmup", str(WARMUP), "--no-calibrate", "--json", str(out)]
    done = runner.client("bench", argv, quiet=True, timeout=3600)
    if not raw(out).exists():
        raise RuntimeError(f"bench failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return dict(read_json(out))


def measure(
    server: str,
    parts: dict[str, list[int]],
    base_url: str,
    model: str,
    streams: int,
    output_tokens: int,
    args: argparse.Namespace,
    redis_port: int | None,
) -> Level:
    requests = max(args.requests_per_stream * streams, 256)
    before = {name: proctree.own_seconds(pids) for name, pids in parts.items()}
    messages = published(redis_port) if redis_port else 0
    raw_data = args.out / f"{server.replace(' ', '-')}-{streams}-out{output_tokens}.json"
    summary = bench(base_url, model, streams, requests, output_tokens, raw_data)
    after = {name: proctree.own_seconds(pids) for name, pids in parts.items()}
    tokens = int(summary["output_tokens"])
    level = Level(server=server, streams=streams, output_tokens=output_tokens, tokens=tokens)
    answered = int(summary["requests_ok"]) + WARMUP
    level.requests = answered
    level.events = round(answered * float(summary.get("events_per_request_mean") or 0.0), 1)
    level.wall_s = float(summary["wall_s"])
    level.tokens_per_s = float(summary["output_tokens_per_s"])
    level.cpu_s = {k: round(after[k] - before[k], 3) for k in parts}
    level.ms_per_1k = {k: round(v * 1e6 / max(tokens, 1), 1) for k, v in level.cpu_s.items()}
    level.path_ms_per_1k = round(sum(level.ms_per_1k.values()), 1)
    level.busiest = max(level.cpu_s, key=lambda k: level.cpu_s[k])
    level.busiest_core_share = round(level.cpu_s[level.busiest] / level.wall_s, 2) if level.wall_s else 0.0
    level.tokens_per_event = float(summary.get("tokens_per_chunk") or 0.0)
    if redis_port:
        level.redis_messages_per_token = round((published(redis_port) - messages) / max(tokens, 1), 3)
    level.client_cpu_s = float(summary.get("client_cpu_s") or 0.0)
    level.ttft_p50_ms = float(summary.get("ttft_p50_ms") or 0.0)
    level.errors = int(summary.get("errors") or 0)
    return level


def warm_up(server: str, base_url: str, args: argparse.Namespace) -> None:
    """One unmeasured run at the first level: a fresh process's first requests pay for imports,
    caches and the tokenizer's first encodes (measured: the gateway's CPU per token at 64 streams
    was 108 ms per 1k tokens as the first level and 34 ms after another level had run)."""
    streams = args.streams[0]
    out = args.out / f"{server.replace(' ', '-')}-warmup.json"
    bench(base_url, "switchyard-demo", streams, max(2 * streams, 128), args.output_tokens[-1], out)


def run_switchyard(args: argparse.Namespace, processes: int) -> list[Level]:
    port, redis_port, metrics_port = free_port(), free_port(), free_port()
    env = {"SWITCHYARD_DEV_KEY": KEY, "XDG_CONFIG_HOME": str(args.out / "config")}
    env["SWITCHYARD_SIM_SPEED"] = str(args.sim_speed)
    # One tenant sends every stream: its default backlog (1,000 jobs) would refuse part of the
    # 1,024-stream level, and refused requests cost CPU that no token pays for.
    env["SWITCHYARD_TENANT_MAX_BACKLOG"] = "0"
    flags = ["--engine", "sim", "--sim-preset", args.sim_preset]
    flags += ["--port", str(port), "--redis-port", str(redis_port), "--workers", str(args.workers)]
    flags += ["--metrics-port", str(metrics_port)]  # not 9100: another system may be running on the host
    flags += ["--capacity", str(args.capacity), "--processes", str(processes)]
    name = "switchyard" if processes == 1 else f"switchyard --processes {processes}"
    target = runner.up(name, flags, env, port)
    log = args.out / f"switchyard-p{processes}.log"
    with runner.running(target, log) as proc:
        runner.wait_ready(proc, target, "switchyard-demo", KEY, 180, log)
        parts = runner.roles(proc.pid)
        warm_up(name, target.base_url, args)
        return [
            measure(name, parts, target.base_url, "switchyard-demo", s, n, args, redis_port)
            for s in args.streams
            for n in args.output_tokens
        ]


def run_vllm(args: argparse.Namespace) -> list[Level]:
    from worker.demo_model import ensure_demo_model

    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ensure_demo_model())]
    argv += ["--served-model-name", "switchyard-demo", "--port", str(port), "--api-key", KEY]
    argv += ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # the demo model's size, as Switchyard sizes it
    name = "vllm api_server"
    target = Target(name, argv, env, port)
    log = args.out / "vllm.log"
    with runner.running(target, log) as proc:
        runner.wait_ready(proc, target, "switchyard-demo", KEY, 600, log)
        warm_up(name, target.base_url, args)
        # Its front end is the server process itself; the engine core and any model runner are below it.
        front = {"front end": [proc.pid]}
        return [
            measure(name, front, target.base_url, "switchyard-demo", s, n, args, None)
            for s in args.streams
            for n in args.output_tokens
        ]


def table(levels: list[Level]) -> str:
    columns = [
        "server", "streams", "answer tokens", "output tok/s", "CPU ms per 1k tokens, by part", "whole path",
        "busiest part (share of a core)", "tokens per SSE event", "Redis messages per token", "client CPU s",
    ]  # fmt: skip
    rows = [columns]
    for lv in levels:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in lv.ms_per_1k.items())
        rows.append([
            lv.server, str(lv.streams), str(lv.output_tokens), f"{lv.tokens_per_s:.0f}", parts,
            f"{lv.path_ms_per_1k:.0f}",
            f"{lv.busiest} ({lv.busiest_core_share:.2f})", f"{lv.tokens_per_event:.1f}",
            fmt(lv.redis_messages_per_token, "{:.2f}"), f"{lv.client_cpu_s:.1f}",
        ])  # fmt: skip
    return markdown_table(rows, "lrrrlrlrrr")


def split_table(fits: list[Split]) -> str:
    rows = [["server", "streams", "part", "CPU ms per request", "CPU ms per SSE event", "worst miss"]]
    for f in fits:
        rows.append([
            f.server, str(f.streams), f.part, f"{f.ms_per_request:.3f}", f"{f.ms_per_event:.4f}",
            f"{f.worst_residual:.0%}",
        ])  # fmt: skip
    return markdown_table(rows, "lrlrrr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest pathcost", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256, 1024])
    p.add_argument("--requests-per-stream", type=int, default=8)
    p.add_argument(
        "--output-tokens",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[128],
        help="answer length(s); two or more also split each part's CPU per request and per event",
    )
    p.add_argument("--sim-preset", default="h100")
    p.add_argument("--sim-speed", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=4, help="simulated workers (default: 4)")
    p.add_argument("--capacity", type=int, default=256)
    p.add_argument("--gateway-processes", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM's own server")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--out", type=Path, default=results_dir("pathcost"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    levels: list[Level] = []
    for processes in args.gateway_processes:
        levels += run_switchyard(args, processes)
        print(table(levels), flush=True)
    if not args.no_vllm:
        levels += run_vllm(args)
    fits = split(levels)
    text = "\n".join(
        [
            f"# The path's CPU per token ({datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores)",
            "",
            f"Switchyard: `switchyard up --engine sim --sim-preset {args.sim_preset}` "
            f"(speed {args.sim_speed}x), "
            f"{args.workers} workers of capacity {args.capacity}. vLLM: its OpenAI server on the demo model, "
            f"dtype {args.dtype}, otherwise its defaults. "
            f"{', '.join(map(str, args.output_tokens))} output tokens a request, "
            f"{args.requests_per_stream} requests a stream (at least 256).",
            "",
            table(levels),
            "",
            *([split_table(fits), ""] if fits else []),
        ]
    )
    (args.out / "summary.md").write_text(text)
    (args.out / "pathcost.json").write_text(
        json_text(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "levels": [asdict(lv) for lv in levels],
                "split": [asdict(f) for f in fits],
            }
        )
    )
    print(text)
    return 0
