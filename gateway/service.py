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

from api.chat.protocol import ChatCompletionRequest
from api.common import GenerationRequest
from api.completions.protocol import CompletionRequest
from api.errors import APIError, InvalidRequest
from gateway.auth import Authenticator
from gateway.sse import EventStream
from serving.admission import Admission
from serving.dispatch import Dispatcher, owner_record
from serving.fanout import submit_jobs
from serving.idempotency import Idempotency
from serving.lifecycle import Lifecycle
from serving.path import JobBuilder, Prepared, submit
from serving.registry import ModelEntry, WorkerRegistry
from serving.relay import Admitted, Attached, collect, sse_events, until_disconnect
from serving.resume import EventId, Resumable
from serving.tokenizer import TokenizerCache
from shared.settings import GatewaySettings
from shared.tenants import Tenant

log = logging.getLogger(__name__)

PRECHECK_CHARS = 2_048
"""A request of at most this many characters of text to encode (a chat's messages without tools,
a completion's prompts) is not checked against its tenant's limits before its prompt is rendered
and encoded: that costs less than the check's round trip to Redis, and admission checks the same
limits right after."""


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
    resumable: Resumable = field(init=False)
    idempotency: Idempotency = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        self.jobs = JobBuilder(
            self.registry,
            self.tokenizers,
            settings.max_n,
            settings.affinity_tokens,
            settings.prefix_cache_scope,
        )
        self.resumable = Resumable(self.dispatcher, self.settings.resume_grace)
        self.idempotency = Idempotency(self.redis, self.settings.names, self.settings.idempotency_ttl)

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
        if any(not self.tokenizers.loaded(m.tokenizer) for m in models.values()):
            return "loading a tokenizer"
        return None

    async def resolve(self, request: Request, model: str) -> ModelEntry:
        entry = await self.jobs.resolve(model)
        request.state.model = entry.name  # a served model: safe as a metrics label
        return entry

    async def chat(self, request: Request, body: ChatCompletionRequest, tenant: Tenant) -> Any:
        self.lifecycle.check_open()
        entry = await self.resolve(request, body.model)
        if body.tools or sum(len(m.text()) for m in body.messages) > PRECHECK_CHARS:
            await self._precheck(request, tenant, entry.name)
        prepared = await self.jobs.chat(entry, body, tenant, request.state.request_id)
        return await self._respond(request, prepared, body, tenant)

    async def completion(self, request: Request, body: CompletionRequest, tenant: Tenant) -> Any:
        self.lifecycle.check_open()
        entry = await self.resolve(request, body.model)
        if sum(len(p) for p in body.prompts() if isinstance(p, str)) > PRECHECK_CHARS:
            await self._precheck(request, tenant, entry.name)
        prepared = await self.jobs.completion(entry, body, tenant, request.state.request_id)
        return await self._respond(request, prepared, body, tenant)

    async def _precheck(self, request: Request, tenant: Tenant, model: str) -> None:
        """Refuse a tenant over its limits before its prompt costs an encoding. A request that takes
        up or repeats an earlier one (``Last-Event-ID``, ``Idempotency-Key``) may be no new work:
        it is left to the checks after encoding, which know whether it is."""
        if "last-event-id" in request.headers or "idempotency-key" in request.headers:
            return
        await self.admission.precheck(tenant, model)

    async def _respond(
        self, request: Request, prepared: Prepared, body: GenerationRequest, tenant: Tenant
    ) -> Any:
        if prepared.fan:
            return await self._respond_fanned(request, prepared, body, tenant)
        options = body.stream_options
        resumable = self.resumable if body.stream and options and options.resumable else None
        if (last := request.headers.get("last-event-id")) is not None:
            if not body.stream:
                raise InvalidRequest(
                    "Last-Event-ID takes up a stream: send it with stream: true", param="Last-Event-ID"
                )
            after = EventId.parse(last)
            return await self._take_up(request, prepared, body, after.job, resumable or self.resumable, after)
        key = request.headers.get("idempotency-key")
        keep = None
        if key is not None:
            what = owner_record(prepared.job)
            earlier = await self.idempotency.claim(tenant.name, key, what, prepared.job.id)
            if earlier is not None:
                return await self._take_up(request, prepared, body, earlier.id, resumable, None)
            keep = self.settings.idempotency_ttl
        try:
            admitted = await submit(
                prepared.job, tenant, self.dispatcher, self.admission, self.lifecycle, keep
            )
        except BaseException:
            if key is not None:
                await self.idempotency.forget(tenant.name, key, prepared.job.id)
            raise
        return await self._answer(request, prepared, body, admitted, resumable)

    async def _respond_fanned(
        self, request: Request, prepared: Prepared, body: GenerationRequest, tenant: Tenant
    ) -> Any:
        """A request of several jobs (a text completion's prompts). Its answer is no one job's
        replies, so it cannot be taken up again by a job's event id nor attached to under an
        ``Idempotency-Key``: those are refused rather than ignored."""
        options = body.stream_options
        if options is not None and options.resumable:
            raise InvalidRequest(
                "a stream of several prompts cannot be taken up again: send them as several requests",
                param="stream_options.resumable",
            )
        for header in ("Last-Event-ID", "Idempotency-Key"):
            if request.headers.get(header) is not None:
                raise InvalidRequest(
                    f"{header} is for a request of one prompt: send several prompts as several requests",
                    param=header,
                )
        admitted = await submit_jobs(
            prepared.request_id,
            prepared.jobs,
            body.n,
            tenant,
            self.dispatcher,
            self.admission,
            self.lifecycle,
        )
        return await self._answer(request, prepared, body, admitted, None)

    async def _answer(
        self,
        request: Request,
        prepared: Prepared,
        body: GenerationRequest,
        admitted: Admitted,
        resumable: Resumable | None,
    ) -> Any:
        """The answer of an admitted request: its stream, or its whole body."""
        if body.stream:
            return EventStream(
                sse_events(admitted, prepared.streaming(body), resumable),
                ping=self.settings.ping_interval,
                headers=admitted.ticket.headers,
            )
        admitted.replies.restartable = True  # nothing reached the client: a new worker may start over
        try:
            result = await until_disconnect(request, lambda: collect(admitted.replies, prepared.whole()))
        finally:
            await admitted.close()
        if result is None:  # the client left; nobody reads a response
            return JSONResponse({}, status_code=499)
        return JSONResponse(result, headers=admitted.ticket.headers)

    async def _take_up(
        self,
        request: Request,
        prepared: Prepared,
        body: GenerationRequest,
        job_id: str,
        resumable: Resumable | None,
        after: EventId | None,
    ) -> Any:
        """Answer from the replies of a job an earlier request enqueued: a stream taken up again
        where its client left off (``after``), or the same request sent again under its
        ``Idempotency-Key``."""
        replies = await self.dispatcher.attach(prepared.job.model_copy(update={"id": job_id}))
        prepared.job = replies.job
        attached = Attached(replies, self.lifecycle, stop_on_close=body.stream)
        if body.stream:
            return EventStream(
                sse_events(attached, prepared.streaming(body), resumable, after),
                ping=self.settings.ping_interval,
            )
        replies.restartable = True
        try:
            result = await until_disconnect(request, lambda: collect(replies, prepared.whole()))
        finally:
            await attached.close()
        if result is None:
            return JSONResponse({}, status_code=499)
        return JSONResponse(result)
