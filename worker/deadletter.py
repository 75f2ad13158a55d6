"""The dead-letter stream: jobs that cannot be run (undecodable, or delivered too many times)."""

from __future__ import annotations

import json

from redis.asyncio import Redis

from shared.messages import DeadLetter, Failure, encode
from shared.names import GROUP, Names

MAX_JOB_ID = 128


async def dead_letter(redis: Redis, names: Names, model: str, letter: DeadLetter) -> None:
    """Move the entry to the model's dead-letter stream and take it off its job stream."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(names.dead_letter(model), letter.fields())  # type: ignore[arg-type]
        pipe.xack(letter.stream, GROUP, letter.entry)
        pipe.xdel(letter.stream, letter.entry)
        await pipe.execute()


async def tell_client(
    redis: Redis,
    names: Names,
    job_id: str,
    message: str = "the job failed on every worker that tried it",
    code: str = "job_failed",
) -> None:
    """The client of a dead-lettered job gets an error instead of waiting for its timeout."""
    failure = Failure(seq=0, status=500, code=code, message=message)
    await redis.publish(names.reply_channel(job_id), encode(failure))


def job_id_of(raw: bytes | None) -> str | None:
    """The id of an entry's job that does not decode as a whole (a newer wire version, say), if
    it has one: its client can then be told rather than left to time out."""
    try:
        found = json.loads(raw or b"").get("id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) and 0 < len(found) <= MAX_JOB_ID and found.isprintable() else None
