"""As a user compares: `vllm serve` as shipped against `switchyard up` as shipped, on this host.

    python -m loadtest defaults                                   # 4 and 64 streams, demo model
    python -m loadtest defaults --variant "threads=2:OMP_NUM_THREADS=2"   # Switchyard with other env

Both servers get only what a fair comparison must make equal (the model, its served name, dtype,
context length, and on a CPU host the KV-cache size, without which vLLM does not start here);
everything else is each one's default. One server at a time, each driven by vLLM's own benchmark
client (``vllmbench.py``: random dataset, ``--input-len`` / ``--output-len`` tokens with
``ignore_eos``, ``--num-prompts`` at each concurrency, after as many unmeasured warm-up requests
as streams). ``--variant NAME:VAR=VALUE,...`` adds a Switchyard run with extra environment, to
choose defaults by measurement. Prints a table with each Switchyard run's ratio to vLLM and
writes ``defaults.json`` and ``summary.md`` to ``--out``. Each bench also records how much of the
host's CPU time the hypervisor took meanwhile (``steal`` in ``/proc/stat``): on a shared virtual
machine that changes from minute to minute, and a round in which one server lost far more than the
other says more about the host than about the servers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control.processes import free_port
from loadtest import proctree, runner
from loadtest.report import json_text, markdown_table, results_dir
from loadtest.runner import Target

KEY = "sy-0123456789ab-defaultsdefaultsdefaultsdefaultsdefaul"
FIGURES = (
    ("output_throughput", "output tok/s"),
    ("median_ttft_ms", "TTFT p50 ms"),
    ("p95_ttft_ms", "TTFT p95 ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("median_tpot_ms", "TPOT p50 ms"),
    ("median_itl_ms", "ITL p50 ms"),
    ("failed", "failed"),
    ("host_steal_pct", "host CPU stolen %"),
)


def targets(args: argparse.Namespace, model_dir: Path) -> list[Target]:
    same = engine_flags(args)
    kv = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    port = free_port()
    vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    vllm += ["--served-model-name", args.model_name, "--port", str(port), "--api-key", KEY, *same]
    out = [Target("vllm serve", vllm, kv, port)]
    for name, extra in [("switchyard up", {}), *args.variant]:
        out.append(switchyard_up(args, model_dir, name, extra))
    return out


def engine_flags(args: argparse.Namespace) -> list[str]:
    """What both servers are given alike on their command lines: dtype and context length."""
    return ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]


def switchyard_up(
    args: argparse.Namespace, model_dir: Path, name: str, env: dict[str, str], *flags: str
) -> Target:
    """``switchyard up`` as shipped but for what the comparison makes equal (and ``flags``)."""
    port, redis_port = free_port(), free_port()
    argv = runner.cli("up", "--model", str(model_dir), "--port", str(port), *flags)
    argv += ["--served-model-name", args.model_name, "--redis-port", str(redis_port), *engine_flags(args)]
    argv += ["--kv-cache-gib", str(args.kv_cache_gib)]
    env = {"SWITCHYARD_DEV_KEY": KEY, "XDG_CONFIG_HOME": str(args.out / "config"), **env}
    return Target(name, argv, env, port)


def bench_argv(
    target: Target, args: argparse.Namespace, model_dir: Path, level: int, prompts: int, path: Path
) -> list[str]:
    """``vllmbench``'s flags: ``prompts`` requests at ``level`` streams, the figures to ``path``."""
    argv = ["--base-url", target.base_url.removesuffix("/v1"), "--model", args.model_name]
    argv += ["--tokenizer", str(model_dir), "--api-key", KEY]
    argv += ["--concurrency", str(level), "--num-prompts", str(prompts), "--json", str(path)]
    argv += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    return argv


def bench(
    target: Target, args: argparse.Namespace, model_dir: Path, level: int, round_: int
) -> dict[str, Any]:
    path = args.out / f"{target.name.replace(' ', '-')}-c{level}-r{round_}.json"
    argv = bench_argv(target, args, model_dir, level, args.num_prompts, path)
    # As many unmeasured requests first as there are streams: a server just started (vLLM's own
    # showed it: TTFT p50 274 ms and answers in one burst on its first level) is measured warm.
    argv += ["--num-warmups", str(level)]
    wall, steal = time.monotonic(), proctree.machine_steal()
    runner.client("vllmbench", argv, quiet=True, timeout=3600)
    stolen = (proctree.machine_steal() - steal) / ((time.monotonic() - wall) * (os.cpu_count() or 1))
    result = dict(json.loads(path.read_text())) if path.exists() else {"failed": args.num_prompts}
    return result | {"host_steal_pct": 100 * stolen}


def run(target: Target, args: argparse.Namespace, model_dir: Path, round_: int) -> dict[str, dict[str, Any]]:
    log = args.out / f"{target.name.replace(' ', '-')}-r{round_}.log"
    print(f"=== {target.name}, round {round_}: {' '.join(target.argv)}", flush=True)
    with runner.running(target, log) as proc:
        runner.wait_ready(proc, target, args.model_name, KEY, 600, log)
        results = {}
        for level in args.concurrency:
            results[str(level)] = bench(target, args, model_dir, level, round_)
            print(f"{target.name} at {level}: {json.dumps(results[str(level)])}", flush=True)
        return results


def medians(rounds: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per server and level, the median of each figure over the rounds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in rounds[0]:
        out[name] = {}
        for level in rounds[0][name]:
            runs = [r[name][level] for r in rounds]
            out[name][level] = {
                key: statistics.median(values)
                for key, _ in FIGURES
                if (values := [run[key] for run in runs if isinstance(run.get(key), int | float)])
            }
    return out


def round_ratio(round_: dict[str, dict[str, dict[str, Any]]], name: str, base: str, level: str) -> str:
    ours, theirs = round_[name][level].get("output_throughput"), round_[base][level].get("output_throughput")
    return f"{ours / theirs:.2f}" if ours and theirs else "-"


def table(results: dict[str, dict[str, dict[str, Any]]], levels: list[int]) -> str:
    names = list(results)
    rows = [["streams", "figure", *names, *(f"{n} / vllm serve" for n in names[1:])]]
    for level in levels:
        for key, label in FIGURES:
            values = [results[n].get(str(level), {}).get(key) for n in names]
            base = values[0]
            cells = ["-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v) for v in values]
            comparable = key != "host_steal_pct"  # a fact about the host, not the server
            ratios = [
                f"{v / base:.2f}" if comparable and isinstance(v, int | float) and base else "-"
                for v in values[1:]
            ]
            rows.append([str(level), label, *cells, *ratios])
    return markdown_table(rows, "rl" + "r" * (2 * len(names) - 1))


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    return name, dict(pair.split("=", 1) for pair in assignments.split(",") if pair)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest defaults", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[4, 64])
    p.add_argument("--num-prompts", type=int, default=400)
    p.add_argument("--repeat", type=int, default=1, help="rounds, servers in alternating order")
    add_server_args(p)
    p.add_argument("--variant", type=parse_variant, action="append", default=[])
    p.add_argument("--out", type=Path, default=results_dir("defaults"))
    return p.parse_args(argv)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The workload's and the server's flags (what :func:`switchyard_up` and :func:`bench_argv` read)."""
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--model-name", default="switchyard-demo")


def model_dir_of(args: argparse.Namespace) -> Path:
    """``--model-dir``, or the demo model (built offline the first time)."""
    if args.model_dir is None:
        from worker.demo_model import ensure_demo_model

        args.model_dir = ensure_demo_model()
    return Path(args.model_dir).resolve()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir_of(args)
    servers = targets(args, model_dir)
    rounds = []
    for round_ in range(1, args.repeat + 1):  # each round in the other order, so drift hits both
        order = servers if round_ % 2 else servers[::-1]
        done = {t.name: run(t, args, model_dir, round_) for t in order}
        rounds.append({t.name: done[t.name] for t in servers})
    results = medians(rounds)
    base = servers[0].name
    ratios = {
        (t.name, level): " ".join(round_ratio(r, t.name, base, str(level)) for r in rounds)
        for t in servers[1:]
        for level in args.concurrency
    }
    text = "\n".join(
        [
            f"# `vllm serve` vs `switchyard up`, each as shipped ({datetime.now(UTC):%Y-%m-%d}, "
            f"{os.cpu_count()} cores)",
            "",
            f"vLLM's benchmark client, random dataset, {args.input_len} prompt / {args.output_len} output "
            f"tokens (ignore_eos), {args.num_prompts} prompts per level; model {args.model_name}, dtype "
            f"{args.dtype}, context {args.max_model_len}, KV cache {args.kv_cache_gib} GiB for both. "
            f"Medians of {args.repeat} round(s), servers in alternating order.",
            "",
            table(results, args.concurrency),
            "",
            "Output tokens/s against `vllm serve` in each round: "
            + "; ".join(
                f"{t.name} at {level}: {ratios[t.name, level]}"
                for level in args.concurrency
                for t in servers[1:]
            ),
            "",
        ]
    )
    (args.out / "summary.md").write_text(text)
    (args.out / "defaults.json").write_text(json_text({"medians": results, "rounds": rounds}))
    print(text)
    return 0
