"""A Responses request's run, once its chat job is admitted (or attached to again, for a request
sent again under its ``Idempotency-Key``): streamed as typed events, gathered into one response
object, or followed in the background; stored at its end when asked.

Background responses: the job is already durable (a worker that dies is replaced mid-answer), so
a background response is the same job with nobody waiting on the HTTP connection. The gateway
that accepted it follows the job to its end and stores the result, renewing the response's lease
while it does. What it does not survive is that gateway: if it stops (a crash, or a drain that
outlasts its grace period), the response ends ``failed``: at once when the gateway can still say
so, else as soon as anyone reads the response after the lease ran out (about fifteen seconds), and
its job is cancelled then. A response is never left ``in_progress`` with nobody to finish it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from redis.exceptions import RedisError

from api.errors import APIError, InternalError, InvalidRequest, NotFound, Unavailable, UpstreamFailure
from api.responses.assembly import ResponseEvents, completed, failed
from serving.dispatch import Dispatcher
from serving.path import Prepared
from serving.relay import Following, collect
from serving.response_store import LEASE, UNFINISHED, ResponseStore, Stored
from serving.responses import Previous, Turn
from shared.messages import Final, Started, Tokens

log = logging.getLogger(__name__)
T = TypeVar("T")

LOST = "gateway_lost"


class Cancelled(APIError):
    """The response was cancelled (``POST /v1/responses/{id}/cancel``) while it ran."""

    status = 499
    type = "invalid_request_error"
    code = "cancelled"


@dataclass
class Run:
    """One Responses request whose job's replies it follows."""

    following: Following
    """Its job's replies: admitted for this request, or attached to under an ``Idempotency-Key``."""
    prepared: Prepared
    turn: Turn
    response: dict[str, Any]
    """The response object before any output (status ``in_progress``)."""
    tenant: str
    """The tenant's id (``Tenant.id``, not its name), which its stored responses are kept under."""
    logprobs: bool
    store: ResponseStore | None
    """Where the response is kept when it ends (None: ``store: false``, or a request sent again
    whose first one keeps it)."""

    @property
    def id(self) -> str:
        return str(self.response["id"])

    async def keep(self, response: dict[str, Any]) -> None:
        """Store the response that ended (unless ``store: false``)."""
        store = self.store
        if store is not None:
            await stored(lambda: store.put(self.tenant, response, self.turn.conversation, self.job))

    @property
    def job(self) -> str:
        return self.following.replies.job.id


async def stored(step: Callable[[], Awaitable[T]]) -> T:
    """A step of the response store; Redis lost is the service unavailable."""
    try:
        return await step()
    except (RedisError, OSError) as exc:
        raise Unavailable(f"the response store is unreachable: {exc}", retry_after=2) from exc


async def events(run: Run) -> AsyncIterator[bytes]:
    """The SSE events of a streamed response; an error after the start is an ``error`` event, and
    the stream ends only after ``response.completed`` (or ``.incomplete``, ``.failed``) or it."""
    parsers = run.prepared.parsers
    stream = ResponseEvents(
        run.response, run.prepared.streaming(run.turn.chat), parsers[0] if parsers else None, run.logprobs
    )
    try:
        for event in stream.start():
            yield event
        async for reply in run.following.replies:
            if isinstance(reply, Tokens | Final):
                out = stream.events(reply)
                if stream.result is not None:
                    await run.keep(stream.result)  # stored before the client learns it ended
                for event in out:
                    yield event
    except APIError as exc:
        yield stream.error(exc.envelope())
    except Exception:  # a defect: the client must still learn the stream is broken
        log.exception("response stream of %s failed", run.id)
        yield stream.error(InternalError(request_id=run.job).envelope())
    finally:
        await run.following.close()


async def whole(run: Run) -> dict[str, Any]:
    """The whole response (``stream: false``), stored if asked."""
    chat = await collect(run.following.replies, run.prepared.whole())
    response = completed(run.response, chat, run.logprobs)
    await run.keep(response)
    return response


async def follow(run: Run, store: ResponseStore) -> None:
    """Follow a background response's job to its end and store how it ended, holding its lease
    meanwhile; a cancel seen in the store stops the job."""
    async with anyio.create_task_group() as group:

        async def keep_lease() -> None:
            while True:
                await anyio.sleep(LEASE / 3)
                try:
                    await store.keep(run.id)
                    if await store.status(run.tenant, run.id) == "cancelled":
                        run.following.interrupt(Cancelled("the response was cancelled"))
                except (RedisError, OSError) as exc:
                    log.warning("lease of %s not renewed: %s", run.id, exc)

        group.start_soon(keep_lease)
        try:
            response = await _gather(run, store)
        except APIError as exc:
            response = failed(run.response, exc.code or exc.type, exc.message)
        except Exception:  # a defect: the response must still end
            log.exception("background response %s failed", run.id)
            response = failed(run.response, "internal_error", InternalError(run.job).message)
        finally:
            await run.following.close()
            group.cancel_scope.cancel()
    try:
        await store.finish(run.tenant, response)
    except (RedisError, OSError) as exc:
        log.warning("background response %s could not be stored (%s); it will read as failed", run.id, exc)


async def _gather(run: Run, store: ResponseStore) -> dict[str, Any]:
    assembler = run.prepared.whole()
    started = False
    async for reply in run.following.replies:
        if isinstance(reply, Started):
            if reply.seq == 0:
                assembler.restart()
            if not started:
                started = True
                await stored(lambda: store.move(run.tenant, run.id, "in_progress", ("queued",)))
        elif isinstance(reply, Tokens):
            assembler.tokens(reply)
        elif isinstance(reply, Final):
            return completed(run.response, assembler.response(reply), run.logprobs)
    raise UpstreamFailure("the reply stream ended without a final message")


async def current(store: ResponseStore, dispatcher: Dispatcher, tenant: str, response_id: str) -> Stored:
    """A stored response as it stands (404 if the tenant has none by that id). An unfinished one
    whose follower is gone (no lease) is failed here, and its job cancelled."""
    found = await stored(lambda: store.get(tenant, response_id))
    if found is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    if found.status in UNFINISHED and not await stored(lambda: store.followed(response_id)):
        error = {
            "code": LOST,
            "message": "the gateway following this background response stopped before it ended",
        }
        moved, _ = await stored(lambda: store.move(tenant, response_id, "failed", UNFINISHED, error=error))
        if moved:
            await dispatcher.cancel(found.job)
        return await current(store, dispatcher, tenant, response_id)
    return found


async def previous(store: ResponseStore, dispatcher: Dispatcher, tenant: str, response_id: str) -> Previous:
    """What a new turn continues: the stored response's conversation and output."""
    try:
        found = await current(store, dispatcher, tenant, response_id)
    except NotFound as exc:
        raise NotFound(
            f"Previous response with id '{response_id}' not found.", param="previous_response_id"
        ) from exc
    if not found.finished:
        raise InvalidRequest(
            f"Previous response with id '{response_id}' has not ended yet (status {found.status})",
            param="previous_response_id",
        )
    return Previous(found.conversation, list(found.response.get("output") or ()))


async def cancel(
    store: ResponseStore, dispatcher: Dispatcher, tenant: str, response_id: str
) -> dict[str, Any]:
    """Cancel a background response that has not ended (a cancelled one is answered as it is)."""
    found = await current(store, dispatcher, tenant, response_id)
    if found.status != "cancelled":
        moved, before = await stored(lambda: store.move(tenant, response_id, "cancelled", UNFINISHED))
        if not moved:
            raise InvalidRequest(
                f"only a background response that has not ended can be cancelled; this one is {before}",
                param="response_id",
            )
        await dispatcher.cancel(found.job)
        found = await current(store, dispatcher, tenant, response_id)
    return found.response
