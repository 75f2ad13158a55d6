"""Versioned wire schemas exchanged between gateway and worker through Redis.

Jobs travel in streams, replies on pub/sub channels; both are JSON produced and parsed only here.
Every message carries ``v`` so that a gateway and a worker of different releases can tell when they
cannot understand each other instead of guessing.
"""

from __future__ import annotations

import base64
import json
import sys
from array import array
from collections.abc import Sequence
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

WIRE_VERSION = 1
JOB_VERSIONS = (1, 2, 3, 4)
"""Job versions this release runs, each a job that needs what the versions before it lack, so that
a worker of an older release refuses it rather than run it without what its client asked for:

1. plain generation;
2. generation held or reported beyond that: structured output, log probabilities, logit bias,
   special tokens kept, step boundaries;
3. the prompt's log probabilities too (``Sampling.prompt_logprobs``), where the answer would
   otherwise lack them;
4. an embedding job (``Job.embed``): a release that cannot embed refuses it rather than generate.
"""
PROMPT_LOGPROBS_VERSION = 3
EMBED_VERSION = 4

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
    prompt_logprobs: int | None = None
    """Log probabilities of each prompt token and of this many alternatives (None: none), sent on
    the job's first token message (``Tokens.prompt_logprobs``)."""

    @property
    def version(self) -> int:
        """The job version a job with these parameters needs (see ``JOB_VERSIONS``)."""
        if self.prompt_logprobs is not None:
            return PROMPT_LOGPROBS_VERSION
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


class Embed(_Wire):
    """What makes a job an embedding job: how its inputs split ``Job.prompt_token_ids``, and the
    vectors' length."""

    lengths: tuple[int, ...]
    """Tokens of each input, in order; their sum is the length of ``prompt_token_ids``."""
    dimensions: int | None = None
    """Keep only the first this many values of each vector (a Matryoshka model), already checked."""

    def inputs(self, token_ids: Sequence[int]) -> list[Sequence[int]]:
        """The inputs' token ids, one sequence per input."""
        out, at = [], 0
        for n in self.lengths:
            out.append(token_ids[at : at + n])
            at += n
        return out


class Job(_Wire):
    """One request for generation or for embeddings, as enqueued by a gateway (stream entry field
    ``job``)."""

    v: int = WIRE_VERSION
    id: str
    tenant: str
    model: str
    prompt_token_ids: tuple[int, ...]
    """The prompt's token ids; of an embedding job, every input's, one after another."""
    sampling: Sampling
    """How to generate; an embedding job generates nothing (``max_tokens`` 0)."""
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
    embed: Embed | None = None
    """Set on an embedding job (``EMBED_VERSION``): one vector per input, nothing generated."""


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
    prompt_logprobs: Logprobs | None = None
    """On the job's first token message, when it asked (``Sampling.prompt_logprobs``): the log
    probabilities of its prompt's tokens from the second on (nothing precedes the first), which
    every choice of the job shares. A worker resuming the job does not send them again."""


VECTOR_ORDER = "little"
"""Vectors travel as float32 in this byte order (OpenAI's ``base64`` encoding format)."""


class Vectors(_Wire):
    """Embedding vectors of consecutive inputs of an embedding job: ``count`` vectors of ``dim``
    float32 values each, little-endian, base64 in ``data`` (about a quarter of the size of JSON numbers,
    and decoded without parsing a number). A job's vectors may take several messages; the final
    message follows the last."""

    type: Literal["vectors"] = "vectors"
    v: int = WIRE_VERSION
    seq: int
    start: int
    """Index of the first input these vectors belong to."""
    count: int
    dim: int
    data: str

    @classmethod
    def pack(cls, seq: int, start: int, vectors: Sequence[bytes]) -> Vectors:
        """``vectors``, each the little-endian float32 bytes of one input's vector, as one message."""
        dim = len(vectors[0]) // 4 if vectors else 0
        raw = b"".join(vectors)
        return cls(seq=seq, start=start, count=len(vectors), dim=dim, data=base64.b64encode(raw).decode())

    def raw(self) -> list[bytes]:
        """Each vector's little-endian float32 bytes, in order."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except ValueError as exc:
            raise WireError(f"vectors message {self.seq}: bad base64") from exc
        size = self.dim * 4
        if len(raw) != self.count * size:
            raise WireError(
                f"vectors message {self.seq}: {len(raw)} bytes, not {self.count} x {self.dim} floats"
            )
        return [raw[i * size : (i + 1) * size] for i in range(self.count)]


def floats(vector: bytes) -> list[float]:
    """A vector's little-endian float32 bytes as numbers."""
    values = array("f", vector)
    if sys.byteorder != VECTOR_ORDER:
        values.byteswap()
    return values.tolist()


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


STOPPED = Failure(
    seq=0,
    status=409,
    code="request_stopped",
    message=(
        "the request was stopped before it ended (its client left), so its answer can no longer be "
        "given: send it as a new request"
    ),
)
"""What a worker says, at its stream's next ``seq``, when it drops a job whose client left: anyone
still following the job (a client that took its stream up, a retry under the same key) learns
at once that no more will come."""


Reply = Annotated[Started | Tokens | Vectors | Final | Failure, Field(discriminator="type")]
_reply_adapter: TypeAdapter[Started | Tokens | Vectors | Final | Failure] = TypeAdapter(Reply)


class WireError(ValueError):
    """A message that this release cannot decode."""


def encode(message: _Wire) -> str:
    return message.model_dump_json()


_quote = json.encoder.encode_basestring  # JSON string escaping as pydantic's: quote, backslash, controls


def encode_tokens(
    seq: int, index: int, text: str, token_ids: Sequence[int], finish_reason: FinishReason | None
) -> bytes:
    """A token message with neither log probabilities nor steps, built without the model: a
    worker sends one per stream every few engine steps, and the model's validation and
    serialization were most of what encoding them cost. It decodes to the same
    :class:`Tokens` as ``encode(Tokens(...))`` (tests hold it to that), without the fields that
    would be null (a third of such a message; every release's model defaults them to null).
    Raises UnicodeEncodeError, as pydantic would, on text that is not valid Unicode."""
    ids = ",".join(map(str, token_ids))
    reason = "" if finish_reason is None else f',"finish_reason":"{finish_reason}"'
    return (
        f'{{"type":"tokens","v":{WIRE_VERSION},"seq":{seq},"index":{index},"text":{_quote(text)},'
        f'"token_ids":[{ids}]{reason}}}'
    ).encode()


def _decode(model: type[_W], raw: str | bytes, what: str) -> _W:
    try:
        return model.model_validate_json(raw)
    except ValueError as exc:
        raise WireError(f"undecodable {what}: {exc}") from exc


def decode_reply(raw: str | bytes) -> Started | Tokens | Vectors | Final | Failure:
    try:
        return _reply_adapter.validate_json(raw)
    except ValueError as exc:
        raise WireError(f"undecodable reply: {exc}") from exc


def decode_job(raw: str | bytes) -> Job:
    job = _decode(Job, raw, "job")
    if job.v not in JOB_VERSIONS:
        raise WireError(f"job wire version {job.v} is not one of {JOB_VERSIONS}")
    if job.embed is not None and job.v < EMBED_VERSION:
        raise WireError(f"an embedding job is version {EMBED_VERSION} or later, not {job.v}")
    if job.embed is not None and sum(job.embed.lengths) != len(job.prompt_token_ids):
        raise WireError("embedding job: its inputs' lengths do not split its token ids")
    return job


class EmbeddingModel(_Wire):
    """What a worker serving an embedding model advertises of it (vLLM's pooling runner)."""

    size: int
    """Values in each vector the model makes."""
    matryoshka: bool = False
    """Whether ``dimensions`` may shorten the vectors (a Matryoshka model)."""
    dimensions: tuple[int, ...] | None = None
    """The only lengths ``dimensions`` may ask for, when the model names them (else any up to ``size``)."""


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
    embedding: EmbeddingModel | None = None
    """Set when the worker serves an embedding model: it answers ``/v1/embeddings``, not completions."""


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


def decode_progress(entries: list[bytes]) -> list[Started | Tokens | Vectors | Final | Failure]:
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
