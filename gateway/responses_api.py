"""The Responses API over HTTP, for the tenant of the request's key: ``POST /v1/responses``
(streamed as typed events, answered whole, or run in the background) and, on stored responses,
``GET``, ``POST .../cancel`` and ``DELETE``.

A request takes the chat path (:mod:`serving.responses` makes it a chat request, then it is
rendered, admitted and enqueued as any chat job is); :mod:`serving.response_runs` relays, stores
and follows it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.errors import InvalidRequest, NotFound
from api.responses.assembly import replayed, skeleton
from api.responses.items import MAX_ID
from api.responses.protocol import DeletedResponse, Response, ResponsesRequest
from gateway.openapi import RESPONSE_NOT_FOUND, completion_responses, resource_responses
from gateway.service import Gateway
from gateway.sse import EventStream
from serving.path import Prepared, submit
from serving.registry import ModelEntry
from serving.relay import Admitted, Attached, until_disconnect
from serving.response_runs import Run, cancel, current, events, follow, previous, stored, whole
from serving.response_store import UNFINISHED, ResponseStore, Stored
from serving.responses import Turn, renamed, turn
from shared.tenants import Tenant

LARGE_BODY = 64 * 1024
"""Bodies larger than this many bytes have their input converted on a thread."""
OPEN_WAIT, OPEN_WAIT_TRIES = 0.1, 20
"""How long a background request sent again under its Idempotency-Key waits for the response its
first request is storing."""


class ResponsesAPI:
    """The Responses endpoints of one gateway process, and the background responses it follows."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        settings = gateway.settings
        self.store = ResponseStore(gateway.redis, settings.names, settings.response_ttl)
        self._followers: set[asyncio.Task[None]] = set()

    async def create(self, request: Request, body: ResponsesRequest, tenant: Tenant) -> Any:
        gw = self.gw
        gw.lifecycle.check_open()
        entry = await gw.resolve(request, body.model)
        key = request.headers.get("idempotency-key")
        if key is None:  # one sent again under its key may be no new work: the claim below knows
            await gw.admission.precheck(tenant, entry.name)  # over its limits: no rendering
        prepared, chat = await self._prepared(request, body, tenant, entry)
        job_id = prepared.job.id
        if key is not None:
            earlier = await gw.idempotency.claim(tenant.name, key, _what(body), job_id)
            if earlier is not None:
                return await self._again(request, body, prepared, chat, tenant, earlier.id)
        response = skeleton(body, _response_id(job_id), int(prepared.job.created_at), entry.name)
        keep = gw.settings.idempotency_ttl if key is not None else None
        try:
            admitted = await submit(prepared.job, tenant, gw.dispatcher, gw.admission, gw.lifecycle, keep)
            run = Run(
                admitted,
                prepared,
                chat,
                response,
                tenant.id,
                body.wants_logprobs() is not None,
                self.store if body.storing and not body.background else None,
            )
            if body.background:
                return await self._background(run, admitted)
        except BaseException:
            if key is not None:  # nothing runs under it: a new request may take the key
                await gw.idempotency.forget(tenant.name, key, job_id)
            raise
        return await self._answer(request, run, bool(body.stream), admitted.ticket.headers)

    async def _prepared(
        self, request: Request, body: ResponsesRequest, tenant: Tenant, entry: ModelEntry
    ) -> tuple[Prepared, Turn]:
        """The request as the chat job it runs as, and the turn it renders."""
        prior = None
        if body.previous_response_id is not None:
            prior = await previous(self.store, self.gw.dispatcher, tenant.id, body.previous_response_id)
        # A big input is converted off the event loop (vLLM's item models validate it), as chat
        # prompts are rendered.
        big = int(request.headers.get("content-length") or 0) > LARGE_BODY
        chat = await asyncio.to_thread(turn, body, prior) if big else turn(body, prior)
        try:
            prepared = await self.gw.jobs.chat(entry, chat.chat, tenant, request.state.request_id)
        except InvalidRequest as exc:
            raise renamed(exc, body) from None
        return prepared, chat

    async def _answer(self, request: Request, run: Run, stream: bool, headers: dict[str, str] | None) -> Any:
        """A run's answer: its stream of events, or the whole response once it ended."""
        if stream:
            return EventStream(events(run), ping=self.gw.settings.ping_interval, headers=headers)
        run.following.replies.restartable = True  # nothing reached the client: a worker may start over
        try:
            result = await until_disconnect(request, lambda: whole(run))
        finally:
            await run.following.close()
        if result is None:  # the client left; nobody reads a response
            return JSONResponse({}, status_code=499)
        return JSONResponse(result, headers=headers)

    async def _again(
        self,
        request: Request,
        body: ResponsesRequest,
        prepared: Prepared,
        chat: Turn,
        tenant: Tenant,
        job_id: str,
    ) -> Any:
        """The answer to a request sent again under its ``Idempotency-Key``: the response the first
        one made, under the same id. Stored and ended, or in the background, it is read from the
        store; still running, or not stored, it is assembled again from the replies of the first
        request's job (followed live, streamed or whole as this request asks), and not stored again:
        the first request stores it."""
        gw = self.gw
        response_id = _response_id(job_id)
        if body.background:
            return JSONResponse((await self._opened(tenant, response_id)).response)
        if body.storing:
            found = await stored(lambda: self.store.get(tenant.id, response_id))
            if found is not None and found.finished:
                if body.stream:
                    return EventStream(_sent(replayed(found.response)), ping=gw.settings.ping_interval)
                return JSONResponse(found.response)
        replies = await gw.dispatcher.attach(prepared.job.model_copy(update={"id": job_id}))
        prepared.job = replies.job
        # A stream whose client leaves for good stops the job, as the first one's would; a whole
        # answer does not, since the first request may still wait for it.
        attached = Attached(replies, gw.lifecycle, stop_on_close=bool(body.stream))
        response = skeleton(body, response_id, int(replies.job.created_at), replies.job.model)
        logprobs = body.wants_logprobs() is not None
        return await self._answer(
            request,
            Run(attached, prepared, chat, response, tenant.id, logprobs, None),
            bool(body.stream),
            None,
        )

    async def _opened(self, tenant: Tenant, response_id: str) -> Stored:
        """A background response an earlier request under the same key opens: a moment may pass
        between that request claiming the key and its response being stored."""
        for _ in range(OPEN_WAIT_TRIES):
            try:
                return await current(self.store, self.gw.dispatcher, tenant.id, response_id)
            except NotFound:
                await anyio.sleep(OPEN_WAIT)
        return await current(self.store, self.gw.dispatcher, tenant.id, response_id)

    async def _background(self, run: Run, admitted: Admitted) -> JSONResponse:
        """Store the response as ``queued`` and follow its job from a task of this process."""
        admitted.replies.restartable = True  # the client sees only the end
        queued = {**run.response, "status": "queued"}
        try:
            await stored(lambda: self.store.open(run.tenant, queued, run.turn.conversation, run.job))
        except BaseException:
            await admitted.close()
            raise
        task = asyncio.create_task(follow(run, self.store), name=f"follow-{run.id}")
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)
        return JSONResponse(queued, headers=admitted.ticket.headers)

    async def retrieve(self, tenant: Tenant, response_id: str) -> dict[str, Any]:
        return (await current(self.store, self.gw.dispatcher, tenant.id, _checked(response_id))).response

    async def cancel(self, tenant: Tenant, response_id: str) -> dict[str, Any]:
        return await cancel(self.store, self.gw.dispatcher, tenant.id, _checked(response_id))

    async def delete(self, tenant: Tenant, response_id: str) -> dict[str, Any]:
        """Forget a stored response; one still running is cancelled first."""
        found = await current(self.store, self.gw.dispatcher, tenant.id, _checked(response_id))
        if found.status in UNFINISHED:
            await cancel(self.store, self.gw.dispatcher, tenant.id, response_id)
        if not await stored(lambda: self.store.delete(tenant.id, response_id)):
            raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def close(self) -> None:
        """Stop following (at shutdown, after the drain): what is cut reads as failed."""
        for task in list(self._followers):
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)


def _response_id(job_id: str) -> str:
    return "resp_" + job_id.removeprefix("req_")


def _what(body: ResponsesRequest) -> str:
    """What a request under an ``Idempotency-Key`` asks, streamed or not: the key stands for it.
    The whole body counts, not only what the job runs: the response echoes it."""
    asked = body.model_dump_json(exclude={"stream", "stream_options"})
    return "responses:" + hashlib.sha256(asked.encode()).hexdigest()


async def _sent(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _checked(response_id: str) -> str:
    if len(response_id) > MAX_ID:  # names no key: not found, as OpenAI answers any unknown id
        raise NotFound(f"Response with id '{response_id[:64]}…' not found.", param="response_id")
    return response_id


def _api(request: Request) -> ResponsesAPI:
    api: ResponsesAPI = request.app.state.responses
    return api


async def _tenant(request: Request) -> Tenant:
    gw: Gateway = request.app.state.gateway
    tenant = await gw.auth.tenant(request)
    request.state.tenant = tenant.name
    return tenant


Owner = Annotated[Tenant, Depends(_tenant)]


async def create_response(body: ResponsesRequest, request: Request, tenant: Owner) -> Any:
    return await _api(request).create(request, body, tenant)


async def get_response(
    response_id: str,
    request: Request,
    tenant: Owner,
    include: Annotated[list[str] | None, Query(max_length=16)] = None,
    include_obfuscation: bool | None = None,
    starting_after: Annotated[int | None, Query(ge=0)] = None,
    stream: bool | None = None,
) -> dict[str, Any]:
    """A stored response; ``include``, ``include_obfuscation`` and ``starting_after`` are accepted
    and ignored, and a stored response is not replayed as a stream."""
    if stream:
        raise InvalidRequest("a stored response is answered whole, not streamed", param="stream")
    return await _api(request).retrieve(tenant, response_id)


async def cancel_response(response_id: str, request: Request, tenant: Owner) -> dict[str, Any]:
    return await _api(request).cancel(tenant, response_id)


async def delete_response(response_id: str, request: Request, tenant: Owner) -> dict[str, Any]:
    return await _api(request).delete(tenant, response_id)


def router() -> APIRouter:
    """The Responses routes, to add to an app (whose state holds a :class:`ResponsesAPI`)."""
    routes = APIRouter()

    def add(path: str, endpoint: Any, methods: list[str], **options: Any) -> None:
        routes.add_api_route(path, endpoint, methods=methods, response_model=None, **options)

    add(
        "/v1/responses",
        create_response,
        ["POST"],
        responses={**completion_responses(Response), 404: RESPONSE_NOT_FOUND},
    )
    add(
        "/v1/responses/{response_id}", get_response, ["GET"], responses=resource_responses(Response, 400, 404)
    )
    add(
        "/v1/responses/{response_id}",
        delete_response,
        ["DELETE"],
        responses=resource_responses(DeletedResponse, 404),
    )
    add(
        "/v1/responses/{response_id}/cancel",
        cancel_response,
        ["POST"],
        responses=resource_responses(Response, 400, 404),
    )
    return routes
