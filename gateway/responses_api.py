"""The Responses API over HTTP, for the tenant of the request's key: ``POST /v1/responses``
(streamed as typed events, answered whole, or run in the background) and, on stored responses,
``GET``, ``POST .../cancel`` and ``DELETE``.

A request takes the chat path (:mod:`serving.responses` makes it a chat request, then it is
rendered, admitted and enqueued as any chat job is); :mod:`serving.response_runs` relays, stores
and follows it.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.errors import InvalidRequest, NotFound
from api.responses.assembly import skeleton
from api.responses.items import MAX_ID
from api.responses.protocol import DeletedResponse, Response, ResponsesRequest
from gateway.openapi import RESPONSE_NOT_FOUND, completion_responses, resource_responses
from gateway.service import SSE_SEPARATOR, Gateway
from serving.path import submit
from serving.relay import until_disconnect
from serving.response_runs import Run, cancel, current, events, follow, previous, stored, whole
from serving.response_store import UNFINISHED, ResponseStore
from serving.responses import renamed, turn
from shared.tenants import Tenant

LARGE_BODY = 64 * 1024
"""Bodies larger than this many bytes have their input converted on a thread."""


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
        await gw.admission.precheck(tenant, entry.name)  # a tenant over its limits costs no rendering
        prior = None
        if body.previous_response_id is not None:
            prior = await previous(self.store, gw.dispatcher, tenant.id, body.previous_response_id)
        # A big input is converted off the event loop (vLLM's item models validate it), as chat
        # prompts are rendered.
        big = int(request.headers.get("content-length") or 0) > LARGE_BODY
        chat = await asyncio.to_thread(turn, body, prior) if big else turn(body, prior)
        job_id = request.state.request_id
        try:
            prepared = await gw.jobs.chat(entry, chat.chat, tenant, job_id)
        except InvalidRequest as exc:
            raise renamed(exc, body) from None
        response = skeleton(
            body, "resp_" + job_id.removeprefix("req_"), int(prepared.job.created_at), entry.name
        )
        admitted = await submit(prepared.job, tenant, gw.dispatcher, gw.admission, gw.lifecycle)
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
            return await self._background(run)
        if body.stream:
            return EventSourceResponse(
                events(run),
                ping=gw.settings.ping_interval,
                headers=admitted.ticket.headers,
                sep=SSE_SEPARATOR,
            )
        admitted.replies.restartable = True  # nothing reached the client: a new worker may start over
        try:
            result = await until_disconnect(request, lambda: whole(run))
        finally:
            await admitted.close()
        if result is None:  # the client left; nobody reads a response
            return JSONResponse({}, status_code=499)
        return JSONResponse(result, headers=admitted.ticket.headers)

    async def _background(self, run: Run) -> JSONResponse:
        """Store the response as ``queued`` and follow its job from a task of this process."""
        run.admitted.replies.restartable = True  # the client sees only the end
        queued = {**run.response, "status": "queued"}
        try:
            await stored(lambda: self.store.open(run.tenant, queued, run.turn.conversation, run.job))
        except BaseException:
            await run.admitted.close()
            raise
        task = asyncio.create_task(follow(run, self.store), name=f"follow-{run.id}")
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)
        return JSONResponse(queued, headers=run.admitted.ticket.headers)

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
