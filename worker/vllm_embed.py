"""Embeddings on vLLM's pooling runner: what vLLM's model config says of an embedding model, and the
inputs of one embedding job run on ``AsyncLLM.encode`` as ``vllm serve`` runs them.

vLLM is imported lazily, as in :mod:`worker.vllm_engine`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from shared.messages import EmbeddingModel
from worker.engine import EngineFailed, EngineRejected


class UnsupportedModel(RuntimeError):
    """vLLM runs the model for a task a worker does not serve (a pooling model that does not embed)."""


def embedding_model(config: Any, tasks: Sequence[str]) -> EmbeddingModel | None:
    """What vLLM's model config says of an embedding model (None for a generating one)."""
    if config.runner_type != "pooling":
        return None
    if "embed" not in tasks:
        raise UnsupportedModel(
            f"vLLM runs this model for {', '.join(tasks) or 'no task'}; a worker serves text "
            "generation or embeddings"
        )
    dimensions = config.matryoshka_dimensions
    return EmbeddingModel(
        size=config.embedding_size,
        matryoshka=bool(config.is_matryoshka),
        dimensions=tuple(dimensions) if dimensions else None,
    )


async def embed_all(
    llm: Any, request_id: str, inputs: Sequence[Sequence[int]], dimensions: int | None
) -> list[bytes]:
    """Every input as an engine request of its own, all at once (the engine batches them), as
    vLLM's server runs the inputs of one embeddings request; each vector normalized or not as the
    model's pooler says, and cut to ``dimensions`` before that. A failing input, or cancelling
    this call, aborts the rest (``AsyncLLM.encode`` aborts its request when cancelled)."""
    from vllm import PoolingParams
    from vllm.exceptions import VLLMClientError
    from vllm.inputs import tokens_input

    async def one(index: int, ids: Sequence[int]) -> bytes:
        params = PoolingParams(task="embed", dimensions=dimensions)
        final = None
        async for output in llm.encode(tokens_input(list(ids)), params, f"{request_id}-{index}"):
            final = output
        if final is None or final.error is not None:
            raise EngineFailed(f"the engine failed input {index}: {getattr(final, 'error', None)}")
        return little_endian_float32(final.outputs.data)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i, ids)) for i, ids in enumerate(inputs)]
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        # vLLM raises VLLMClientError or ValueError for a request it refuses (neither derives from
        # the other), e.g. dimensions it does not allow; both are the request's fault.
        if isinstance(first, VLLMClientError | ValueError):
            raise EngineRejected(str(first)) from first
        raise first from None
    return [task.result() for task in tasks]


def little_endian_float32(data: Any) -> bytes:
    """A pooled vector (a tensor) as the bytes of its values in little-endian float32."""
    import torch

    values = data.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return bytes(values.astype("<f4", copy=False).tobytes())
