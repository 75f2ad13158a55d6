"""Versioned wire schemas exchanged between gateway and worker through Redis.

Jobs travel in streams, replies on pub/sub channels; both are JSON produced and parsed only here.
Every message carries ``v`` so that a gateway and a worker of different releases can tell when they
cannot understand each other instead of guessing.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

WIRE_VERSION = 1
JOB_VERSIONS = (1, 2)
"""Job versions this release runs. A job that needs what version 1 lacked (structured output,
log probabilities, logit bias, special tokens kept, step boundaries) is version 2, so a worker
of an older release refuses it rather than run it without the constraint its client asked for."""

FinishReason = Literal["stop", "length", "abort"]
Priority = Literal["interactive", "batch"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


_W = TypeVar("_W", bound=_Wire)


class StructuredOutput(_Wire):
    """What the engine's structured-output backend holds the text to: exactly one of these, already
    checked by the gateway (the names are vLLM's ``StructuredOutputsParams``, but ``json_schema``
    for its ``json``)."""

    json_schema: str | None = None
    """A JSON schema, serialized."""
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None


class Sampling(_Wire):
    """Engine-neutral sampling parameters, already validated by the gateway."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None
    """Log probabilities of each generated token and of this many alternatives (None: none)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling."""
    structured_output: StructuredOutput | None = None

    @property
    def version(self) -> int:
        """The job version a job with these parameters needs (see ``JOB_VERSIONS``)."""
        plain = (
            self.structured_output is None
            and self.logprobs is None
            and not self.logit_bias
            and self.skip_special_tokens
            and self.spaces_between_special_tokens
        )
        return 1 if plain else 2

    @property
    def constrained(self) -> bool:
        """Whether a grammar holds the output: such a job cannot resume from tokens already sent,
        since the engine's grammar would start over from the top."""
        return self.structured_output is not None


class Job(_Wire):
    """One request for generation, as enqueued by a gateway (stream entry field ``job``)."""

    v: int = WIRE_VERSION
    id: str
    tenant: str
    model: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    created_at: float
    """Gateway wall-clock time (seconds) when the job was enqueued; used for queue-wait metrics."""
    affinity: str | None = None
    """A digest of the prompt's first tokens: jobs that share it share a prompt prefix, so a worker
    whose engine holds that prefix in its cache should run them (see ``worker/affinity.py``)."""
    cache_salt: str | None = None
    """The engine's prefix cache serves this job only blocks cached under the same salt (its
    tenant's, see ``shared.tenants.cache_salt``); None: any."""
    steps: bool = False
    """Say where each engine step's text ends in every token message (``Tokens.steps``): for
    answer parsers that must see the output a step at a time."""
    reasoning_ended: bool | None = None
    """For a model with a reasoning parser and a grammar: whether the prompt already closed the
    reasoning, so the grammar holds from the first token (None: the engine checks the prompt)."""


class Started(_Wire):
    """A worker took the job; sent before any token it generates.

    A worker that takes over a job another worker had begun continues its sequence numbers and
    says how many tokens it resumes from, so the gateway can check it continues exactly where the
    client is.
    """

    type: Literal["started"] = "started"
    v: int = WIRE_VERSION
    seq: int
    worker: str
    attempt: int
    resumed_tokens: int = 0


class Logprobs(_Wire):
    """Log probabilities of the tokens of one message, in order: of each token sampled, and of the
    alternatives the job asked for (``Sampling.logprobs``), as the engine ranks them."""

    sampled: tuple[float, ...]
    texts: tuple[str, ...]
    """Each sampled token's text, decoded on its own (a piece of a character decodes to "")."""
    top: tuple[tuple[tuple[int, float, str], ...], ...] = ()
    """Per token: (token id, log probability, text) of each alternative."""


class Tokens(_Wire):
    """Coalesced newly generated tokens of one choice."""

    type: Literal["tokens"] = "tokens"
    v: int = WIRE_VERSION
    seq: int
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    logprobs: Logprobs | None = None
    steps: tuple[tuple[int, int], ...] | None = None
    """(characters, tokens) of each engine step in ``text`` and ``token_ids``, when the job asked."""


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Final(_Wire):
    """Last message of a successful job: one finish reason per choice and the token counts."""

    type: Literal["final"] = "final"
    v: int = WIRE_VERSION
    seq: int
    finish_reasons: tuple[FinishReason, ...]
    usage: Usage


class Failure(_Wire):
    """Last message of a job that could not complete. ``status`` is the HTTP status to report."""

    type: Literal["error"] = "error"
    v: int = WIRE_VERSION
    seq: int
    status: int
    code: str
    message: str


Reply = Annotated[Started | Tokens | Final | Failure, Field(discriminator="type")]
_reply_adapter: TypeAdapter[Started | Tokens | Final | Failure] = TypeAdapter(Reply)


class WireError(ValueError):
    """A message that this release cannot decode."""


def encode(message: _Wire) -> str:
    return message.model_dump_json()


def _decode(model: type[_W], raw: str | bytes, what: str) -> _W:
    try:
        return model.model_validate_json(raw)
    except ValueError as exc:
        raise WireError(f"undecodable {what}: {exc}") from exc


def decode_reply(raw: str | bytes) -> Started | Tokens | Final | Failure:
    try:
        return _reply_adapter.validate_json(raw)
    except ValueError as exc:
        raise WireError(f"undecodable reply: {exc}") from exc


def decode_job(raw: str | bytes) -> Job:
    job = _decode(Job, raw, "job")
    if job.v not in JOB_VERSIONS:
        raise WireError(f"job wire version {job.v} is not one of {JOB_VERSIONS}")
    return job


class WorkerInfo(_Wire):
    """What a live worker advertises in its heartbeat: the model it serves and how to tokenize it."""

    v: int = WIRE_VERSION
    id: str
    model: str
    tokenizer: str
    max_model_len: int
    capacity: int
    inflight: int = 0
    """Jobs the worker holds (running in the engine or about to)."""
    running: int = 0
    waiting: int = 0
    """Sequences in the engine, as its scheduler last reported them."""
    kv_cache_usage: float = 0.0
    tokens_per_s: float = 0.0
    """Tokens generated per second over the last few seconds."""
    started_at: float
    heartbeat_at: float
    engine: str = "vllm"
    """What generates: ``vllm``, or ``sim`` for the simulated engine of capacity tests."""
    draining: bool = False
    """The worker takes no new jobs (it is stopping)."""
    tool_call_parser: str | None = None
    """vLLM's tool-call parser for the model's output (``vllm serve --tool-call-parser``)."""
    auto_tool_choice: bool = False
    """Whether ``tool_choice: auto`` parses tool calls out of the text (needs the parser)."""
    reasoning_parser: str | None = None
    """vLLM's reasoning parser for the model (``vllm serve --reasoning-parser``)."""
    max_logprobs: int = 20


def decode_worker_info(raw: str | bytes) -> WorkerInfo:
    return _decode(WorkerInfo, raw, "worker record")


class StreamRecord(_Wire):
    """What the streams index says of one job stream (hash field: the stream's name)."""

    v: int = WIRE_VERSION
    tenant: str
    priority: Priority = "interactive"


def decode_stream_record(raw: str | bytes) -> StreamRecord:
    return _decode(StreamRecord, raw, "stream record")


class DeadLetter(_Wire):
    """An entry of a model's dead-letter stream: a job that could not be run, and why.

    Kept as flat stream fields (``XRANGE`` shows them as they are), the job as it was enqueued.
    """

    stream: str
    entry: str
    reason: str
    job: str = ""

    def fields(self) -> dict[str, str]:
        return {"stream": self.stream, "entry": self.entry, "reason": self.reason, "job": self.job}

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> DeadLetter:
        try:
            return cls.model_validate({k.decode(): v.decode(errors="replace") for k, v in fields.items()})
        except ValueError as exc:
            raise WireError(f"undecodable dead letter: {exc}") from exc


def decode_progress(entries: list[bytes]) -> list[Started | Tokens | Final | Failure]:
    """A job's progress list: every reply its attempts published, in order."""
    return [decode_reply(raw) for raw in entries]


class UsageEvent(_Wire):
    """One finished request, as a gateway (or the batch runner) logs it for the usage roll-ups.

    Flat stream fields like :class:`DeadLetter`; the entry's id says when it finished.
    """

    tenant: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    error: str = ""
    """The error code it ended with; empty when it finished (or its client left)."""

    def fields(self) -> dict[str, str | int]:
        return {
            "tenant": self.tenant,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "error": self.error,
        }

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> UsageEvent:
        try:
            return cls.model_validate({k.decode(): v.decode(errors="replace") for k, v in fields.items()})
        except ValueError as exc:
            raise WireError(f"undecodable usage event: {exc}") from exc
