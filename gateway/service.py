"""The request path shared by chat and text completions: resolve, tokenize, check, admit, enqueue."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse

from gateway.admission import Admission, default_output
from gateway.auth import Authenticator
from gateway.chunks import FullAssembler, Kind, Meta, StreamAssembler
from gateway.errors import APIError, InvalidRequest, ModelNotFound, Unavailable
from gateway.jobs import Dispatcher
from gateway.lifecycle import Lifecycle
from gateway.registry import ModelEntry, WorkerRegistry
from gateway.relay import Admitted, collect, sse_events, until_disconnect
from gateway.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from gateway.tokenizer import PromptBuilder, TokenizerCache
from shared.messages import Job, Usage
from shared.settings import GatewaySettings
from shared.tenants import Tenant

log = logging.getLogger(__name__)

SSE_SEPARATOR = "\n"
"""Line ending of SSE events, as OpenAI and vLLM send them: clients that split events on a blank
line written as ``\\n\\n`` (vLLM's benchmark client among them) misread ``\\r\\n`` streams."""


NOTHING = Usage(prompt_tokens=0, completion_tokens=0)


@dataclass
class JobBuilder:
    """A request body becomes a job, or a 4xx: resolve the model, tokenize, check the lengths.
    Shared by the HTTP path and the batch runner, so a batch line is held to the same rules."""

    registry: WorkerRegistry
    tokenizers: TokenizerCache
    max_n: int
    affinity_tokens: int = 0

    async def resolve(self, model: str) -> ModelEntry:
        live = await self.registry.models()
        if model in live:
            return live[model]
        if await self.registry.known(model):
            raise Unavailable(f"no live worker serves the model '{model}' right now", retry_after=5)
        raise ModelNotFound(f"The model '{model}' does not exist", param="model")

    async def chat(self, entry: ModelEntry, body: ChatCompletionRequest, tenant: Tenant, job_id: str) -> Job:
        tokens = await self.tokenizers.get(entry.tokenizer)
        check_length(tokens, sum(len(m.text()) for m in body.messages), entry.max_model_len, "messages")
        tokens.check_ids(body.stop_token_ids or (), "stop_token_ids")
        prompt = await tokens.chat_async(body.messages)
        return self._job(job_id, tenant, entry, body, prompt, body.output_limit(), param="messages")

    async def completion(
        self, entry: ModelEntry, body: CompletionRequest, tenant: Tenant, job_id: str
    ) -> Job:
        tokens = await self.tokenizers.get(entry.tokenizer)
        text = body.single_prompt()
        if isinstance(text, str):
            check_length(tokens, len(text), entry.max_model_len, "prompt")
        tokens.check_ids(body.stop_token_ids or (), "stop_token_ids")
        prompt = await tokens.text_async(text)
        return self._job(job_id, tenant, entry, body, prompt, body.max_tokens, param="prompt")

    def _job(
        self,
        job_id: str,
        tenant: Tenant,
        entry: ModelEntry,
        body: _Sampling,
        prompt: list[int],
        max_tokens: int | None,
        param: str,
    ) -> Job:
        if body.n > self.max_n:
            raise InvalidRequest(f"n must be at most {self.max_n}", param="n")
        room = fit_context(len(prompt), max_tokens, entry.max_model_len, param)
        if max_tokens is None:
            max_tokens = default_output(room, len(prompt), body.n, tenant.tpm)
        if body.min_tokens > max_tokens:
            raise InvalidRequest("min_tokens must not exceed max_tokens", param="min_tokens")
        return Job(
            id=job_id,
            tenant=tenant.name,
            model=entry.name,
            prompt_token_ids=tuple(prompt),
            sampling=body.to_sampling(max_tokens),
            created_at=time.time(),
            affinity=prefix_digest(prompt, self.affinity_tokens),
        )


@dataclass
class Gateway:
    """Everything a request needs, built once by the app's lifespan."""

    settings: GatewaySettings
    redis: Redis
    registry: WorkerRegistry
    tokenizers: TokenizerCache
    dispatcher: Dispatcher
    auth: Authenticator
    admission: Admission
    lifecycle: Lifecycle
    jobs: JobBuilder = field(init=False)

    def __post_init__(self) -> None:
        self.jobs = JobBuilder(
            self.registry, self.tokenizers, self.settings.max_n, self.settings.affinity_tokens
        )

    async def prewarm(self, period: float = 1.0) -> None:
        """Load each served model's tokenizer before its first request needs it (until then the
        gateway is not ready: see :meth:`unready`)."""
        while True:
            try:
                for entry in (await self.registry.models()).values():
                    await self.tokenizers.get(entry.tokenizer)
            except (APIError, RedisError, OSError) as exc:
                log.warning("tokenizer prewarm: %s", exc)
            await asyncio.sleep(period)

    async def unready(self) -> str | None:
        """Why this gateway cannot serve at full speed now (None: it can). Redis errors propagate."""
        if self.lifecycle.draining:
            return "shutting down"
        if not self.dispatcher.connected():
            return "reconnecting to Redis"
        models = await self.registry.models()
        if not models:
            return "no live worker"
        loading = sorted(m.name for m in models.values() if not self.tokenizers.loaded(m.tokenizer))
        if loading:
            return f"loading the tokenizer of {', '.join(loading)}"
        return None

    async def resolve(self, request: Request, model: str) -> ModelEntry:
        entry = await self.jobs.resolve(model)
        request.state.model = entry.name  # a served model: safe as a metrics label
        return entry

    async def chat(self, request: Request, body: ChatCompletionRequest, tenant: Tenant) -> Any:
        self.lifecycle.check_open()
        entry = await self.resolve(request, body.model)
        job = await self.jobs.chat(entry, body, tenant, request.state.request_id)
        return await self._respond(request, job, "chat", body, tenant)

    async def completion(self, request: Request, body: CompletionRequest, tenant: Tenant) -> Any:
        self.lifecycle.check_open()
        entry = await self.resolve(request, body.model)
        job = await self.jobs.completion(entry, body, tenant, request.state.request_id)
        return await self._respond(request, job, "text", body, tenant)

    async def _submit(self, job: Job, tenant: Tenant) -> Admitted:
        """Admit (rate limits, backlog) and enqueue; the reservation is settled when the reply ends."""
        self.lifecycle.check_open()  # it may have begun draining while this request was tokenized
        # The reply channel is subscribed while admission decides: two round trips at once, where
        # one after the other would add one to every request's time to first token.
        opening = asyncio.create_task(self.dispatcher.subscribe(job))
        try:
            ticket = await self.admission.admit(tenant, job)
        except BaseException:
            await self.dispatcher.unsubscribe(opening)
            raise
        try:
            replies = await self.dispatcher.enqueue(job, await opening, tenant.priority)
        except BaseException:
            await self.admission.settle(ticket, NOTHING)  # nothing was enqueued
            raise
        return Admitted(replies, ticket, self.admission, self.lifecycle)

    async def _respond(self, request: Request, job: Job, kind: Kind, body: _Sampling, tenant: Tenant) -> Any:
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        meta = Meta(
            id=prefix + job.id.removeprefix("req_"), created=int(job.created_at), model=job.model, kind=kind
        )
        admitted = await self._submit(job, tenant)
        if body.stream:
            assembler = StreamAssembler(
                meta, body.include_usage(), body.continuous_usage(), len(job.prompt_token_ids)
            )
            return EventSourceResponse(
                sse_events(admitted, assembler),
                ping=self.settings.ping_interval,
                headers=admitted.ticket.headers,
                sep=SSE_SEPARATOR,
            )
        try:
            result = await until_disconnect(request, lambda: collect(admitted.replies, FullAssembler(meta)))
        finally:
            await admitted.close()
        if result is None:  # the client left; nobody reads a response
            return JSONResponse({}, status_code=499)
        return JSONResponse(result, headers=admitted.ticket.headers)


def prefix_digest(prompt: Sequence[int], length: int) -> str | None:
    """A digest of the prompt's first ``length`` tokens, when it has more (see ``Job.affinity``):
    the turns of a conversation, or requests that open with one long system prompt, share it."""
    if length <= 0 or len(prompt) <= length:
        return None
    return hashlib.blake2b(array("l", prompt[:length]).tobytes(), digest_size=8).hexdigest()


def check_length(tokens: PromptBuilder, chars: int, max_model_len: int, param: str) -> None:
    """Refuse, without encoding it, a prompt too long to fit the context whatever it encodes to."""
    least = tokens.least_tokens(chars)
    if least >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, the prompt "
            f"alone has at least {least} tokens. Please reduce the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def fit_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The output budget: ``max_tokens`` if prompt and output fit the context (else a 400), and
    when it is unset the whole room the prompt leaves."""
    if prompt_len == 0:  # e.g. "" with a tokenizer that adds no BOS; the engine would refuse it
        raise InvalidRequest("the prompt is empty: it encodes to no tokens", param=param)
    room = max_model_len - prompt_len
    if max_tokens is None:
        if room < 1:
            raise _too_long(prompt_len, 1, max_model_len, param)
        return room
    if max_tokens > room:
        raise _too_long(prompt_len, max_tokens, max_model_len, param)
    return max_tokens


def _too_long(prompt_len: int, max_tokens: int, limit: int, param: str) -> InvalidRequest:
    return InvalidRequest(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
        "completion). Please reduce the prompt or the completion length.",
        param=param,
        code="context_length_exceeded",
    )


def new_request_id() -> str:
    """Unguessable: job ids double as the reply channel name."""
    return "req_" + secrets.token_hex(16)
