"""Embedding requests on the shared path: the body becomes an embedding job (the model checked to
be an embedding model, every input tokenized and fitted to its context, ``dimensions`` checked as
vLLM checks it), is admitted like any job (its input tokens counted, no output), and its vector
messages are gathered into the answer. The gateway's endpoint and the batch feature both use it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from api.embeddings.assembly import EmbeddingAnswer
from api.embeddings.protocol import EmbeddingRequest
from api.errors import InvalidRequest, UpstreamFailure
from serving.registry import ModelEntry
from serving.relay import Replies
from serving.tokenizer import INLINE_CHARS, PromptBuilder, TokenizerCache
from shared.messages import (
    EMBED_VERSION,
    Embed,
    EmbeddingModel,
    Final,
    Job,
    Sampling,
    Started,
    Vectors,
    WireError,
)
from shared.tenants import Tenant

MAX_TOTAL_TOKENS = 300_000
"""Tokens of all the inputs of one request, as OpenAI bounds them."""
NOTHING_GENERATED = Sampling(max_tokens=0)


@dataclass
class PreparedEmbedding:
    """An embeddings request made into a job, and the answer its vectors fill."""

    job: Job
    answer: EmbeddingAnswer

    async def gather(self, replies: Replies) -> Final:
        """Every vector of the job, then its final message (whose usage the answer reports)."""
        async for reply in replies:
            if isinstance(reply, Started) and reply.seq == 0:
                self.answer.restart()  # the job started, or started over on another worker
            elif isinstance(reply, Vectors):
                try:
                    self.answer.add(reply)
                except WireError as exc:
                    raise UpstreamFailure(str(exc), code="bad_reply") from exc
            elif isinstance(reply, Final):
                if missing := self.answer.missing():
                    raise UpstreamFailure(f"the worker sent no vector for {missing} inputs", code="bad_reply")
                return reply
        raise UpstreamFailure("the reply stream ended without a final message")

    async def collect(self, replies: Replies) -> dict[str, Any]:
        """The whole answer as one object (a batch line's)."""
        final = await self.gather(replies)
        return self.answer.body(final.usage)


def check_dimensions(entry: ModelEntry, spec: EmbeddingModel, dimensions: int | None) -> None:
    """``dimensions`` as vLLM's pooling parameters check it: only for a Matryoshka model, within its
    vectors' length, and one of the lengths it names if it names them."""
    if dimensions is None:
        return
    if not spec.matryoshka:
        raise InvalidRequest(
            f"Model '{entry.name}' does not support Matryoshka embeddings; dimensions must be unset "
            f"(received dimensions={dimensions}).",
            param="dimensions",
        )
    if not 1 <= dimensions <= spec.size:
        raise InvalidRequest(
            f"Model '{entry.name}' only supports dimensions in range [1, {spec.size}], got {dimensions}.",
            param="dimensions",
        )
    if spec.dimensions is not None and dimensions not in spec.dimensions:
        raise InvalidRequest(
            f"Model '{entry.name}' only supports Matryoshka dimensions {list(spec.dimensions)}, "
            f"got {dimensions}.",
            param="dimensions",
        )


def encode(
    tokens: PromptBuilder, inputs: Sequence[str | list[int]], params: Sequence[str]
) -> list[list[int]]:
    """Every input's token ids (texts encoded with the model's special tokens, as vLLM encodes an
    embedding input; token ids checked against the vocabulary)."""
    out = []
    for given, param in zip(inputs, params, strict=True):
        if isinstance(given, str):
            out.append(tokens.text(given))
        else:
            tokens.check_ids(given, param)
            out.append(list(given))
    return out


def too_long(chars: int, least: int, max_model_len: int, param: str) -> None:
    """Refuse, without encoding it, a text too long to fit the context whatever it encodes to."""
    if least > max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your input of "
            f"{chars} characters has at least {least} tokens. Please reduce the length of the input.",
            param=param,
            code="context_length_exceeded",
        )


def fit(encoded: Sequence[Sequence[int]], params: Sequence[str], max_model_len: int) -> None:
    """Each input within the model's context, none empty, all within :data:`MAX_TOTAL_TOKENS`."""
    for ids, param in zip(encoded, params, strict=True):
        if not ids:
            raise InvalidRequest("the input is empty: it encodes to no tokens", param=param)
        if len(ids) > max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {max_model_len} tokens. However, your input "
                f"contains {len(ids)} tokens. Please reduce the length of the input.",
                param=param,
                code="context_length_exceeded",
            )
    total = sum(len(ids) for ids in encoded)
    if total > MAX_TOTAL_TOKENS:
        raise InvalidRequest(
            f"The inputs of one request may hold at most {MAX_TOTAL_TOKENS} tokens together; these "
            f"hold {total}. Send them in several requests.",
            param="input",
        )


async def prepare_embedding(
    tokenizers: TokenizerCache, entry: ModelEntry, body: EmbeddingRequest, tenant: Tenant, job_id: str
) -> PreparedEmbedding:
    """The request's embedding job, or a 400 naming what is wrong; nothing is enqueued here."""
    spec = entry.embedding
    if spec is None:
        raise InvalidRequest(
            f"The model '{entry.name}' is not an embedding model and does not support the Embeddings API",
            param="model",
        )
    check_dimensions(entry, spec, body.dimensions)
    inputs = body.inputs()
    params = [f"input.{i}" for i in range(len(inputs))] if body.listed() else ["input"]
    tokens = await tokenizers.get(entry.tokenizer)
    chars = 0
    for given, param in zip(inputs, params, strict=True):
        if isinstance(given, str):
            too_long(len(given), tokens.least_tokens(len(given)), entry.max_model_len, param)
            chars += len(given)
    if chars <= INLINE_CHARS:
        encoded = encode(tokens, inputs, params)
    else:  # a big request must not hold the event loop while it is tokenized
        encoded = await asyncio.to_thread(encode, tokens, inputs, params)
    fit(encoded, params, entry.max_model_len)
    job = Job(
        v=EMBED_VERSION,
        id=job_id,
        tenant=tenant.name,
        model=entry.name,
        prompt_token_ids=tuple(t for ids in encoded for t in ids),
        sampling=NOTHING_GENERATED,
        created_at=time.time(),
        embed=Embed(lengths=tuple(len(ids) for ids in encoded), dimensions=body.dimensions),
    )
    answer = EmbeddingAnswer(
        id="embd-" + job_id.removeprefix("req_"),
        created=int(job.created_at),
        model=entry.name,
        count=len(inputs),
        encoding=body.encoding_format,
    )
    return PreparedEmbedding(job, answer)
