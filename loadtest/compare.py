"""Switchyard vs vLLM's own OpenAI server: same model, same engine settings, one run, one machine.

For each target in turn — never both at once, the machine has 2 cores — start the server as a
subprocess in its own process group, poll ``GET /v1/models`` until it lists the model, run
``python -m loadtest bench`` against it (as a subprocess, so the client's CPU figure is its own) ``--repeat``
times at each concurrency level, then stop the whole process group (SIGINT, then SIGTERM, then
SIGKILL) and whatever it left running (``proctree.py``). Around each bench run the CPU time of the
server's process tree, of the client and of everything else on the host is read from ``/proc``, so a
run disturbed by other work shows it. Finally print the figures side by side (medians over the
repeats) with Switchyard / vLLM ratios and write ``summary.json`` and ``summary.md`` (plus each
server's log and each raw bench report) to ``--out``.

    python -m loadtest compare                     # both targets, demo model, 64 streams
    python -m loadtest compare --only vllm --concurrency 1,64
    python -m loadtest compare --switchyard-cmd "switchyard up --port {port} --model {model_dir}"

The engine settings (dtype, eager mode, context length, batch size, KV-cache size) are defined once
in :class:`EngineSettings`; vLLM gets them as its flags, Switchyard as ``switchyard up``'s flags
through the ``{engine_args}`` placeholder of ``--switchyard-cmd``, and both the same environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from control.processes import free_port, wait_until
from loadtest import comparison, proctree
from loadtest.report import json_text, scratch_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SWITCHYARD_CMD = (
    "switchyard up --port {port} --model {model_dir} --served-model-name {model_name}"
    " --redis-port {redis_port} {engine_args}"
)


@dataclass(frozen=True)
class EngineSettings:
    """The engine configuration both targets must run with; the single source of truth."""

    dtype: str = "float32"
    enforce_eager: bool = True
    max_model_len: int = 2048
    max_num_seqs: int = 256
    kv_cache_gib: int = 2
    executor: str = "uni"
    """Where vLLM runs the model on a CPU host: ``uni`` in the engine core process (what Switchyard's
    workers do there), ``mp`` in a process of its own (vLLM's CPU default, whose shared-memory
    queues spin on both cores of a small host)."""

    def vllm_args(self) -> list[str]:
        """The settings as flags of vLLM's OpenAI server."""
        args = ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]
        args += ["--max-num-seqs", str(self.max_num_seqs)]
        args += ["--distributed-executor-backend", "uni"] if self.executor == "uni" else []
        return args + (["--enforce-eager"] if self.enforce_eager else [])

    def switchyard_args(self) -> list[str]:
        """The settings as flags of ``switchyard up`` (eager mode goes through :meth:`env`)."""
        return [
            *("--dtype", self.dtype, "--max-model-len", str(self.max_model_len)),
            *("--capacity", str(self.max_num_seqs), "--kv-cache-gib", str(self.kv_cache_gib)),
        ]

    def env(self) -> dict[str, str]:
        """Environment for both targets: vLLM's CPU KV-cache size and executor (vLLM takes ``uni`` on
        CPU only with multiprocessing off; Switchyard's workers read the same variable), Switchyard
        workers' eager mode."""
        return {
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if self.executor == "uni" else "1",
            "SWITCHYARD_ENFORCE_EAGER": str(self.enforce_eager).lower(),
        }


@dataclass(frozen=True)
class Target:
    """One server to benchmark: how to start it and where it will listen."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    redis_url: str | None = None  # the embedded Redis of a Switchyard target's default command

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@dataclass
class TargetOutcome:
    """What happened to one target: start-up time, bench reports per concurrency, failure if any."""

    name: str
    command: str
    ready_s: float | None = None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(concurrency) -> report
    failure: str | None = None


class ServerError(RuntimeError):
    """The server did not start, did not become ready, or died."""


def switchyard_target(
    cmd: str, engine: EngineSettings, model_dir: Path, model_name: str, api_key: str | None
) -> Target:
    """Switchyard started by the command template ``cmd`` (see ``--switchyard-cmd``) on free ports."""
    port, redis_port = free_port(), free_port()
    fields = asdict(engine) | {
        "port": port, "redis_port": redis_port, "model_dir": model_dir, "model_name": model_name,
        "api_key": api_key or "", "engine_args": shlex.join(engine.switchyard_args()),
        "vllm_engine_args": shlex.join(engine.vllm_args()),
    }  # fmt: skip
    argv = shlex.split(cmd.format(**fields))
    # switchyard up registers this key for its development tenant instead of making one.
    env = engine.env() | {"SWITCHYARD_DEV_KEY": api_key or ""}
    return Target("switchyard", argv, env, port, redis_url=f"redis://127.0.0.1:{redis_port}/0")


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
    switchyard = switchyard_target(args.switchyard_cmd, engine, model_dir, args.model_name, args.api_key)
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


def start_server(target: Target, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the server in a new process group, output to ``log_path``; venv's bin on PATH."""
    env = os.environ | target.env
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            target.argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def log_tail(log_path: Path, lines: int = 15) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(
    proc: subprocess.Popen[bytes], target: Target, model: str, api_key: str | None, timeout: float, log: Path
) -> float:
    """Poll ``GET /v1/models`` until it lists ``model``; returns seconds waited."""
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = "no answer yet"

    def exited() -> None:
        if proc.poll() is not None:
            raise ServerError(f"{target.name} exited with {proc.returncode}:\n{log_tail(log)}")

    with httpx.Client(timeout=5.0, trust_env=False, headers=headers) as client:

        def lists_model() -> bool:
            nonlocal last
            try:
                resp = client.get(f"{target.base_url}/models")
                ids = [m.get("id") for m in resp.json().get("data", [])] if resp.status_code == 200 else []
                last = f"HTTP {resp.status_code}, models {ids}"
                return model in ids
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                return False

        if wait_until(lists_model, timeout, interval=1.0, watch=exited):
            return time.monotonic() - start
    raise ServerError(f"{target.name} not ready after {timeout:.0f} s ({last}):\n{log_tail(log)}")


def run_bench(
    target: Target, args: argparse.Namespace, concurrency: int, json_path: Path, server_pid: int
) -> dict[str, Any]:
    """Run bench.py against the target as a subprocess; returns its JSON report plus CPU accounting."""
    argv = [sys.executable, "-m", "loadtest", "bench", "--base-url", target.base_url]
    argv += ["--model", args.model_name]
    argv += ["--concurrency", str(concurrency), "--requests", str(args.requests), "--json", str(json_path)]
    argv += ["--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens)]
    argv += ["--warmup", str(args.warmup), "--seed", str(args.seed)]
    argv += ["--api-key", args.api_key] if args.api_key else []
    print(f"\n--- {target.name}: concurrency {concurrency} ---", flush=True)
    json_path.unlink(missing_ok=True)
    before = proctree.cpu_sample(server_pid)
    code = subprocess.call(argv, cwd=REPO_ROOT)
    window = proctree.cpu_window(before, proctree.cpu_sample(server_pid))
    if code == 2 or not json_path.exists():
        raise ServerError(f"bench could not run against {target.name} (exit {code})")
    report: dict[str, Any] = json.loads(json_path.read_text())
    print(f"server CPU {window['server_cpu_s']:.1f} s, other load {window['other_load_cores']:.2f} cores")
    return report | window | {"exit_code": code}


def run_target(target: Target, args: argparse.Namespace, levels: list[int], out: Path) -> TargetOutcome:
    """Start, wait, bench every concurrency level, stop — always stopping what was started."""
    shown = ["<api key>" if arg == args.api_key else arg for arg in target.argv]  # reports get shared
    outcome = TargetOutcome(target.name, shlex.join(shown))
    log = out / f"{target.name}.log"
    print(f"\n=== {target.name}: {outcome.command}", flush=True)
    try:
        proc = start_server(target, log)
    except OSError as exc:
        outcome.failure = f"cannot start: {exc}"
        return outcome
    try:
        outcome.ready_s = wait_ready(proc, target, args.model_name, args.api_key, args.ready_timeout, log)
        print(f"{target.name} ready after {outcome.ready_s:.1f} s", flush=True)
        for level in levels:
            paths = [out / f"bench-{target.name}-c{level}-run{i}.json" for i in range(1, args.repeat + 1)]
            outcome.reports[str(level)] = comparison.combine_runs(
                [run_bench(target, args, level, p, proc.pid) for p in paths]
            )
    except ServerError as exc:
        outcome.failure = str(exc)
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
    finally:
        print(f"{target.name} stopped by {proctree.stop_tree(proc)}", flush=True)
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
            parts += [f"  - FAILED: {outcome.failure.splitlines()[0]} (see {name}.log)"]
    for level in levels:
        table = comparison.render_markdown(comparison.table_rows(reports, level))
        parts += ["", f"## Concurrency {level}", "", table, ""]
        parts += [f"- {line}" for line in comparison.notes(reports, level)]
    return "\n".join(parts) + "\n"


def write_summary(
    out: Path, meta: dict[str, Any], outcomes: dict[str, TargetOutcome], levels: list[str]
) -> None:
    """Print the comparison tables and write summary.json and summary.md."""
    reports = {name: outcome.reports for name, outcome in outcomes.items()}
    for level in levels:
        print(f"\n=== concurrency {level} ===")
        print(comparison.render_text(comparison.table_rows(reports, level)))
        print("\n".join(comparison.notes(reports, level)))
    summary = {
        "meta": meta,
        "targets": {name: asdict(outcome) for name, outcome in outcomes.items()},
        "ratios": {level: comparison.level_ratios(reports, level) for level in levels},
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


def resolve_model(args: argparse.Namespace) -> Path:
    """``--model-dir`` as given, or the demo model (built on first use); fills in ``--model-name``."""
    if args.model_dir is not None:
        args.model_name = args.model_name or args.model_dir.name
        return Path(args.model_dir).resolve()
    from worker.demo_model import DEMO_MODEL_NAME, ensure_demo_model

    args.model_name = args.model_name or DEMO_MODEL_NAME
    return Path(ensure_demo_model())


def parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency: comma-separated integers >= 1")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest compare", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=None, help="default: the demo model (built if missing)")
    p.add_argument("--model-name", default=None, help="served model name (default: demo name or dir name)")
    p.add_argument("--only", choices=comparison.TARGETS, action="append", default=None,
                   help="run only these targets (repeatable; default: all three)")  # fmt: skip
    p.add_argument("--switchyard-cmd", default=DEFAULT_SWITCHYARD_CMD,
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
    model_dir = resolve_model(args)
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
    chosen = [name for name in comparison.TARGETS if args.only is None or name in args.only]
    outcomes = {name: run_target(targets[name], args, args.concurrency, args.out) for name in chosen}
    write_summary(args.out, meta, outcomes, [str(level) for level in args.concurrency])
    failed = any(o.failure or any(r.get("exit_code") for r in o.reports.values()) for o in outcomes.values())
    return 1 if failed else 0
