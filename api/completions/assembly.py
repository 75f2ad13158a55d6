"""Text completion answers, choice by choice: streamed or whole, a choice is its text.

A plain answer is its text (:data:`TEXT`, through the shared assemblers). With ``echo`` or
``logprobs`` it is more (:class:`TextStream`, :class:`TextFull`): the prompt's text first, and the
log probabilities in OpenAI's legacy shape, formatted as vLLM formats them (the -9999 floor, one
more alternative than asked for, since the token itself comes first, and text offsets counted in
the tokens' own texts). A request of several prompts numbers its choices ``prompt * n + choice``,
so a choice's index says which prompt it continues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api.assembly import Family, FullAssembler, StreamAssembler, _chunk
from api.common import usage_dict
from api.sse import encode
from shared.messages import Final, Logprobs, Tokens

OBJECT = OBJECT_CHUNK = "text_completion"
FLOOR = -9999.0
"""What stands for minus infinity in an answer (JSON has no infinity), as in vLLM's."""


def delta_choice(index: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    """One choice of a streamed chunk (a text completion's chunks look alike from the first on)."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def message_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    """One choice of a whole answer."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


TEXT = Family(OBJECT, OBJECT_CHUNK, delta_choice, message_choice)


@dataclass(frozen=True, slots=True)
class Echo:
    """What ``echo`` puts before one prompt's completions."""

    text: str
    """The prompt as given, or its token ids decoded."""
    first_token: str
    """The text of the prompt's first token: listed with no log probability, nothing precedes it."""


@dataclass(frozen=True, slots=True)
class TextPlan:
    """How the answer of a text completion request is assembled."""

    n: int
    """Choices per prompt: choice ``i`` continues prompt ``i // n``."""
    echo: tuple[Echo, ...] | None = None
    """Per prompt, when the request echoes them."""
    top: int | None = None
    """``logprobs``: alternatives per token (None: no log probabilities)."""
    echo_only: bool = False
    """``max_tokens: 0``: the prompt is the whole answer. The engine generates one token to score
    it (as vLLM does), which counts in the usage but is not shown."""

    def finish(self, reason: str | None) -> str | None:
        """A choice's finish reason. Scoring a prompt always ends at its limit of 0 tokens, even
        when the step run to score it happened to sample the end of text."""
        return "length" if self.echo_only and reason == "stop" else reason

    @property
    def rich(self) -> bool:
        """More than text: the shared plain assemblers will not do."""
        return self.echo is not None or self.top is not None


@dataclass
class TokenLists:
    """One choice's (or one chunk's) ``logprobs``: four lists in step."""

    offset: int = 0
    """Where the next token starts in the choice's text."""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def _token(self, text: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def add(self, logprobs: Logprobs | None, top: int) -> None:
        """Tokens with their log probabilities and up to ``top`` alternatives besides their own."""
        if logprobs is None:
            return
        for i, (sampled, text) in enumerate(zip(logprobs.sampled, logprobs.texts, strict=False)):
            alternatives = logprobs.top[i][: top + 1] if i < len(logprobs.top) else ()
            self._token(text, max(sampled, FLOOR), {t: max(p, FLOOR) for _, p, t in alternatives})

    def prompt(self, echo: Echo, logprobs: Logprobs | None, top: int) -> None:
        """A prompt's tokens: the first with none, the rest as the worker scored them."""
        self._token(echo.first_token, None, None)
        self.add(logprobs, top)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


@dataclass
class TextStream(StreamAssembler):
    """Streamed chunks of text completions with ``echo`` or ``logprobs``: each choice's first chunk
    holds its prompt (and the prompt's log probabilities) before its first text."""

    plan: TextPlan = field(default_factory=lambda: TextPlan(n=1))
    _prompt_logprobs: dict[int, Logprobs] = field(default_factory=dict)
    _offsets: dict[int, int] = field(default_factory=dict)

    def events(self, reply: Tokens | Final) -> list[bytes]:
        if isinstance(reply, Final):
            return [encode(chunk) for chunk in self.final(reply)]
        return [encode(chunk) for chunk in self.tokens(reply)]

    def tokens(self, reply: Tokens) -> list[dict[str, Any]]:
        plan, index = self.plan, reply.index
        prompt = index // plan.n
        if reply.prompt_logprobs is not None:
            self._prompt_logprobs[prompt] = reply.prompt_logprobs
        first = index not in self._opened
        self._opened.add(index)
        self._generated += len(reply.token_ids)
        lists = TokenLists(self._offsets.get(index, 0)) if plan.top is not None else None
        text = reply.text
        if plan.echo is not None and first:
            echo = plan.echo[prompt]
            if lists is not None:
                lists.prompt(echo, self._prompt_logprobs.get(prompt), plan.top or 0)
            text = echo.text if plan.echo_only else echo.text + text
        elif plan.echo_only:
            text = ""  # the token generated to score the prompt is not part of the answer
        if lists is not None and not plan.echo_only:
            lists.add(reply.logprobs, plan.top or 0)
        if lists is not None:
            self._offsets[index] = lists.offset
        if not (text or first or reply.finish_reason is not None or (lists and lists.tokens)):
            return []
        choice = {
            "index": index,
            "text": text,
            "logprobs": lists.as_dict() if lists is not None else None,
            "finish_reason": plan.finish(reply.finish_reason),
        }
        return [_chunk(self.meta, [choice], self._so_far())]


@dataclass
class TextFull(FullAssembler):
    """A whole text completion answer with ``echo`` or ``logprobs`` (see :class:`TextStream`)."""

    plan: TextPlan = field(default_factory=lambda: TextPlan(n=1))
    _logprobs: dict[int, list[Logprobs]] = field(default_factory=dict)
    _prompt_logprobs: dict[int, Logprobs] = field(default_factory=dict)

    def restart(self) -> None:
        super().restart()
        self._logprobs.clear()
        self._prompt_logprobs.clear()

    def tokens(self, reply: Tokens) -> None:
        super().tokens(reply)
        if reply.prompt_logprobs is not None:
            self._prompt_logprobs[reply.index // self.plan.n] = reply.prompt_logprobs
        if reply.logprobs is not None:
            self._logprobs.setdefault(reply.index, []).append(reply.logprobs)

    def choice(self, index: int, reason: str | None) -> dict[str, Any]:
        plan = self.plan
        prompt = index // plan.n
        text = "" if plan.echo_only else "".join(self._texts.get(index, []))
        lists = TokenLists() if plan.top is not None else None
        if plan.echo is not None:
            echo = plan.echo[prompt]
            text = echo.text + text
            if lists is not None:
                lists.prompt(echo, self._prompt_logprobs.get(prompt), plan.top or 0)
        if lists is not None and not plan.echo_only:
            for logprobs in self._logprobs.get(index, []):
                lists.add(logprobs, plan.top or 0)
        listed = lists.as_dict() if lists is not None else None
        return {"index": index, "text": text, "logprobs": listed, "finish_reason": plan.finish(reason)}

    def response(self, reply: Final) -> dict[str, Any]:
        return {
            "id": self.meta.id,
            "object": self.meta.object_full,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": [self.choice(i, reason) for i, reason in enumerate(reply.finish_reasons)],
            "usage": usage_dict(reply.usage),
        }
