"""One embedding job on the engine: every input's vector computed, then published in messages of
about a mebibyte at most (2,048 inputs of 1,024 values are 8 MiB: one pub/sub message that size
would stall the gateway that reads it, and Redis bounds what a subscriber may have unread), the
final message last, with the acknowledgement.

Nothing is published before every vector is computed, and nothing of it is kept as progress: a job
whose worker dies is run again from the top by another one, and its client sees nothing of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.messages import Final, Job, Usage, Vectors
from worker.channel import ReplyChannel
from worker.engine import Engine

MESSAGE_BYTES = 1 << 20
"""Vector bytes in one message, at most (a single vector bigger than this still goes alone)."""


def batches(vectors: Sequence[bytes], limit: int = MESSAGE_BYTES) -> list[tuple[int, Sequence[bytes]]]:
    """Pure: consecutive runs of ``vectors`` of at most ``limit`` bytes each (at least one vector
    each), with the index of each run's first vector."""
    out: list[tuple[int, Sequence[bytes]]] = []
    start, size = 0, 0
    for i, vector in enumerate(vectors):
        if i > start and size + len(vector) > limit:
            out.append((start, vectors[start:i]))
            start, size = i, 0
        size += len(vector)
    if start < len(vectors):
        out.append((start, vectors[start:]))
    return out


async def embed(engine: Engine, job: Job, out: ReplyChannel, limit: int = MESSAGE_BYTES) -> None:
    """Run the embedding job, publish its vectors and its final message, and end it."""
    assert job.embed is not None
    vectors = await engine.embed(job.id, job.embed.inputs(job.prompt_token_ids), job.embed.dimensions)
    messages = [Vectors.pack(out.next_seq(), start, run) for start, run in batches(vectors, limit)]
    for message in messages[:-1]:
        await out.send([message])
    usage = Usage(prompt_tokens=len(job.prompt_token_ids), completion_tokens=0)
    final = Final(seq=out.next_seq(), finish_reasons=(), usage=usage)
    await out.send([*messages[-1:], final], ack=True)  # the last vectors, then the acknowledgement
