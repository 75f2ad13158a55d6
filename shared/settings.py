"""Typed settings, read once at start-up (environment ``SWITCHYARD_*`` or CLI flags) and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.names import Names
from shared.tenants import CacheScope, TenantDefaults

SimPreset = Literal["l4", "a100", "h100", "cpu-demo"]
"""Timing presets of the simulated engine (``worker/sim_timing.py`` holds their figures and sources)."""


class RedisSettings(BaseSettings):
    # A setting that fails validation is named in the error, its value never shown: it may be a
    # URL with a password.
    model_config = SettingsConfigDict(
        env_prefix="SWITCHYARD_", extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias="REDIS_URL",
        # A password in it is shown nowhere: every message prints redact_url(redis_url).
        repr=False,
        description="Redis every gateway and worker shares.",
    )
    redis_password: SecretStr | None = Field(
        default=None,
        description=(
            "Password Redis requires, kept apart from REDIS_URL (e.g. in a Kubernetes Secret); used "
            "when the URL carries none."
        ),
    )
    key_prefix: str = Field(default="switchyard", description="Prefix of every Redis name.")

    @field_validator("redis_url")
    @classmethod
    def _parses(cls, url: str) -> str:
        try:
            urlsplit(url).port  # noqa: B018 - raises for what is no port, e.g. a password's stray "/"
        except ValueError:
            raise ValueError(
                "not a Redis URL (a password in it must be percent-encoded, or given apart in "
                "SWITCHYARD_REDIS_PASSWORD)"
            ) from None
        return url

    @model_validator(mode="after")
    def _password_in_url(self) -> Self:
        """Every client connects with ``redis_url`` alone: a password given apart goes into it."""
        if self.redis_password is not None and self.redis_password.get_secret_value():
            self.redis_url = with_password(self.redis_url, self.redis_password.get_secret_value())
        return self

    @property
    def names(self) -> Names:
        return Names(self.key_prefix)

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables a process started with them reads (the
        password inside REDIS_URL, where these settings keep it)."""
        env = {}
        for name, value in self.model_dump(exclude_none=True, exclude={"redis_password"}).items():
            key = "REDIS_URL" if name == "redis_url" else f"SWITCHYARD_{name.upper()}"
            env[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return env


REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` fit to log, print or show: a password in it (``user:password@`` or ``?password=``)
    replaced by ``***``. Every message that names a Redis URL goes through here."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k == "password" for k, _ in pairs):
        query = urlencode([(k, REDACTED if k == "password" else v) for k, v in pairs], safe="*")
    return _join(parts, netloc, query)


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its user name and password, and those two (None where absent): for
    programs that take the secret another way than on their command line."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    password = unquote(parts.password) if parts.password is not None else dict(pairs).get("password")
    username = unquote(parts.username) if parts.username else dict(pairs).get("username")
    kept = [(k, v) for k, v in pairs if k not in ("password", "username")]
    query = urlencode(kept) if len(kept) < len(pairs) else parts.query
    return _join(parts, parts.netloc.rpartition("@")[2], query), username or None, password or None


def with_password(url: str, password: str) -> str:
    """``url`` carrying ``password``, unless it carries one already (the URL's own wins)."""
    parts = urlsplit(url)
    if parts.password is not None or "password" in dict(parse_qsl(parts.query)):
        return url
    userinfo, at, host = parts.netloc.rpartition("@")
    user = userinfo if at else ""
    return _join(parts, f"{user}:{quote(password, safe='')}@{host}", parts.query)


def _join(parts: SplitResult, netloc: str, query: str) -> str:
    """A Redis URL from its parts (``unix://`` keeps its two slashes, which urlunsplit drops)."""
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


class GatewaySettings(RedisSettings):
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8000, description="Gateway port.")
    processes: int = Field(
        default=1, ge=1, description="Gateway processes sharing the port (metrics summed over them)."
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        description=(
            "Port of the gateway's Prometheus /metrics and of /scaling (what KEDA reads), apart from "
            "the API's so that only monitoring reaches them; 0: neither is served."
        ),
    )
    ping_interval: float = Field(default=10.0, gt=0, description="Seconds between SSE keep-alives.")
    request_timeout: float = Field(
        default=600.0, gt=0, description="Longest a request may take, queueing included."
    )
    stall_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Longest silence from the worker once a job has started before the request fails.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        gt=0,
        description="Larger bodies get 413; a line of a batch file is one request, held to the same bound.",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a client has to send a request's headers before its connection is closed.",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        description=(
            "Connections (or requests in progress) one gateway process serves at once; beyond, "
            "requests get 503 with Retry-After."
        ),
    )
    resume_grace: float = Field(
        default=10.0,
        ge=0,
        description=(
            "Seconds a resumable stream's job goes on after its client's connection drops, for the "
            "client to take the stream up again with Last-Event-ID (other streams stop at once)."
        ),
    )
    idempotency_ttl: float = Field(
        default=3600.0,
        gt=0,
        description=(
            "Seconds a request sent with an Idempotency-Key is remembered (and its answer kept): the "
            "same request sent again with that key gets the first one's answer instead of running twice."
        ),
    )
    max_n: int = Field(default=8, ge=1, description="Largest `n` (choices per request) accepted.")
    auth: bool = Field(
        default=True, description="Require an API key (off: every request is tenant 'default')."
    )
    tenant_rpm: int | None = Field(
        default=None, ge=0, description="Requests a minute of a tenant that sets none; unset or 0: no limit."
    )
    tenant_tpm: int | None = Field(
        default=None, ge=0, description="Tokens per minute of a tenant that sets none; unset or 0: no limit."
    )
    tenant_max_concurrent: int | None = Field(
        default=None, ge=0, description="Requests at once of a tenant that sets none; unset or 0: no limit."
    )
    tenant_max_backlog: int | None = Field(
        default=1000,
        ge=0,
        description=(
            "Jobs queued or running of a tenant that sets none, so that one tenant cannot take a "
            "model's whole backlog (max_backlog_total) from the others; 0: no limit."
        ),
    )
    tenant_file_bytes: int | None = Field(
        default=2 * 1024**3,
        ge=0,
        description=(
            "Bytes the files of a tenant that sets none may take, so that one tenant cannot fill "
            "the store (files_max_total_bytes) for the others; 0: no limit."
        ),
    )
    tenant_max_batches: int | None = Field(
        default=100,
        ge=0,
        description=(
            "Batches not finished yet (of any status before a final one) that a tenant that sets no "
            "limit may have at once; creating one more gets 429. 0: no limit."
        ),
    )
    queue_timeout: float = Field(
        default=120.0, gt=0, description="Longest a request may wait for a worker to start it."
    )
    max_backlog_total: int = Field(
        default=10_000, ge=1, description="Jobs waiting or running per model before new ones get 503."
    )
    worker_ttl: float = Field(
        default=10.0, gt=0, description="A worker whose heartbeat is older is taken for dead."
    )
    scale_from_zero: bool = Field(
        default=False,
        description=(
            "Models served here before stay servable with no live worker: requests wait in their "
            "stream while an autoscaler starts one (on for `switchyard up --autoscale 0:N`)."
        ),
    )
    scale_min_workers: int = Field(
        default=0, ge=0, description="Autoscaling: fewest workers the decision asks for (per model)."
    )
    scale_max_workers: int = Field(
        default=1000,
        ge=1,
        description="Autoscaling: most workers the decision asks for (per model; KEDA's bounds apply too).",
    )
    scale_target_utilization: float = Field(
        default=0.75, gt=0, le=1, description="Autoscaling: share of a worker's slots to aim for."
    )
    scale_max_queue_wait: float = Field(
        default=5.0,
        ge=0,
        description="Autoscaling: a backlog the workers drain within this many seconds needs no new worker.",
    )
    scale_down_after: float = Field(
        default=60.0, ge=0, description="Autoscaling: seconds of low demand before a worker is retired."
    )
    scale_cooldown: float = Field(
        default=15.0, ge=0, description="Autoscaling: seconds between two retirements."
    )
    affinity_tokens: int = Field(
        default=64,
        ge=0,
        description=(
            "Prompts longer than this many tokens carry a digest of their first ones, so that jobs "
            "sharing that prefix can run on the worker whose prefix cache holds it. 0: none."
        ),
    )
    prefix_cache_scope: CacheScope = Field(
        default="tenant",
        description=(
            "Who shares the engines' prefix cache: 'tenant' (each tenant its own, tenants of one "
            "cache group theirs; a tenant cannot tell from its time to first token what another "
            "sent) or 'shared' (everyone: more cache hits, for tenants that all trust each other)."
        ),
    )
    shutdown_grace: float = Field(
        default=30.0,
        ge=0,
        description=(
            "On SIGTERM, how long requests in flight may take to finish before they are cut with an "
            "error (new requests get 503 meanwhile)."
        ),
    )
    file_store: Literal["directory", "redis"] = Field(
        default="directory",
        description=(
            "Where file bytes live: 'directory' (files_dir, shared by gateways and background "
            "jobs) or 'redis' (no shared volume needed; for modest files)."
        ),
    )
    files_dir: Path | None = Field(
        default=None,
        description="Directory of the 'directory' store; unset: ~/.local/share/switchyard/files.",
    )
    file_ttl: float = Field(
        default=30 * 86400, gt=0, description="Seconds a file is kept unless its upload asks for less."
    )
    file_max_bytes: int = Field(default=200 * 1024 * 1024, gt=0, description="Largest file accepted.")
    file_max_lines: int = Field(default=50_000, gt=0, description="Most requests in one batch file.")
    files_max_total_bytes: int = Field(
        default=20 * 1024**3, gt=0, description="Bytes all stored files may take; uploads beyond get 413."
    )
    batch_ttl: float = Field(
        default=30 * 86400, gt=0, description="Seconds a finished batch's record is kept."
    )
    usage_retention_days: int = Field(
        default=90, ge=1, description="Days of hourly usage roll-ups kept per tenant."
    )
    response_ttl: float = Field(
        default=7 * 86400,
        gt=0,
        description=(
            "Seconds a stored response (Responses API, `store: true`) is kept for retrieval and for "
            "`previous_response_id`; Redis holds it in memory."
        ),
    )

    @model_validator(mode="after")
    def _ports_apart(self) -> Self:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError("the metrics port must not be the API's port: metrics are not for clients")
        return self

    def tenant_defaults(self) -> TenantDefaults:
        return TenantDefaults(
            rpm=self.tenant_rpm,
            tpm=self.tenant_tpm,
            max_concurrent=self.tenant_max_concurrent,
            max_backlog=self.tenant_max_backlog,
            file_bytes=self.tenant_file_bytes,
            max_batches=self.tenant_max_batches,
        )

    @property
    def files_path(self) -> Path:
        """The 'directory' store's root, under which each key prefix has its own directory."""
        return self.files_dir or Path.home() / ".local" / "share" / "switchyard" / "files"


class BackgroundSettings(GatewaySettings):
    """The background role (``switchyard background``): batches and housekeeping, on arq. It builds
    and admits jobs as a gateway does, so it reads the gateway's settings too."""

    batch_window: int = Field(
        default=64,
        ge=1,
        description="Most lines of one batch on worker queues at once (fewer while interactive jobs wait).",
    )
    batch_lease: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a batch stays with a process that stopped renewing its claim on it.",
    )
    batch_check_interval: int = Field(
        default=5,
        ge=1,
        le=60,
        description=(
            "Seconds between a process's looks for batches nobody feeds, and between reckonings of "
            "which tenants' runs give a batch slot back (divides 60)."
        ),
    )
    housekeeping_interval: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="Seconds between housekeeping runs: expiry, dead-letter trimming, usage roll-ups.",
    )
    dead_letter_max: int = Field(
        default=10_000, ge=1, description="Entries a dead-letter stream is trimmed to (unread ones stay)."
    )
    max_batches: int = Field(default=8, ge=1, description="Batches one background process feeds at once.")
    batch_slice: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Seconds a run keeps its batch slot while a batch of a tenant with fewer slots than its "
            "share waits for one; then it gives the slot back (its lines drain, the batch waits again)."
        ),
    )
    background_drain_timeout: float = Field(
        default=30.0,
        ge=0,
        # The role was called "jobs" once; its old variable still works.
        validation_alias=AliasChoices("SWITCHYARD_BACKGROUND_DRAIN_TIMEOUT", "SWITCHYARD_JOBS_DRAIN_TIMEOUT"),
        description="On SIGTERM, how long running batch lines may take to finish.",
    )

    @field_validator("batch_check_interval", "housekeeping_interval")
    @classmethod
    def _clock_aligned(cls, period: int) -> int:
        """Runs are aligned to the clock so that every process agrees on the ticks."""
        if (period < 60 and 60 % period) or (period >= 60 and (period % 60 or 3600 % period)):
            raise ValueError("must divide a minute, or be whole minutes dividing an hour")
        return period


class WorkerSettings(RedisSettings):
    engine: Literal["vllm", "sim"] = Field(
        default="vllm",
        description=(
            "What generates: vLLM, or 'sim', the simulated engine of capacity and scale tests (no model, "
            "timing from sim_preset, tokens from the model's tokenizer). Never the default."
        ),
    )
    sim_preset: SimPreset = Field(
        default="h100",
        description=(
            "The simulated engine's timing: a GPU serving a ~8B model (l4, a100, h100) or cpu-demo, the "
            "demo model on a 2-core CPU."
        ),
    )
    sim_speed: float = Field(
        default=1.0,
        gt=0,
        description="The simulated engine runs this many times faster than its preset (tests: 10 or more).",
    )
    sim_reasoning_tokens: int = Field(
        default=64,
        ge=0,
        description=(
            "With a reasoning parser, the simulated engine thinks this many tokens (at most half of "
            "max_tokens) between <think> and </think> before each answer; 0: never."
        ),
    )
    sim_tool_calls: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description=(
            "Share of the simulated engine's answers to prompts that list tools (tool_choice auto, "
            "hermes parser) that call one of them."
        ),
    )
    model: str = Field(
        default="demo",
        description="'demo', 'demo-embed' (the demo embedding model), a Hugging Face model id, or a path.",
    )
    runner: Literal["auto", "generate", "pooling"] = Field(
        default="auto",
        description=(
            "vLLM's runner (`vllm serve --runner`): 'pooling' serves an embedding model (`/v1/embeddings`), "
            "'generate' a model that writes text; 'auto' lets vLLM tell by the model's architecture."
        ),
    )
    served_model_name: str | None = Field(default=None, description="Name clients use for the model.")
    max_model_len: int | None = Field(
        default=None, description="Context length; unset: the model's (the simulated engine: 4096)."
    )
    dtype: str = Field(default="auto", description="Weights dtype passed to vLLM.")
    enforce_eager: bool | None = Field(
        default=None,
        description=(
            "Skip graph compilation; unset: compile as vLLM does by default, except on a CPU host "
            "without a C++ compiler ($CXX, else g++), where it cannot."
        ),
    )
    kv_cache_gib: float | None = Field(
        default=None,
        gt=0,
        description="KV cache size in GiB; unset lets vLLM size it (the demo model defaults to 1).",
    )
    capacity: int = Field(default=256, ge=1, description="Jobs one worker runs at once.")
    tool_call_parser: str | None = Field(
        default=None,
        description=(
            "vLLM's tool-call parser for the model's output (hermes, llama3_json, mistral, ...; as "
            "`vllm serve --tool-call-parser`). Unset: `tool_choice` required or named still works "
            "(decoded against the tools' schema), auto answers in text. Unset for the demo model: hermes."
        ),
    )
    enable_auto_tool_choice: bool | None = Field(
        default=None,
        description="Parse tool calls out of the text for `tool_choice: auto` (unset: when a parser is set).",
    )
    reasoning_parser: str | None = Field(
        default=None,
        description="vLLM's reasoning parser for the model (qwen3, deepseek_r1, ...: `--reasoning-parser`).",
    )
    structured_output_backend: Literal["xgrammar", "guidance"] = Field(
        default="xgrammar",
        description=(
            "The engine's backend for JSON schemas, regexes, choices and grammars. JSON is always "
            "decoded compact (no whitespace between tokens), so a model cannot fill `max_tokens` with it."
        ),
    )
    max_logprobs: int = Field(
        default=20, ge=0, le=1000, description="Largest `top_logprobs` a request may ask for."
    )
    headroom_window: float = Field(
        default=10.0,
        ge=0,
        description=(
            "Seconds a worker remembers how many of its slots each tenant held; while others are "
            "active a tenant may not take the room they used lately (at most a quarter of the "
            "capacity), so their next jobs need not wait for a flood's to finish. 0: off."
        ),
    )
    preempt: bool = Field(
        default=False,
        description=(
            "While every slot is held, take the next job of a tenant below its fair share of the "
            "worker's slots by stopping a job of the tenant most above its share; that job resumes "
            "from the tokens it streamed as soon as its tenant has room again (a pause, never a "
            "repeat). "
            "Only single-choice jobs without a grammar are stopped; a batch tenant never makes "
            "an interactive one yield. Off by default: it cut another tenant's TTFT tail under a "
            "flood in most measured setups (it lengthened it only on a host whose CPUs were "
            "saturated), but it costs the flood 3 to 9% of its tokens/s."
        ),
    )
    prefill_per_tenant: int = Field(
        default=0,
        ge=0,
        description=(
            "Prompt pacing, off (0) by default: while other tenants have jobs on the worker, a "
            "tenant over its share keeps at most this many jobs waiting in the engine for their "
            "first token (more when its jobs are short or the engine slow to answer), so a flood's "
            "wave of prompts is not prefilled in one step everyone waits for. Helps engines whose "
            "steps cost the same with a prompt riding along (GPUs); on vLLM's CPU backend it cost "
            "a third of the tokens/s."
        ),
    )
    flush_interval: float = Field(
        default=0.04,
        ge=0,
        description=(
            "Seconds a worker gathers a job's tokens before publishing them when it runs 16 jobs; "
            "in proportion to its jobs otherwise (about 16 / this many messages a second per "
            "worker whatever its load; first token: at once)."
        ),
    )
    max_flush_interval: float = Field(
        default=0.1,
        ge=0,
        description=(
            "Longest a worker gathers a job's tokens when it runs many jobs (the interval grows "
            "with them, so each message carries more tokens under load)."
        ),
    )
    heartbeat_interval: float = Field(
        default=2.0, gt=0, description="Seconds between a worker's heartbeats and claim refreshes."
    )
    prefix_affinity: bool = Field(
        default=True,
        description=(
            "Hand a job whose prompt prefix belongs to another worker (by the prompt's digest) to "
            "that worker while it is not busier than this one, so its prefix cache serves it."
        ),
    )
    reclaim_idle: float = Field(
        default=15.0,
        gt=0,
        description="A pending job whose worker has not refreshed its claim for this long is retaken.",
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="Deliveries after which a job goes to the dead-letter stream."
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long running jobs may take to finish."
    )
    worker_id: str | None = Field(default=None, description="Consumer name; unset: host-pid-random.")
    metrics_port: int = Field(
        default=0, ge=0, description="Port of the worker's Prometheus /metrics; 0: no metrics server."
    )
