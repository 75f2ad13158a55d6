"""One job's replies, published in order by the worker that owns the job, and only while it does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.messages import (
    Failure,
    Final,
    Job,
    Started,
    Tokens,
    Vectors,
    decode_progress,
    encode,
    encode_tokens,
)
from shared.names import GROUP, Names
from shared.scripts import claimed_publish
from worker.coalesce import Chunk
from worker.outbox import Command, Outbox

Reply = Started | Tokens | Vectors | Final | Failure | bytes
"""A message, or a token message already encoded (see :meth:`ReplyChannel.tokens`)."""
PROGRESS_TTL_MS = 3_600_000
"""How long a running job's progress list outlives its last message."""
ENDED_TTL_MS = 120_000
"""How long the progress list of a job that ended is kept: a client that lost its stream near the end
may take it up again meanwhile (a gateway keeps it longer for a request with an idempotency key)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A job this worker holds: where it came from and how many times it was delivered."""

    stream: str
    entry_id: str
    job: Job
    attempt: int
    handed_back: bool = False
    """Re-queued by a worker that shut down mid-job, or resumed after it made room for another
    tenant's job: look for its progress even on attempt 1."""


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
        """The progress list (every reply published so far), or None when it holds no tokens."""
        messages = decode_progress(entries)
        tokens = [m for m in messages if isinstance(m, Tokens)]
        if not tokens:
            return None
        ids = tuple(t for m in tokens for t in m.token_ids)
        return cls(last_seq=max(m.seq for m in messages), token_ids=ids)


class ReplyChannel:
    """Publishes one job's replies with consecutive sequence numbers, while this worker owns the job.

    Every reply is also kept in the job's progress list: another worker resumes a single-choice
    job from its tokens (several choices cannot be resumed one by one, nor a grammar's answer), and
    a gateway takes up the stream of a client that reconnects. Not an embedding job's vectors:
    megabytes that nobody reads back (its answer is not streamed, and a worker that takes the job
    over runs it again from the top). ``fresh``: this attempt starts the job over (its first
    message clears what earlier attempts left).
    """

    def __init__(
        self,
        outbox: Outbox,
        names: Names,
        claim: Claim,
        worker_id: str,
        published: Callable[[int], None],
        fresh: bool,
        first_seq: int = 0,
    ) -> None:
        job = claim.job
        self._steps = job.steps
        self._outbox = outbox
        self._published = published
        self._reset = fresh
        self._seq = first_seq
        self._keys = (claim.stream, names.progress(job.id), names.drained(job.model))
        self._shared = (GROUP, worker_id, PROGRESS_TTL_MS, ENDED_TTL_MS)
        self._entry_id = claim.entry_id
        self._channel = names.reply_channel(job.id)

    def next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def tokens(self, chunks: Sequence[Chunk]) -> list[Reply]:
        """The chunks' token messages; those that carry only text and ids are encoded at once,
        without building their model (see :func:`shared.messages.encode_tokens`)."""
        return [self._token_message(c) for c in chunks]

    def _token_message(self, c: Chunk) -> Reply:
        if not c.sampled and c.prompt is None and not self._steps:
            return encode_tokens(self.next_seq(), c.index, c.text, c.ids, c.finish)
        return Tokens(
            seq=self.next_seq(),
            index=c.index,
            text=c.text,
            token_ids=tuple(c.ids),
            finish_reason=c.finish,
            logprobs=c.logprobs(),
            steps=c.steps() if self._steps else None,
            prompt_logprobs=c.prompt,
        )

    def command(self, messages: Sequence[Reply], ack: bool = False) -> Command:
        """Publish ``messages`` (and, with ``ack``, end the job) if this worker still owns it."""
        pairs: list[str | bytes] = []
        for message in messages:
            if isinstance(message, bytes):
                pairs += (message, "1")
            else:
                pairs += (encode(message), "" if isinstance(message, Vectors) else "1")
        self._published(len(messages))
        flags = ("a" if ack else "") + ("r" if self._reset and messages else "")
        if messages:
            self._reset = False
        return claimed_publish(self._keys, self._shared, self._entry_id, self._channel, flags, pairs)

    async def send(self, messages: Sequence[Reply], ack: bool = False) -> None:
        (result,) = await self._outbox.send(self.command(messages, ack))
        check(result)


def check(reply: list[int]) -> None:
    """Raise what the fenced publish's reply says (see ``shared.scripts.CLAIMED_PUBLISH``)."""
    (result,) = reply
    if result == 0:
        raise ClaimLost
    if result == 2:
        raise NobodyListening
