"""Chat and text completions over HTTP: a request through the shared path (:mod:`serving.path`),
answered as a stream of Server-Sent Events or as one JSON body."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse

from api.assembly import FullAssembler, Kind, Meta, StreamAssembler
from api.chat.protocol import ChatCompletionRequest
from api.common import GenerationRequest
from api.completions.protocol import CompletionRequest
from api.errors import APIError
from gateway.auth import Authenticator
from serving.admission import Admission
from serving.dispatch import Dispatcher
from serving.lifecycle import Lifecycle
from serving.path import JobBuilder, submit
from serving.registry import ModelEntry, WorkerRegistry
from serving.relay import Admitted, collect, sse_events, until_disconnect
from serving.tokenizer import TokenizerCache
from shared.messages import Job
from shared.settings import GatewaySettings
from shared.tenants import Tenant

log = logging.getLogger(__name__)

SSE_SEPARATOR = "\n"
"""Line ending of SSE events, as OpenAI and vLLM send them: clients that split events on a blank
line written as ``\\n\\n`` (vLLM's benchmark client among them) misread ``\\r\\n`` streams."""


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
        settings = self.settings
        self.jobs = JobBuilder(
            self.registry,
            self.tokenizers,
            settings.max_n,
            settings.affinity_tokens,
            settings.prefix_cache_scope,
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
        await self.admission.precheck(tenant, entry.name)  # before the prompt costs an encoding
        job = await self.jobs.chat(entry, body, tenant, request.state.request_id)
        return await self._respond(request, job, "chat", body, tenant)

    async def completion(self, request: Request, body: CompletionRequest, tenant: Tenant) -> Any:
        self.lifecycle.check_open()
        entry = await self.resolve(request, body.model)
        await self.admission.precheck(tenant, entry.name)  # before the prompt costs an encoding
        job = await self.jobs.completion(entry, body, tenant, request.state.request_id)
        return await self._respond(request, job, "text", body, tenant)

    async def _submit(self, job: Job, tenant: Tenant) -> Admitted:
        return await submit(job, tenant, self.dispatcher, self.admission, self.lifecycle)

    async def _respond(
        self, request: Request, job: Job, kind: Kind, body: GenerationRequest, tenant: Tenant
    ) -> Any:
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
