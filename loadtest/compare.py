"""Switchyard vs vLLM's own OpenAI server: same model, same engine settings, one run, one machine.

For each target in turn — never both at once, the machine has 2 cores — start the server
(``runner.py``: a session of its own, ready once ``GET /v1/models`` lists the model), run the bench
client (``python -m loadtest bench``, a process of its own so that its CPU figure is its own)
``--repeat`` times at each concurrency level, then stop the server and whatever it left running.
Around each bench run the CPU time of the server's process tree, of the client and of everything
else on the host is read from ``/proc``, so a run disturbed by other work shows it. Finally print
the figures side by side (medians over the repeats) with Switchyard / vLLM ratios, checked against
the design's targets, and write ``summary.json`` and ``summary.md`` (plus each server's log and each
raw bench report, gzip-compressed) to ``--out``.

    python -m loadtest compare                     # both targets, demo model, 64 streams
    python -m loadtest compare --only vllm --concurrency 1,64
    python -m loadtest compare --switchyard-cmd "switchyard up --port {port} --model {model_dir}"

The engine settings (dtype, eager mode, context length, batch size, KV-cache size) are defined once
in :class:`runner.EngineSettings`; vLLM gets them as its flags, Switchyard as ``switchyard up``'s flags
through the ``{engine_args}`` placeholder of ``--switchyard-cmd``, and both the same environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from control.processes import free_port
from loadtest import proctree, runner
from loadtest.report import fmt, json_text, markdown_table, ratio, raw, read_json, scratch_dir, text_table
from loadtest.runner import EngineSettings, ServerError, Target

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


@dataclass
class TargetOutcome:
    """What happened to one target: start-up time, bench reports per concurrency, failure if any."""

    name: str
    command: str
    ready_s: float | None = None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(concurrency) -> report
    failure: str | None = None


def build_targets(args: argparse.Namespace, engine: EngineSettings, model_dir: Path) -> dict[str, Target]:
    """The commands of the targets: vLLM and Switchyard from the one engine definition, and vLLM in
    its default configuration (what a user starts: only the model, its name, dtype and context
    length are given, as a fair comparison needs them the same)."""

    def vllm(port: int, settings: list[str]) -> list[str]:
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        argv += ["--served-model-name", args.model_name, "--host", "127.0.0.1", "--port", str(port)]
        return argv + settings + (["--api-key", args.api_key] if args.api_key else [])

    port, default_port = free_port(), free_port()
    same = ["--dtype", engine.dtype, "--max-model-len", str(engine.max_model_len)]
    switchyard = runner.switchyard_target(
        args.switchyard_cmd, engine, model_dir, args.model_name, args.api_key
    )
    return {
        "vllm": Target("vllm", vllm(port, engine.vllm_args()), engine.env(), port),
        "switchyard": switchyard,
        # vLLM sizes its own KV cache unless told; on a CPU host it asks for 92% of the node's memory
        # and refuses to start when that much is not free, so the cache size alone is given.
        "vllm-default": Target(
            "vllm-default",
            vllm(default_port, same),
            {"VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib)},
            default_port,
        ),
    }


def run_bench(
    target: Target, args: argparse.Namespace, concurrency: int, json_path: Path, server_pid: int
) -> dict[str, Any]:
    """Run the bench client against the target; returns its JSON report plus CPU accounting."""
    argv = ["--base-url", target.base_url, "--model", args.model_name]
    argv += ["--concurrency", str(concurrency), "--requests", str(args.requests), "--json", str(json_path)]
    argv += ["--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens)]
    argv += ["--warmup", str(args.warmup), "--seed", str(args.seed)]
    argv += ["--api-key", args.api_key] if args.api_key else []
    print(f"\n--- {target.name}: concurrency {concurrency} ---", flush=True)
    raw(json_path).unlink(missing_ok=True)
    before = proctree.cpu_sample(server_pid)
    code = runner.client("bench", argv).returncode
    window = proctree.cpu_window(before, proctree.cpu_sample(server_pid))
    if code == 2 or not raw(json_path).exists():
        raise ServerError(f"bench could not run against {target.name} (exit {code})")
    report: dict[str, Any] = read_json(json_path)
    print(f"server CPU {window['server_cpu_s']:.1f} s, other load {window['other_load_cores']:.2f} cores")
    return report | window | {"exit_code": code}


def run_target(target: Target, args: argparse.Namespace, levels: list[int], out: Path) -> TargetOutcome:
    """Start, wait, bench every concurrency level, stop — always stopping what was started."""
    shown = ["<api key>" if arg == args.api_key else arg for arg in target.argv]  # reports get shared
    outcome = TargetOutcome(target.name, shlex.join(shown))
    log = out / f"{target.name}.log"
    print(f"\n=== {target.name}: {outcome.command}", flush=True)
    try:
        proc = runner.start(target, log)
    except OSError as exc:
        outcome.failure = f"cannot start: {exc}"
        return outcome
    try:
        outcome.ready_s = runner.wait_ready(
            proc, target, args.model_name, args.api_key, args.ready_timeout, log
        )
        print(f"{target.name} ready after {outcome.ready_s:.1f} s", flush=True)
        for level in levels:
            paths = [out / f"bench-{target.name}-c{level}-run{i}.json" for i in range(1, args.repeat + 1)]
            outcome.reports[str(level)] = combine_runs(
                [run_bench(target, args, level, p, proc.pid) for p in paths]
            )
    except ServerError as exc:
        outcome.failure = str(exc)
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
    finally:
        runner.stop(target.name, proc, log)
    return outcome


def summary_markdown(meta: dict[str, Any], outcomes: dict[str, TargetOutcome], levels: list[str]) -> str:
    """The whole comparison as a markdown document."""
    reports = {name: outcome.reports for name, outcome in outcomes.items()}
    parts = [
        f"# Switchyard vs vLLM — {meta['started']}",
        "",
        f"{meta['host_cpus']} CPUs, vLLM {meta['vllm_version']}. Engine settings (both targets):",
        f"`{json.dumps(meta['engine'])}`. Bench options: `{json.dumps(meta['bench'])}`.",
        "",
    ]
    for name, outcome in outcomes.items():
        ready = f"ready in {outcome.ready_s:.1f} s" if outcome.ready_s is not None else "never ready"
        parts += [f"- **{name}** ({ready}): `{outcome.command}`"]
        if outcome.failure:
            parts += [f"  - FAILED: {outcome.failure.splitlines()[0]} (see {name}.log.gz)"]
    for level in levels:
        table = markdown_table(table_rows(reports, level)) or NO_RESULTS
        parts += ["", f"## Concurrency {level}", "", table, ""]
        parts += [f"- {line}" for line in notes(reports, level)]
    return "\n".join(parts) + "\n"


def write_summary(
    out: Path, meta: dict[str, Any], outcomes: dict[str, TargetOutcome], levels: list[str]
) -> None:
    """Print the comparison tables and write summary.json and summary.md."""
    reports = {name: outcome.reports for name, outcome in outcomes.items()}
    for level in levels:
        print(f"\n=== concurrency {level} ===")
        print(text_table(table_rows(reports, level)) or NO_RESULTS)
        print("\n".join(notes(reports, level)))
    summary = {
        "meta": meta,
        "targets": {name: asdict(outcome) for name, outcome in outcomes.items()},
        "ratios": {level: level_ratios(reports, level) for level in levels},
    }
    (out / "summary.json").write_text(json_text(summary))
    (out / "summary.md").write_text(summary_markdown(meta, outcomes, levels))
    print(f"\nwrote {out / 'summary.json'} and {out / 'summary.md'}")


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency: comma-separated integers >= 1")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest compare", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=None, help="default: the demo model (built if missing)")
    p.add_argument("--model-name", default=None, help="served model name (default: demo name or dir name)")
    p.add_argument("--only", choices=TARGETS, action="append", default=None,
                   help="run only these targets (repeatable; default: all three)")  # fmt: skip
    p.add_argument("--switchyard-cmd", default=runner.DEFAULT_SWITCHYARD_CMD,
                   help="placeholders: {port} {redis_port} {model_dir} {model_name} {api_key} {engine_args} "
                        "{vllm_engine_args} and each EngineSettings field, e.g. {max_model_len}")  # fmt: skip
    p.add_argument("--executor", choices=["uni", "mp"], default="uni",
                   help="vLLM's model executor on a CPU host, for both targets (default: uni, "
                        "in the engine core process; mp: vLLM's CPU default)")  # fmt: skip
    p.add_argument("--concurrency", type=parse_levels, default=[64], help="e.g. 64 or 1,64")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="bench runs per level; the report gives medians")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--api-key",
        default=None,
        help="sent by the bench; both servers require it (default: a fresh Switchyard-format key)",
    )
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for GET /v1/models")
    p.add_argument("--out", type=Path, default=scratch_dir("compare"))
    args = p.parse_args(argv)
    if min(args.repeat, args.requests, args.prompt_tokens, args.output_tokens) < 1 or args.warmup < 0:
        p.error("--repeat, --requests, --prompt-tokens, --output-tokens must be >= 1, --warmup >= 0")
    if args.api_key is None:
        from shared.tenants import new_key

        args.api_key = new_key()[1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = EngineSettings(executor=args.executor)
    model_dir, args.model_name = runner.resolve_model(args.model_dir, args.model_name)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = build_targets(args, engine, model_dir)
    bench = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "vllm_version": package_version("vllm-cpu", "vllm"),
        "engine": asdict(engine),
        "bench": bench | {"model_dir": str(model_dir)},
    }
    chosen = [name for name in TARGETS if args.only is None or name in args.only]
    outcomes = {name: run_target(targets[name], args, args.concurrency, args.out) for name in chosen}
    write_summary(args.out, meta, outcomes, [str(level) for level in args.concurrency])
    failed = any(o.failure or any(r.get("exit_code") for r in o.reports.values()) for o in outcomes.values())
    return 1 if failed else 0
