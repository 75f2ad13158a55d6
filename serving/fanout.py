"""A request of several jobs, as one: a text completion of several prompts runs one job per prompt
(so the workers batch them like any others, and each can fail over on its own), admitted as one
request, enqueued together, and answered as one stream of replies whose choices are numbered
across the jobs (``job * n + choice``, as OpenAI and vLLM number them).

When one job fails, the request fails with its error and the other jobs are cancelled: the answer
is whole or it is an error, never some prompts' completions passed off as all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import anyio

from api.errors import APIError
from serving.admission import Admission
from serving.dispatch import Dispatcher, ReplyStream
from serving.lifecycle import Lifecycle
from serving.relay import Admitted
from shared.messages import Final, Job, Started, Tokens, Usage, Vectors
from shared.tenants import Tenant

_Item = tuple[int, Started | Tokens | Vectors | Final] | BaseException


class FanIn:
    """The replies of a request's jobs as one stream: their token messages with each choice's
    index in the request, then one final message for the whole request (every choice's finish
    reason, the usage summed). Quacks like one :class:`~serving.dispatch.ReplyStream` to
    :class:`~serving.relay.Admitted` and the relay.

    Streamed, a job's tokens pass on as they come, interleaved with the other jobs'. Not streamed
    (``restartable``), a job's tokens are held until its final message, so a job a new worker
    starts over from the top replaces what its first attempt sent instead of adding to it.
    """

    def __init__(self, streams: Sequence[ReplyStream], n: int) -> None:
        if not streams:
            raise ValueError("a request needs at least one job")
        self.streams = list(streams)
        self.job = streams[0].job
        """The first job: what every job shares (tenant, model) and a name for the logs."""
        self.error: str | None = None
        self.epoch = ""
        """Empty: the replies of several jobs are no one attempt's answer; their stream is not
        resumable."""
        self.attached = 0
        """Never taken up (see :attr:`epoch`)."""
        self._n = n
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []
        self._restartable = False

    @property
    def restartable(self) -> bool:
        return self._restartable

    @restartable.setter
    def restartable(self, value: bool) -> None:
        self._restartable = value
        for stream in self.streams:
            stream.restartable = value

    @property
    def finished(self) -> bool:
        return all(stream.finished for stream in self.streams)

    def interrupt(self, error: APIError) -> None:
        for stream in self.streams:
            stream.interrupt(error)

    def usage(self) -> Usage:
        """What the request used: its jobs' usage, summed."""
        used = [stream.usage() for stream in self.streams]
        return Usage(
            prompt_tokens=sum(u.prompt_tokens for u in used),
            completion_tokens=sum(u.completion_tokens for u in used),
        )

    async def __aiter__(self) -> AsyncIterator[Tokens | Final]:
        if not self._pumps:
            self._pumps = [
                asyncio.create_task(self._pump(k, stream), name=f"fan-in-{stream.job.id}")
                for k, stream in enumerate(self.streams)
            ]
        finals: dict[int, Final] = {}
        held: dict[int, list[Tokens]] = {}
        while len(finals) < len(self.streams):
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.error = getattr(item, "code", None) or "error"
                raise item
            k, reply = item
            if isinstance(reply, Started):
                if reply.seq == 0:
                    held[k] = []  # the job (re)starts from the top
            elif isinstance(reply, Tokens):
                moved = reply.model_copy(update={"index": k * self._n + reply.index})
                if self._restartable:
                    held.setdefault(k, []).append(moved)
                else:
                    yield moved
            elif isinstance(reply, Final):  # a generation job sends no vectors
                finals[k] = reply
                for tokens in held.pop(k, []):
                    yield tokens
        yield merged([finals[k] for k in range(len(self.streams))])

    async def _pump(self, k: int, stream: ReplyStream) -> None:
        try:
            async for reply in stream:
                self._queue.put_nowait((k, reply))
        except APIError as exc:  # handed to the reader, which fails the request with it
            self._queue.put_nowait(exc)
        except Exception as exc:  # a defect: the reader reports it as one
            self._queue.put_nowait(exc)

    async def keep(self, seconds: float) -> None:
        """Keep every job's replies for ``seconds``."""
        await asyncio.gather(*(stream.keep(seconds) for stream in self.streams))

    async def close(self, stop: bool = True) -> None:
        """Stop following every job, cancelling those unfinished (if ``stop``). Idempotent."""
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await asyncio.gather(*(stream.close(stop) for stream in self.streams))


def merged(finals: Sequence[Final]) -> Final:
    """The final message of a request from its jobs' own, in job order: every choice's finish
    reason in its place, and the usage summed (each prompt counted once, as vLLM counts it)."""
    return Final(
        seq=0,
        finish_reasons=tuple(reason for final in finals for reason in final.finish_reasons),
        usage=Usage(
            prompt_tokens=sum(f.usage.prompt_tokens for f in finals),
            completion_tokens=sum(f.usage.completion_tokens for f in finals),
        ),
    )


async def submit_jobs(
    request_id: str,
    jobs: Sequence[Job],
    n: int,
    tenant: Tenant,
    dispatcher: Dispatcher,
    admission: Admission,
    lifecycle: Lifecycle,
) -> Admitted:
    """Admit the jobs as one request and enqueue them all, their replies subscribed to first (as
    :func:`serving.path.submit` does for one job); if any cannot be enqueued, those that were are
    cancelled and the request is refused."""
    lifecycle.check_open()
    openings = [asyncio.create_task(dispatcher.subscribe(job)) for job in jobs]
    try:
        ticket = await admission.admit_jobs(tenant, request_id, jobs)
        subs = await asyncio.gather(*openings)
    except BaseException:
        await asyncio.gather(*(dispatcher.unsubscribe(opening) for opening in openings))
        raise
    results = await asyncio.gather(
        *(dispatcher.enqueue(job, sub, tenant.priority) for job, sub in zip(jobs, subs, strict=True)),
        return_exceptions=True,
    )
    streams = [r for r in results if isinstance(r, ReplyStream)]
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*(stream.close() for stream in streams))
            await admission.settle(ticket, Usage(prompt_tokens=0, completion_tokens=0))
        raise failure
    return Admitted(FanIn(streams, n), ticket, admission, lifecycle)
