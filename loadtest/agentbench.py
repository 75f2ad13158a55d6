"""Tool calls and JSON schemas under load: what they cost beside plain chat, on Switchyard and on
vLLM's own server doing the same.

    python -m loadtest agentbench                          # 64 streams, 200 prompts a cell
    python -m loadtest agentbench --repeat 2 --num-prompts 400

Three kinds of body, each sent by vLLM's own benchmark client (``vllmbench.py``, its ``openai-chat``
backend: random-dataset prompts of ``--input-len`` tokens, TTFT to the first chunk with a choice)
with the fields below added to every request, and greedy decoding (``temperature`` 0), so both
servers write the same answers:

- ``plain``: exactly ``--output-len`` tokens (``ignore_eos``), the baseline;
- ``tool_required``: two tools, ``tool_choice: required``, ``parallel_tool_calls: false``; the answer
  is one call held to its tool's schema, as long as the grammar makes it (at most ``--output-len``);
- ``json_schema``: a ``response_format`` JSON schema (what the SDK's ``parse()`` sends).

One server at a time on the same host, each with the same engine settings (:class:`runner.EngineSettings`)
and the same grammar settings: Switchyard with the hermes parser, vLLM as the parity study's
``same-engine`` pairing (its JSON tool-call path, xgrammar without free whitespace; with its default
structural tags the random-weights model writes arguments that never end, a different workload).
Each bench records the CPU time of the server's process tree, of the client, of everything else on
the host, the hypervisor's steal and the load average. Prints and writes ``agentbench.md`` and
``agentbench.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest import proctree, runner
from loadtest.parity import KEY, PAIRS, switchyard_target, vllm_target
from loadtest.paritycases import PERSON_SCHEMA, TIME, WEATHER
from loadtest.report import fmt, json_text, markdown_table, ratio, results_dir
from loadtest.runner import EngineSettings, Target

BODIES: dict[str, dict[str, Any]] = {
    "plain": {"temperature": 0},
    # One call a turn: with parallel calls allowed the grammar lets a list of calls run to the limit.
    "tool_required": {
        "temperature": 0,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    },
    "json_schema": {
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
    },
}
"""What each kind of body adds to the benchmark client's chat request."""
FIGURES = (
    ("output_throughput", "output tok/s", "{:.0f}"),
    ("request_throughput", "requests/s", "{:.1f}"),
    ("tokens_per_request", "output tokens/request", "{:.1f}"),
    ("median_ttft_ms", "TTFT p50 ms", "{:.0f}"),
    ("p95_ttft_ms", "TTFT p95 ms", "{:.0f}"),
    ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
    ("failed", "failed", "{:d}"),
    ("server_cpu_ms_per_1k", "server CPU ms / 1k tokens", "{:.0f}"),
    ("client_cpu_ms_per_1k", "client CPU ms / 1k tokens", "{:.0f}"),
    ("other_load_cores", "other load, cores", "{:.2f}"),
    ("steal_pct", "CPU stolen %", "{:.1f}"),
    ("load_average", "load average", "{:.1f}"),
)


def targets(args: argparse.Namespace, model_dir: Path) -> list[Target]:
    engine = EngineSettings(max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib)
    vllm = vllm_target(PAIRS["same-engine"], engine, model_dir, args.model_name)
    switchyard = switchyard_target(PAIRS["same-engine"], engine, model_dir, args.model_name)
    return [replace(vllm, name="vllm"), replace(switchyard, name="switchyard")]


def bench(target: Target, pid: int, body: str, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """One cell: the benchmark client against ``target`` with ``body``'s fields; its figures and the
    host's."""
    path = args.out / f"agentbench-{target.name}-{body}-r{args.round}.json"
    argv = ["--base-url", target.base_url.removesuffix("/v1"), "--model", args.model_name, "--chat"]
    argv += ["--tokenizer", str(model_dir), "--api-key", KEY, "--json", str(path)]
    argv += ["--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts)]
    argv += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    argv += ["--extra-body", json.dumps(BODIES[body])]
    argv += [] if body == "plain" else ["--no-ignore-eos"]
    path.unlink(missing_ok=True)
    before, steal = proctree.cpu_sample(pid), proctree.machine_steal()
    runner.client("vllmbench", argv, quiet=True, timeout=1800)
    window = proctree.cpu_window(before, proctree.cpu_sample(pid))
    wall, cores = window["window_s"], os.cpu_count() or 1
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"failed": args.num_prompts}
    path.unlink(missing_ok=True)  # its figures are kept in agentbench.json
    done, tokens = result.get("completed") or 0, result.get("total_output_tokens") or 0
    return result | {
        "tokens_per_request": tokens / done if done else None,
        # Per unit of work: the window also holds the client's start-up, when the server idles.
        "server_cpu_ms_per_1k": 1e6 * window["server_cpu_s"] / tokens if tokens else None,
        "client_cpu_ms_per_1k": 1e6 * window["bench_process_cpu_s"] / tokens if tokens else None,
        "other_load_cores": window["other_load_cores"],
        "steal_pct": 100 * (proctree.machine_steal() - steal) / (wall * cores),
        "load_average": os.getloadavg()[0],
    }


def run(target: Target, args: argparse.Namespace, model_dir: Path) -> dict[str, dict[str, Any]]:
    """Every body against one server, started for them and stopped after."""
    log = args.out / f"agentbench-{target.name}-r{args.round}.log"
    print(f"=== {target.name}, round {args.round}: {shlex.join(target.argv)}", flush=True)
    with runner.running(target, log) as proc:
        runner.wait_ready(proc, target, args.model_name, KEY, args.ready_timeout, log)
        cells = {}
        for body in args.bodies:
            cells[body] = bench(target, proc.pid, body, args, model_dir)
            shown = {k: cells[body].get(k) for k, _, _ in FIGURES}
            print(f"{target.name} {body}: {json.dumps(shown)}", flush=True)
        return cells


def medians(rounds: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per server and body, the median of each figure over the rounds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for server, cells in rounds[0].items():
        out[server] = {}
        for body in cells:
            runs = [r[server][body] for r in rounds]
            out[server][body] = {
                key: statistics.median(values)
                for key, _, _ in FIGURES
                if (values := [run[key] for run in runs if isinstance(run.get(key), int | float)])
            }
    return out


COMPARED = (
    "output_throughput",
    "request_throughput",
    "median_ttft_ms",
    "p95_ttft_ms",
    "p99_ttft_ms",
    "server_cpu_ms_per_1k",
)
"""Figures of the servers, given as ratios; the rest describe the run."""


def table(results: dict[str, dict[str, dict[str, Any]]], bodies: list[str]) -> str:
    """Each figure of each body for both servers, Switchyard / vLLM, and each server's body / its
    plain chat (what the tool call or the schema costs there)."""
    head = ["body", "figure", "vLLM", "Switchyard", "Switchyard / vLLM", "vLLM / plain", "Switchyard / plain"]
    rows = [head]
    for body in bodies:
        cell = {server: results[server].get(body, {}) for server in ("vllm", "switchyard")}
        plain = {server: results[server].get("plain", {}) for server in ("vllm", "switchyard")}
        for key, label, pattern in FIGURES:
            row = [
                body,
                label,
                fmt(cell["vllm"].get(key), pattern),
                fmt(cell["switchyard"].get(key), pattern),
            ]
            if key in COMPARED:
                row.append(fmt(ratio(cell["switchyard"].get(key), cell["vllm"].get(key)), "{:.2f}"))
                row += [
                    fmt(ratio(cell[s].get(key), plain[s].get(key)), "{:.2f}") if body != "plain" else ""
                    for s in ("vllm", "switchyard")
                ]
            else:
                row += ["", "", ""]
            rows.append(row)
    return markdown_table(rows, "llrrrrr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest agentbench", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--bodies", type=lambda s: s.split(","), default=list(BODIES), help=", ".join(BODIES))
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--repeat", type=int, default=1, help="rounds, servers in alternating order")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--model-name", default="switchyard-demo")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=results_dir("agentbench"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, _ = runner.resolve_model(args.model_dir, args.model_name)
    servers = targets(args, model_dir)
    rounds = []
    for round_ in range(1, args.repeat + 1):  # each round in the other order, so drift hits both
        args.round = round_
        order = servers if round_ % 2 else servers[::-1]
        done = {t.name: run(t, args, model_dir) for t in order}
        rounds.append({t.name: done[t.name] for t in servers})
    results = medians(rounds)
    text = "\n".join(
        [
            f"# Tool calls and JSON schemas at {args.concurrency} streams, beside plain chat",
            "",
            f"vLLM's benchmark client (`openai-chat`), random prompts of {args.input_len} tokens, "
            f"{args.num_prompts} per cell, greedy; plain answers are exactly {args.output_len} tokens, "
            f"the others end where their grammar does. Medians of {args.repeat} round(s), one server at "
            "a time, servers in alternating order.",
            "",
            *(f"- `{t.name}`: `{shlex.join(t.argv)}`" for t in servers),
            "",
            table(results, args.bodies),
            "",
        ]
    )
    (args.out / "agentbench.md").write_text(text)
    (args.out / "agentbench.json").write_text(json_text({"medians": results, "rounds": rounds}))
    print(text)
    return 0
