"""The dead-letter stream: jobs that cannot be run (undecodable, or delivered too many times)."""

from __future__ import annotations

from redis.asyncio import Redis

from shared.messages import DeadLetter, Failure, encode
from shared.names import GROUP, Names


async def dead_letter(redis: Redis, names: Names, model: str, letter: DeadLetter) -> None:
    """Move the entry to the model's dead-letter stream and take it off its job stream."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(names.dead_letter(model), letter.fields())  # type: ignore[arg-type]
        pipe.xack(letter.stream, GROUP, letter.entry)
        pipe.xdel(letter.stream, letter.entry)
        await pipe.execute()


async def tell_client(redis: Redis, names: Names, job_id: str) -> None:
    """The client of a dead-lettered job gets an error instead of waiting for its timeout."""
    failure = Failure(
        seq=0, status=500, code="job_failed", message="the job failed on every worker that tried it"
    )
    await redis.publish(names.reply_channel(job_id), encode(failure))
