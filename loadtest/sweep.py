"""Run ``locustfile.py`` headless at a sweep of concurrency levels and write a report directory.

    python -m loadtest sweep --url http://127.0.0.1:8000 --levels 1,8,32,64 --duration 25
    python -m loadtest sweep --url http://127.0.0.1:8000 --compare-url http://127.0.0.1:8100 \\
        --compare-name vllm                                     # the same sweep against a second server

Per target, the served model is asked for (``GET /v1/models``) and the prompt length calibrated
once, so every level and both targets send the same requests. Each level is one Locust run: users =
spawn rate = the level (all start within a second), statistics reset once all run, and the run ended
with SIGTERM (which Locust treats as the end of its run) ``--duration`` seconds after the sweep saw
every user running. The sweep keeps that time itself rather than passing Locust's ``--run-time``,
which on a loaded host once ended a level 0.3 s after it began. With two targets the levels
alternate between them, so slow drifts in the host's other load hit both alike. While Locust runs,
the CPU time of its process tree and of the whole host is read from ``/proc``, over the window in
which all users run.

The report directory gets Locust's CSVs and log for every level (``<target>/users-<n>_*.csv``,
``<target>/users-<n>.log.gz``), ``summary.md``, ``summary.json``, ``throughput.png`` and
``latency.png``.

Exit status: 0 when every level ran without failures, 1 otherwise, 2 when a target could not be
prepared (unreachable, no model).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from loadtest import proctree, runner
from loadtest import sweepreport as sr
from loadtest import workload as wl
from loadtest.report import compress, fmt, scratch_dir

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
POLL_S = 1.0
PROGRESS_EVERY_S = 5.0
SPAWN_LIMIT_S = 60.0  # for Locust to start and have every user running
SHUTDOWN_GRACE_S = 30.0  # after the SIGTERM that ends a level, before Locust is stopped by force


@dataclass(frozen=True)
class Target:
    """A server to sweep, with what was resolved about it before the first level."""

    name: str
    url: str
    model: str = ""
    prompt_words: int = 0
    prompt_tokens: float = 0.0
    server_pid: int | None = None  # when given, the CPU of its process tree is measured too


def parse_levels(text: str) -> list[int]:
    levels = [int(v) for v in text.split(",") if v.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels must be positive integers, e.g. 1,8,32,64")
    return levels


def loadavg() -> str:
    """The first three fields of /proc/loadavg (1, 5, 15 minutes)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def prepare(target: Target, model: str, args: argparse.Namespace) -> Target:
    """Resolve the model and calibrate the prompt length against ``target``."""
    keys = wl.parse_keys(args.api_keys)
    with wl.make_client(target.url, keys) as client:
        model = model or wl.discover_model(client)
        probe = wl.Workload(model, 1, 1, seed=args.prompt_seed)
        words, counted = wl.calibrate_words(client, probe, args.prompt_tokens)
    return Target(target.name, target.url, model, words, counted, target.server_pid)


def locust_argv(target: Target, users: int, args: argparse.Namespace, prefix: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(users), "-r", str(users), "--stop-timeout", "0",
        "--host", wl.base_url(target.url), "--csv", str(prefix), "--csv-full-history", "--reset-stats",
        "--model", target.model, "--prompt-words", str(target.prompt_words),
        "--output-tokens", str(args.output_tokens), "--prompt-seed", str(args.prompt_seed),
        "--stream-weight", str(args.stream_weight), "--nonstream-weight", str(args.nonstream_weight),
    ]  # fmt: skip


def last_history(prefix: Path) -> dict[str, str] | None:
    """The newest row of the chat requests in Locust's history CSV, if any yet."""
    path = Path(f"{prefix}_stats_history.csv")
    if not path.exists():
        return None
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("Type") == sr.REQUEST_TYPE]
    return rows[-1] if rows and rows[-1].get("Total Failure Count") is not None else None


def progress_line(
    target: Target, users: int, elapsed: float, duration: float, row: dict[str, str] | None
) -> str:
    head = f"  [{target.name}] {users:>4} users {elapsed:5.0f}/{duration:.0f} s"
    if row is None:
        return head + "  starting"
    return (
        head + f"  running={row['User Count']} requests={row['Total Request Count']}"
        f" failures={row['Total Failure Count']} req/s={sr.number(row['Requests/s']) or 0:.2f}"
        f" latency p50={row['50%']} ms"
    )


@dataclass(frozen=True)
class CpuPoint:
    """CPU seconds used so far by the whole host, the Locust tree and the server's tree (if known)."""

    wall: float
    host_busy: float
    client: float
    server: float | None


def cpu_point(client_pid: int, server_pid: int | None) -> CpuPoint:
    trees = {"locust": client_pid} | ({} if server_pid is None else {"server": server_pid})
    used = proctree.cpu_seconds(trees)
    return CpuPoint(time.monotonic(), used["host"], used["locust"], used.get("server"))


def apply_window(res: sr.LevelResult, first: CpuPoint | None, last: CpuPoint | None) -> None:
    """CPU figures of the window in which all users ran, in ``res``."""
    if first is None or last is None or last.wall <= first.wall:
        return
    window = res.window_s = last.wall - first.wall
    res.client_cpu_s = last.client - first.client
    res.client_cpu_pct = 100.0 * res.client_cpu_s / window
    res.host_busy_cores = (last.host_busy - first.host_busy) / window
    if first.server is not None and last.server is not None:
        res.server_cpu_cores = (last.server - first.server) / window
        # whatever ran besides this sweep's client and the server: other people's work
        res.other_load_cores = max(
            0.0, res.host_busy_cores - res.server_cpu_cores - res.client_cpu_s / window
        )


def watch(proc: subprocess.Popen[bytes], target: Target, users: int, args: argparse.Namespace, prefix: Path
          ) -> tuple[CpuPoint | None, CpuPoint | None]:  # fmt: skip
    """Follow a Locust run, printing progress, and end it ``--duration`` s after all users run.

    Returns the CPU points at the start and end of that full-load window."""
    start = time.monotonic()
    first: CpuPoint | None = None
    last: CpuPoint | None = None
    full_since: float | None = None  # when the sweep first saw every user running
    stop_sent: float | None = None
    shown = 0.0
    while proc.poll() is None:
        now = time.monotonic()
        if stop_sent is not None and now - stop_sent > SHUTDOWN_GRACE_S:
            print(f"  [{target.name}] Locust still runs {SHUTDOWN_GRACE_S:.0f} s after SIGTERM", flush=True)
            proctree.stop_tree(proc)
            break
        if full_since is None and now - start > SPAWN_LIMIT_S:
            print(f"  [{target.name}] not all {users} users ran within {SPAWN_LIMIT_S:.0f} s", flush=True)
            proctree.stop_tree(proc)
            break
        point, row = cpu_point(proc.pid, target.server_pid), last_history(prefix)
        if first is None and row is not None and int(row["User Count"]) >= users:
            first, full_since = point, now  # all users run and the statistics were just reset
        if stop_sent is None:
            last = point
            if full_since is not None and now - full_since >= args.duration:
                proc.send_signal(signal.SIGTERM)
                stop_sent = now
        if now - shown >= PROGRESS_EVERY_S:
            shown = now
            print(progress_line(target, users, shown - start, args.duration, row), flush=True)
        time.sleep(POLL_S)
    return first, last


def run_level(target: Target, users: int, args: argparse.Namespace) -> sr.LevelResult:
    """One Locust run at ``users`` against ``target``; its CSVs and log go to ``out/<target>/``."""
    target_dir = args.out / target.name
    target_dir.mkdir(parents=True, exist_ok=True)
    prefix = target_dir / f"users-{users}"
    env = {"LOCUST_API_KEYS": args.api_keys}  # not on the command line: keys stay out of ps
    before = loadavg()
    proc = runner.spawn(locust_argv(target, users, args, prefix), env, Path(f"{prefix}.log"))
    first, last = watch(proc, target, users, args, prefix)
    res = sr.level_from_rows(users, sr.read_rows(Path(f"{prefix}_stats.csv")))
    res.exit_code = proc.wait()
    compress(Path(f"{prefix}.log"))
    if first is None:
        res.exit_code = res.exit_code or 1  # the level never ran at full load: not a result
    apply_window(res, first, last)
    res.loadavg_before, res.loadavg_after = before, loadavg()
    return res


def level_line(name: str, r: sr.LevelResult) -> str:
    return (
        f"  [{name}] {r.users:>4} users: {r.requests} requests, {r.failures} failed,"
        f" {r.output_tokens_per_s:.1f} output tok/s, {r.rps:.2f} req/s,"
        f" latency p50 {fmt(r.latency_p50_ms, '{:.0f}')} ms,"
        f" TTFT p50 {fmt(r.ttft_p50_ms, '{:.0f}')} ms, client CPU {r.client_cpu_pct:.0f}% of a core"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest sweep", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the server under test, e.g. http://127.0.0.1:8000")
    p.add_argument("--name", default="switchyard", help="its name in the report")
    p.add_argument("--model", default="", help="default: the first of GET /v1/models")
    p.add_argument("--server-pid", type=int, default=None, help="measure this process tree's CPU too")
    p.add_argument("--compare-url", default=None, help="a second OpenAI-compatible server, same sweep")
    p.add_argument("--compare-name", default="compare")
    p.add_argument("--compare-model", default="", help="default: the first of its GET /v1/models")
    p.add_argument("--compare-server-pid", type=int, default=None, help="the second server's process")
    p.add_argument(
        "--levels", type=parse_levels, default=[1, 8, 32, 64], help="concurrent users, e.g. 1,8,32,64"
    )
    p.add_argument("--duration", type=int, default=25, help="seconds per level")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--stream-weight", type=int, default=1)
    p.add_argument("--nonstream-weight", type=int, default=0)
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--api-keys", default=os.environ.get("LOCUST_API_KEYS", ""),
                   help="comma-separated, round-robin over users (default: $LOCUST_API_KEYS)")  # fmt: skip
    p.add_argument("--pause", type=float, default=2.0, help="seconds between levels")
    p.add_argument("--label", default="load sweep", help="title of the charts")
    p.add_argument("--note", default="", help="a remark for the report's head (e.g. what else ran)")
    p.add_argument("--out", type=Path, default=scratch_dir("sweep"))
    args = p.parse_args(argv)
    if args.duration < 3 or args.output_tokens < 1 or args.prompt_tokens < 1:
        p.error("--duration must be >= 3, --output-tokens and --prompt-tokens >= 1")
    if args.stream_weight < 0 or args.nonstream_weight < 0 or args.stream_weight + args.nonstream_weight < 1:
        p.error("--stream-weight and --nonstream-weight must be >= 0 and not both 0")
    return args


def redact(argv: Sequence[str]) -> list[str]:
    """The command line with API keys masked (the report is meant to be shared)."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("--api-keys="):
            arg = "--api-keys=***"
        out.append("***" if out and out[-1] == "--api-keys" else arg)
    return out


def describe(args: argparse.Namespace, targets: Sequence[Target], argv: Sequence[str]) -> dict[str, Any]:
    """The run's settings and context for the report's head."""
    return {
        "label": args.label,
        "note": args.note,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "loadtest", "sweep", *redact(argv)]),
        "levels": ",".join(map(str, args.levels)),
        "seconds per level": args.duration,
        "output tokens per request": args.output_tokens,
        "stream : non-stream weights": f"{args.stream_weight} : {args.nonstream_weight}",
        "API keys (round-robin)": len(wl.parse_keys(args.api_keys)),
        "host CPUs": os.cpu_count(),
        "locust": metadata.version("locust"),
        "loadavg at start": loadavg(),
        "targets": [
            {
                "name": t.name,
                "url": t.url,
                "model": t.model,
                "prompt_words": t.prompt_words,
                "prompt_tokens_counted": round(t.prompt_tokens, 1),
            }
            for t in targets
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = parse_args(given)
    wanted = [Target(args.name, args.url, server_pid=args.server_pid)]
    if args.compare_url:
        wanted.append(Target(args.compare_name, args.compare_url, server_pid=args.compare_server_pid))
    try:
        targets = [
            prepare(t, m, args) for t, m in zip(wanted, (args.model, args.compare_model), strict=False)
        ]
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
        print(f"sweep: cannot prepare the targets: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = sr.SweepReport(meta=describe(args, targets, given), targets={t.name: [] for t in targets})
    for t in targets:
        print(
            f"{t.name}: {t.url} model={t.model} prompt={t.prompt_words} words ~ {t.prompt_tokens:.1f} tokens"
        )
    for users in args.levels:
        for target in targets:
            result = run_level(target, users, args)
            report.targets[target.name].append(result)
            print(level_line(target.name, result), flush=True)
            time.sleep(args.pause)
    report.meta["loadavg at end"] = loadavg()
    report.meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    (args.out / "summary.md").write_text(sr.render_markdown(report))
    (args.out / "summary.json").write_text(sr.to_json(report))
    sr.write_charts(report, args.out)
    print(f"report: {args.out}/summary.md")
    failed = any(
        lv.failures or lv.exit_code not in (0, None) for lvs in report.targets.values() for lv in lvs
    )
    return 1 if failed else 0
