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

A grammar ends an answer long before ``--output-len``, and a short answer costs more per token (its
prompt is a larger share of the work), so each grammar-held body also gets a baseline of its own:
``plain@BODY``, plain chat of exactly as many output tokens as BODY's answers had on average, on the
same server in the same round. The ratios to the baseline are what the tool call or the schema costs.

One server at a time on the same host, each with the same engine settings (:class:`runner.EngineSettings`)
and the same grammar settings: Switchyard with the hermes parser, vLLM as the parity study's
``same-engine`` pairing (its JSON tool-call path, xgrammar without free whitespace; with its default
structural tags the random-weights model writes arguments that never end, a different workload).
Each bench records the CPU time of the server's process tree, of the client, of everything else on
the host, the hypervisor's steal and the load average, and keeps the client's record of every
request (``agentbench-SERVER-CELL-rROUND-requests.json.gz``: times, token counts, the text, from
which a JSON answer is checked against its schema). Prints and writes ``agentbench.md`` and
``agentbench.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema

from loadtest import proctree, runner
from loadtest.parity import KEY, PAIRS, switchyard_target, vllm_target
from loadtest.paritycases import PERSON_SCHEMA, TIME, WEATHER
from loadtest.report import fmt, json_text, markdown_table, ratio, raw, read_json, results_dir
from loadtest.runner import EngineSettings, Target
from worker.vllm_engine import model_threads, usable_cpus

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
SCHEMAS: dict[str, dict[str, Any]] = {"json_schema": PERSON_SCHEMA}
"""The bodies whose answers (their text) must match a schema."""
FIGURES = (
    ("output_throughput", "output tok/s", "{:.0f}"),
    ("request_throughput", "requests/s", "{:.1f}"),
    ("tokens_per_request", "output tokens/request", "{:.1f}"),
    ("prompt_tokens_per_request", "prompt tokens/request", "{:.0f}"),
    ("median_ttft_ms", "TTFT p50 ms", "{:.0f}"),
    ("p95_ttft_ms", "TTFT p95 ms", "{:.0f}"),
    ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
    ("median_e2el_ms", "latency p50 ms", "{:.0f}"),
    ("failed", "failed", "{:d}"),
    ("held_pct", "answers matching the schema %", "{:.0f}"),
    ("server_cpu_ms_per_1k", "server CPU ms / 1k tokens", "{:.0f}"),
    ("server_cpu_ms_per_request", "server CPU ms / request", "{:.1f}"),
    ("client_cpu_ms_per_1k", "client CPU ms / 1k tokens", "{:.0f}"),
    ("other_load_cores", "other load, cores", "{:.2f}"),
    ("steal_pct", "CPU stolen %", "{:.1f}"),
    ("load_average", "load average", "{:.1f}"),
)


def targets(args: argparse.Namespace, model_dir: Path) -> list[Target]:
    """Both servers with the same engine settings, the model's threads included: Switchyard's worker
    computes on the host's CPUs less one, and vLLM's server, in-process (``uni``), on all of them,
    whose barriers wait for whichever core other work holds (on a shared 2-core host its plain chat
    ran 6 times slower than Switchyard's)."""
    engine = EngineSettings(max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib)
    vllm = vllm_target(PAIRS["same-engine"], engine, model_dir, args.model_name)
    threads = {
        "OMP_NUM_THREADS": str(model_threads(usable_cpus(), configured=os.environ.get("OMP_NUM_THREADS")))
    }
    switchyard = switchyard_target(PAIRS["same-engine"], engine, model_dir, args.model_name)
    return [replace(vllm, name="vllm", env=vllm.env | threads), replace(switchyard, name="switchyard")]


def held_pct(texts: Sequence[str | None], schema: dict[str, Any]) -> float | None:
    """The share of answers whose text is JSON matching ``schema``, in percent."""
    if not texts:
        return None
    held = 0
    for text in texts:
        try:
            jsonschema.validate(json.loads(text or ""), schema)
        except (ValueError, jsonschema.ValidationError):
            continue
        held += 1
    return 100 * held / len(texts)


def bench(
    target: Target, pid: int, cell: str, output_len: int, args: argparse.Namespace, model_dir: Path
) -> dict[str, Any]:
    """One cell: the benchmark client against ``target`` with the fields of the cell's body (``plain``
    for ``plain@BODY``); its figures and the host's."""
    body = cell.partition("@")[0]
    name = f"agentbench-{target.name}-{cell}-r{args.round}"
    path, kept = args.out / f"{name}.json", args.out / f"{name}-requests.json"
    argv = ["--base-url", target.base_url.removesuffix("/v1"), "--model", args.model_name, "--chat"]
    argv += ["--tokenizer", str(model_dir), "--api-key", KEY, "--json", str(path), "--requests", str(kept)]
    argv += ["--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts)]
    argv += ["--input-len", str(args.input_len), "--output-len", str(output_len)]
    argv += ["--extra-body", json.dumps(BODIES[body])]
    argv += [] if body == "plain" else ["--no-ignore-eos"]
    path.unlink(missing_ok=True)
    before, steal = proctree.cpu_sample(pid), proctree.machine_steal()
    runner.client("vllmbench", argv, quiet=True, timeout=1800)
    window = proctree.cpu_window(before, proctree.cpu_sample(pid))
    wall, cores = window["window_s"], os.cpu_count() or 1
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"failed": args.num_prompts}
    path.unlink(missing_ok=True)  # its figures are kept in agentbench.json, its requests beside it
    requests = read_json(kept)["requests"] if raw(kept).exists() else []
    done, tokens = result.get("completed") or 0, result.get("total_output_tokens") or 0
    schema = SCHEMAS.get(cell)
    return result | {
        "output_len": output_len,
        "tokens_per_request": tokens / done if done else None,
        "prompt_tokens_per_request": (result.get("total_input_tokens") or 0) / done if done else None,
        "held_pct": held_pct([r["text"] for r in requests if not r["error"]], schema) if schema else None,
        # Per unit of work: the window also holds the client's start-up, when the server idles.
        "server_cpu_ms_per_1k": 1e6 * window["server_cpu_s"] / tokens if tokens else None,
        "server_cpu_ms_per_request": 1e3 * window["server_cpu_s"] / done if done else None,
        "client_cpu_ms_per_1k": 1e6 * window["bench_process_cpu_s"] / tokens if tokens else None,
        "other_load_cores": window["other_load_cores"],
        "steal_pct": 100 * (proctree.machine_steal() - steal) / (wall * cores),
        "load_average": os.getloadavg()[0],
    }


def run(target: Target, args: argparse.Namespace, model_dir: Path) -> dict[str, dict[str, Any]]:
    """Every body against one server, started for them and stopped after, then each grammar-held
    body's plain baseline of the same length."""
    log = args.out / f"agentbench-{target.name}-r{args.round}.log"
    print(f"=== {target.name}, round {args.round}: {shlex.join(target.argv)}", flush=True)
    with runner.running(target, log) as proc:
        runner.wait_ready(proc, target, args.model_name, KEY, args.ready_timeout, log)
        cells: dict[str, dict[str, Any]] = {}

        def measure(cell: str, output_len: int) -> None:
            cells[cell] = bench(target, proc.pid, cell, output_len, args, model_dir)
            shown = {k: cells[cell].get(k) for k, _, _ in FIGURES}
            print(f"{target.name} {cell}: {json.dumps(shown)}", flush=True)

        for body in args.bodies:
            measure(body, args.output_len)
        for body in args.bodies:
            if body != "plain" and (tokens := cells[body].get("tokens_per_request")):
                measure(f"plain@{body}", max(1, round(tokens)))
        return cells


def medians(rounds: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per server and body, the median of each figure over the rounds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for server, cells in rounds[0].items():
        out[server] = {}
        for body in cells:
            runs = [r[server].get(body, {}) for r in rounds]
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
    "median_e2el_ms",
    "server_cpu_ms_per_1k",
    "server_cpu_ms_per_request",
)
"""Figures of the servers, given as ratios; the rest describe the run."""


def baseline(cell: str) -> str | None:
    """The cell a cell is compared with on its own server: a grammar-held body with plain chat of
    its length, that with plain chat of ``--output-len``."""
    if cell == "plain":
        return None
    return "plain" if cell.startswith("plain@") else f"plain@{cell}"


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Each figure of each cell for both servers, Switchyard / vLLM, and each server's cell / its
    baseline (what the tool call or the schema costs there)."""
    head = [
        "cell",
        "figure",
        "vLLM",
        "Switchyard",
        "Switchyard / vLLM",
        "vLLM / baseline",
        "Switchyard / baseline",
    ]
    rows = [head]
    for cell_name in results["switchyard"]:
        cell = {server: results[server].get(cell_name, {}) for server in ("vllm", "switchyard")}
        base_name = baseline(cell_name)
        base = {server: results[server].get(base_name or "", {}) for server in ("vllm", "switchyard")}
        for key, label, pattern in FIGURES:
            if all(cell[s].get(key) is None for s in cell):
                continue
            row = [
                cell_name,
                label,
                fmt(cell["vllm"].get(key), pattern),
                fmt(cell["switchyard"].get(key), pattern),
            ]
            if key in COMPARED:
                row.append(fmt(ratio(cell["switchyard"].get(key), cell["vllm"].get(key)), "{:.2f}"))
                row += [
                    fmt(ratio(cell[s].get(key), base[s].get(key)), "{:.2f}") if base_name else ""
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
            f"{args.num_prompts} per cell, greedy; `plain` answers are exactly {args.output_len} tokens, "
            "the others end where their grammar does, and each `plain@BODY` is plain chat of exactly as "
            "many tokens as BODY's answers had on that server in that round: BODY's baseline (a "
            f"`plain@BODY`'s own is `plain`). Medians of {args.repeat} round(s), one server at a time, "
            "servers in alternating order. TTFT is to the first chunk with a choice: vLLM sends the "
            "role alone with the first token, Switchyard its first chunk with the first tokens its "
            "worker relays (gathered for up to 40 ms).",
            "",
            *(f"- `{t.name}`: `{shlex.join(t.argv)}`" for t in servers),
            "",
            table(results),
            "",
        ]
    )
    (args.out / "agentbench.md").write_text(text)
    (args.out / "agentbench.json").write_text(json_text({"medians": results, "rounds": rounds}))
    print(text)
    return 0
