"""One job's replies, published in order by the worker that owns the job, and only while it does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.messages import Failure, Final, Job, Started, Tokens, Vectors, decode_progress, encode
from shared.names import GROUP, Names
from shared.scripts import CLAIMED_PUBLISH
from worker.coalesce import Chunk
from worker.outbox import Command, Outbox

Reply = Started | Tokens | Vectors | Final | Failure
PROGRESS_TTL_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Claim:
    """A job this worker holds: where it came from and how many times it was delivered."""

    stream: str
    entry_id: str
    job: Job
    attempt: int
    handed_back: bool = False
    """Re-queued by a worker that shut down mid-job: look for its progress even on attempt 1."""


class ClaimLost(RuntimeError):
    """Another worker took the job over; this one must stop without a word (the new owner answers)."""


class NobodyListening(RuntimeError):
    """No gateway listens for the job's replies any more (its client's gateway died or gave up)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """What earlier attempts of a job already published: resume from here."""

    last_seq: int
    token_ids: tuple[int, ...]

    @classmethod
    def parse(cls, entries: list[bytes]) -> Progress | None:
        """The progress list (the token messages published so far), or None when it is empty."""
        messages = decode_progress(entries)
        if not messages:
            return None
        ids = tuple(t for m in messages for t in m.token_ids)
        return cls(last_seq=max(m.seq for m in messages), token_ids=ids)


class ReplyChannel:
    """Publishes one job's replies with consecutive sequence numbers, while this worker owns the job.

    With ``record_progress`` every token message is also kept in the job's progress list
    (single-choice jobs only: several choices cannot be resumed one by one), which lets another
    worker resume the stream exactly.
    """

    def __init__(
        self,
        outbox: Outbox,
        names: Names,
        claim: Claim,
        worker_id: str,
        published: Callable[[], None],
        record_progress: bool,
        first_seq: int = 0,
    ) -> None:
        job = claim.job
        self._steps = job.steps
        self._outbox = outbox
        self._published = published
        self._record = "1" if record_progress else ""
        self._seq = first_seq
        self._keys = (claim.stream, names.progress(job.id), names.drained(job.model))
        self._owner = (GROUP, worker_id, claim.entry_id)
        self._channel = names.reply_channel(job.id)

    def next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def tokens(self, chunks: Sequence[Chunk]) -> list[Tokens]:
        return [
            Tokens(
                seq=self.next_seq(),
                index=c.index,
                text=c.text,
                token_ids=tuple(c.ids),
                finish_reason=c.finish,
                logprobs=c.logprobs(),
                steps=c.steps() if self._steps else None,
            )
            for c in chunks
        ]

    def command(self, messages: Sequence[Reply], ack: bool = False) -> Command:
        """Publish ``messages`` (and, with ``ack``, end the job) if this worker still owns it."""
        pairs: list[str] = []
        for message in messages:
            self._published()
            pairs += (encode(message), self._record if isinstance(message, Tokens) else "")
        args = (*self._owner, self._channel, PROGRESS_TTL_MS, "ack" if ack else "", *pairs)
        return CLAIMED_PUBLISH.call(self._keys, args)

    async def send(self, messages: Sequence[Reply], ack: bool = False) -> None:
        (result,) = await self._outbox.send(self.command(messages, ack))
        check(result)


def check(result: int) -> None:
    """Raise what the fenced publish's result says (see ``shared.scripts.CLAIMED_PUBLISH``)."""
    if result == 0:
        raise ClaimLost
    if result == 2:
        raise NobodyListening
