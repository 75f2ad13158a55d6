"""A gateway process's life: serving, then draining when it is told to stop, then stopped.

Draining (SIGTERM, Ctrl-C, a scale-down or a rolling deploy): ``/readyz`` answers 503 at once so
load balancers look elsewhere, new requests are refused with 503 and ``Retry-After``, and the
requests in flight get up to ``grace`` seconds to finish. Whatever is still running then is cut
with an error its client sees (an SSE error event, or an error status), never by a stream that just
stops; its job is cancelled like a client disconnect, so workers stop spending on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from api.errors import APIError, Unavailable

log = logging.getLogger(__name__)

CUT_WAIT = 5.0
"""How long cut requests get to send their error and close."""


class Open(Protocol):
    """An admitted request as the lifecycle sees it."""

    def interrupt(self, error: APIError) -> None: ...


class ShuttingDown(Unavailable):
    """Refused or cut because this gateway process is stopping; another one will serve it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=1, code="shutting_down")

    def headers(self) -> dict[str, str]:
        # Closing the connection sends the client's retry to another gateway process.
        return {**super().headers(), "connection": "close"}


class Lifecycle:
    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self._open: set[Open] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` for a request whose client went away (it closes the request when done):
        held here so it is neither lost nor left behind; draining waits for its request."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def check_open(self) -> None:
        """Refuse a new request while draining."""
        if self.draining:
            raise ShuttingDown("this gateway is shutting down; retry the request")

    def opened(self, request: Open) -> None:
        self._open.add(request)
        self._idle.clear()

    def closed(self, request: Open) -> None:
        self._open.discard(request)
        if not self._open:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._open)

    async def drain(self) -> int:
        """Stop taking requests, let those in flight finish within the grace period, cut the rest.
        Returns how many had to be cut."""
        self.draining = True
        begun = time.monotonic()
        log.info("draining: %d request(s) in flight, up to %.0fs to finish", len(self._open), self.grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.grace):
                await self._idle.wait()
        cut = list(self._open)
        for request in cut:
            request.interrupt(ShuttingDown("the gateway stopped before the request finished; retry it"))
        if cut:
            log.warning("cut %d request(s) still running after %.0fs", len(cut), self.grace)
            try:
                async with asyncio.timeout(CUT_WAIT):
                    await self._idle.wait()
            except TimeoutError:
                log.error("%d cut request(s) did not close in %.0fs", len(self._open), CUT_WAIT)
        log.info("drained in %.1fs", time.monotonic() - begun)
        return len(cut)
