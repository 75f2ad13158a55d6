"""The request path shared by chat and text completions: resolve, tokenize, check, enqueue, relay."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse

from gateway.admission import Admission
from gateway.auth import Authenticator
from gateway.chunks import FullAssembler, Kind, Meta, StreamAssembler
from gateway.errors import APIError, InvalidRequest, ModelNotFound, Unavailable, UpstreamFailure
from gateway.jobs import Dispatcher, ReplyStream
from gateway.registry import ModelEntry, WorkerRegistry
from gateway.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from gateway.tokenizer import TokenizerCache
from shared.messages import Final, Job, Sampling, Tokens
from shared.settings import GatewaySettings
from shared.tenants import Tenant

T = TypeVar("T")

log = logging.getLogger(__name__)


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

    async def prewarm(self, period: float = 2.0) -> None:
        """Load each served model's tokenizer before its first request needs it."""
        while True:
            try:
                for entry in (await self.registry.models()).values():
                    await self.tokenizers.get(entry.tokenizer)
            except (APIError, RedisError, OSError) as exc:
                log.warning("tokenizer prewarm: %s", exc)
            await asyncio.sleep(period)

    async def resolve(self, model: str) -> ModelEntry:
        live = await self.registry.models()
        if model in live:
            return live[model]
        if await self.registry.known(model):
            raise Unavailable(f"no live worker serves the model '{model}' right now", retry_after=5)
        raise ModelNotFound(f"The model '{model}' does not exist", param="model")

    async def chat(self, request: Request, body: ChatCompletionRequest, tenant: Tenant) -> Any:
        entry = await self.resolve(body.model)
        tokens = await self.tokenizers.get(entry.tokenizer)
        prompt = tokens.chat(body.messages)
        tokens.check_ids(body.stop_token_ids or (), "stop_token_ids")
        job = self._job(request, tenant, entry, body, prompt, body.output_limit(), param="messages")
        return await self._respond(request, job, "chat", body, tenant)

    async def completion(self, request: Request, body: CompletionRequest, tenant: Tenant) -> Any:
        entry = await self.resolve(body.model)
        tokens = await self.tokenizers.get(entry.tokenizer)
        prompt = tokens.text(body.single_prompt())
        tokens.check_ids(body.stop_token_ids or (), "stop_token_ids")
        job = self._job(request, tenant, entry, body, prompt, body.max_tokens, param="prompt")
        return await self._respond(request, job, "text", body, tenant)

    def _job(
        self,
        request: Request,
        tenant: Tenant,
        entry: ModelEntry,
        body: _Sampling,
        prompt: list[int],
        max_tokens: int | None,
        param: str,
    ) -> Job:
        request.state.model = entry.name  # a served model: safe as a metrics label
        if body.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}", param="n")
        max_tokens = fit_context(len(prompt), max_tokens, entry.max_model_len, param)
        if body.min_tokens > max_tokens:
            raise InvalidRequest("min_tokens must not exceed max_tokens", param="min_tokens")
        return Job(
            id=request.state.request_id,
            tenant=tenant.name,
            model=entry.name,
            prompt_token_ids=tuple(prompt),
            sampling=to_sampling(body, max_tokens),
            created_at=time.time(),
        )

    async def _submit(self, job: Job, tenant: Tenant) -> tuple[ReplyStream, dict[str, str]]:
        """Admit (rate limits, backlog) and enqueue; the reservation is settled when the reply ends."""
        reserve = len(job.prompt_token_ids) + job.sampling.max_tokens * job.sampling.n
        ticket = await self.admission.admit(tenant, job.id, job.model, reserve)

        async def settle(used: int) -> None:
            await self.admission.release(ticket, used)

        try:
            replies = await self.dispatcher.submit(job, tenant.priority, on_close=settle)
        except APIError:
            await settle(0)
            raise
        return replies, ticket.headers

    async def _respond(self, request: Request, job: Job, kind: Kind, body: _Sampling, tenant: Tenant) -> Any:
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        meta = Meta(
            id=prefix + job.id.removeprefix("req_"), created=int(job.created_at), model=job.model, kind=kind
        )
        replies, headers = await self._submit(job, tenant)
        if body.stream:
            return EventSourceResponse(
                sse_events(replies, StreamAssembler(meta, body.include_usage())),
                ping=self.settings.ping_interval,
                headers=headers,
            )
        try:
            result = await until_disconnect(request, lambda: collect(replies, FullAssembler(meta)))
        finally:
            with anyio.CancelScope(shield=True):
                await replies.close()
        if result is None:  # the client left; nobody reads a response
            return JSONResponse({}, status_code=499)
        return JSONResponse(result, headers=headers)


def fit_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The output budget: the requested one if prompt + output fit the context, else a 400."""
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


def to_sampling(body: _Sampling, max_tokens: int) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        stop=tuple(body.stop_list()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        seed=body.seed,
        n=body.n,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )


async def collect(replies: ReplyStream, assembler: FullAssembler) -> dict[str, Any]:
    async for reply in replies:
        if isinstance(reply, Tokens):
            assembler.tokens(reply)
        elif isinstance(reply, Final):
            return assembler.response(reply)
    raise UpstreamFailure("the reply stream ended without a final message")


async def sse_events(replies: ReplyStream, assembler: StreamAssembler) -> AsyncIterator[dict[str, str]]:
    """SSE payloads of one streamed response; an error after the start becomes an error event."""
    try:
        async for reply in replies:
            if isinstance(reply, Tokens):
                chunks = assembler.tokens(reply)
            elif isinstance(reply, Final):
                chunks = assembler.final(reply)
            else:
                continue
            for chunk in chunks:
                yield {"data": json.dumps(chunk, separators=(",", ":"))}
        yield {"data": "[DONE]"}
    except APIError as exc:
        yield {"data": json.dumps(exc.envelope())}
    finally:
        # Cancellation (client gone) must not skip telling the worker to stop.
        with anyio.CancelScope(shield=True):
            await replies.close()


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``work`` unless the client disconnects first (then ``None``)."""
    result: list[T] = []
    failure: list[APIError] = []
    async with anyio.create_task_group() as group:

        async def run() -> None:
            try:
                result.append(await work())
            except APIError as exc:  # re-raised below, not wrapped in an ExceptionGroup
                failure.append(exc)
            group.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    if failure:
        raise failure[0]
    return result[0] if result else None


def new_request_id() -> str:
    """Unguessable: job ids double as the reply channel name."""
    return "req_" + secrets.token_hex(16)
