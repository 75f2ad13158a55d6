"""Turns chat messages or a text prompt into token ids, with the tokenizer the workers advertise.

The gateway tokenizes (as vLLM's own API server does) so it can refuse a prompt that does not fit the
model's context before anything is enqueued, and so a job carries exact token ids.

One gateway process relays many streams on one event loop, so a big prompt must not hold it: a
prompt that cannot fit whatever it encodes to is refused from its length alone, and long ones are
encoded on a thread (the tokenizer's Rust core releases the GIL), short ones inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Sequence
from typing import Any, Protocol

from api.chat.protocol import ChatCompletionRequest
from api.errors import InvalidRequest, Unavailable
from serving.chat import Answering, ChatPlan, ChatRenderer

INLINE_CHARS = 16_384
"""Prompts up to this many characters are encoded on the event loop (a thread hop costs more)."""
SAFETY = 2
"""How much the length bound of :meth:`PromptBuilder.least_tokens` is loosened, for normalizers that
drop characters (accents, repeated spaces) so a token may cover more text than it spells."""


class _HFTokenizer(Protocol):
    vocab_size: int
    chat_template: Any

    def __len__(self) -> int: ...
    def get_vocab(self) -> dict[str, int]: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class PromptBuilder:
    """One loaded tokenizer: applies the chat template and encodes prompts."""

    def __init__(self, tokenizer: _HFTokenizer) -> None:
        self._tok = tokenizer
        self._vocab = len(tokenizer)
        # A token spells at least the text it covers (byte-level BPE: a character per byte;
        # SentencePiece: "▁" for a space, "<0x0A>" for a byte), so no token covers more characters
        # than its UTF-8 spelling has bytes.
        self._longest = max((len(t.encode()) for t in tokenizer.get_vocab()), default=1) or 1
        self._renderer = ChatRenderer(tokenizer)

    def least_tokens(self, chars: int) -> int:
        """A lower bound on the tokens any text of ``chars`` characters encodes to."""
        return chars // (self._longest * SAFETY)

    async def chat_async(
        self, body: ChatCompletionRequest, answering: Answering, max_logprobs: int
    ) -> tuple[ChatPlan, list[int]]:
        if sum(len(m.text()) for m in body.messages) <= INLINE_CHARS:
            return self.chat(body, answering, max_logprobs)
        return await asyncio.to_thread(self.chat, body, answering, max_logprobs)

    async def text_async(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str) or len(prompt) <= INLINE_CHARS:
            return self.text(prompt)
        return await asyncio.to_thread(self.text, prompt)

    def chat(
        self, body: ChatCompletionRequest, answering: Answering, max_logprobs: int
    ) -> tuple[ChatPlan, list[int]]:
        """The request rendered as vLLM's server renders it (see :mod:`serving.chat`), and its
        prompt's token ids."""
        plan = self._renderer.plan(body, answering, max_logprobs)
        return plan, self._tok.encode(plan.text, add_special_tokens=bool(plan.request.add_special_tokens))

    def text(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._tok.encode(prompt, add_special_tokens=True)
        self.check_ids(prompt, "prompt")
        return list(prompt)

    def check_ids(self, ids: Sequence[int], param: str) -> None:
        """Refuse token ids the model does not have, before the engine does so after enqueueing."""
        bad = next((t for t in ids if not 0 <= t < self._vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"token id {bad} is outside the vocabulary (0..{self._vocab - 1})", param=param
            )


class TokenizerCache:
    """Loads each tokenizer once (off the event loop) and keeps it."""

    def __init__(self) -> None:
        self._loaded: dict[str, PromptBuilder] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def loaded(self, source: str) -> bool:
        return source in self._loaded

    async def get(self, source: str) -> PromptBuilder:
        if (builder := self._loaded.get(source)) is not None:
            return builder
        lock = self._locks.setdefault(source, asyncio.Lock())
        async with lock:
            if (builder := self._loaded.get(source)) is None:
                builder = await asyncio.to_thread(
                    _warm, PromptBuilder(await asyncio.to_thread(_load, source))
                )
                self._loaded[source] = builder
        return builder


WARM_UP = ChatCompletionRequest.model_validate(
    {"model": "-", "messages": [{"role": "user", "content": "Hello"}]}
)


def _warm(builder: PromptBuilder) -> PromptBuilder:
    """Compile the chat template and run the encoder once, so the first request pays for neither."""
    with contextlib.suppress(InvalidRequest):  # a template that needs more than one user message
        builder.chat(WARM_UP, Answering(), 0)
    return builder


def _load(source: str) -> _HFTokenizer:
    from transformers import AutoTokenizer

    try:
        tok: _HFTokenizer = AutoTokenizer.from_pretrained(source)  # type: ignore[assignment]
    except (OSError, ValueError) as exc:
        raise Unavailable(f"cannot load the tokenizer of this model from {source!r}: {exc}") from exc
    freeze_heap()
    return tok


def freeze_heap() -> None:
    """Exempt everything loaded so far from garbage collection.

    Loading a tokenizer imports transformers (and torch): hundreds of thousands of long-lived
    objects that every full collection would walk again, stalling the event loop for hundreds of
    milliseconds under load.
    """
    gc.collect()
    gc.freeze()
