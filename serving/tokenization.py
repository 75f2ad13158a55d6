"""``/tokenize`` and ``/detokenize`` as ``vllm serve`` answers them, with the model's tokenizer:
a prompt encoded as a text completion's prompt is, chat messages rendered as a chat request's are
(:mod:`serving.chat`, the same template, keywords and tools), token ids decoded as an echoed prompt
is. No engine work: nothing is admitted or enqueued, only the key is checked."""

from __future__ import annotations

from typing import Any

from api.errors import InvalidRequest
from api.tokenize.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeRequest
from serving.path import JobBuilder
from serving.registry import ModelEntry
from serving.tokenizer import PromptBuilder


async def model_of(jobs: JobBuilder, name: str | None) -> ModelEntry:
    """The named model, or without a name the one model served (as vLLM takes its only model)."""
    if name is not None:
        return await jobs.resolve(name)
    served = await jobs.registry.models()
    if len(served) != 1:
        names = ", ".join(sorted(served)) or "none right now"
        raise InvalidRequest(f"name the model: several are served ({names})", param="model")
    return next(iter(served.values()))


async def tokenize(jobs: JobBuilder, entry: ModelEntry, body: TokenizeRequest) -> dict[str, Any]:
    tokens = await jobs.tokenizers.get(entry.tokenizer)
    if isinstance(body, TokenizeChatRequest):
        plan, ids = await tokens.chat_async(body.chat(), entry.answering, entry.max_logprobs)
        if body.add_special_tokens:
            ids = await tokens.text_async(plan.text, add_special_tokens=True)
    else:
        ids = await tokens.text_async(body.prompt, add_special_tokens=body.add_special_tokens)
    return {
        "count": len(ids),
        "max_model_len": entry.max_model_len,
        "tokens": ids,
        "token_strs": await tokens.token_strs_async(ids) if body.return_token_strs else None,
    }


async def detokenize(tokens: PromptBuilder, body: DetokenizeRequest) -> dict[str, Any]:
    tokens.check_ids(body.tokens, "tokens")
    return {"prompt": await tokens.decode_async(body.tokens)}
