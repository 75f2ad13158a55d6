"""Pure: the simulated engine's continuous batching, one step at a time, with no clock and no I/O.

It follows vLLM's scheduler where that shapes timing: each choice of a request is a sequence of its
own; running sequences decode one token per step, first come first served; waiting ones are
admitted while there are fewer than ``capacity`` running, the step's token budget lasts and the
KV cache has room for their prompt; a prompt longer than what is left of the budget is prefilled
in chunks, and its first token comes in the step that completes it. When the running sequences
outgrow the KV cache, the newest is preempted: it goes back to the front of the queue and
recomputes its prompt and tokens when readmitted, as vLLM does.

What a choice generates is planned when it is created (:func:`plan_choice`): first the tokens of
its script, if its request has a shape (reasoning, a JSON document, a tool call:
:mod:`worker.sim_shapes`), then tokens that walk a pool of plain-text vocabulary ids; it ends at
``max_tokens`` ("length"), after a final script (EOS, "stop"), or where its pseudo-random natural
end falls ("stop"), as the real engine's stream would report them.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.messages import FinishReason, Sampling
from worker.engine import Delta, TokenLogprobs
from worker.sim_shapes import Script, token_logprobs
from worker.sim_timing import StepWork

OwnerT = TypeVar("OwnerT")
"""Whatever a choice belongs to (the engine's request); compared by identity."""

NEVER = math.inf
MEAN_NATURAL_TOKENS = 256
"""Mean length of an answer that ends on its own (EOS or a stop token id), exponentially distributed:
an arbitrary but typical chat answer length. ``ignore_eos`` with no ``stop_token_ids`` never ends so."""


@dataclass(slots=True, eq=False)
class Choice(Generic[OwnerT]):
    """One sequence in the batch: a choice of a request, and what it will generate."""

    owner: OwnerT
    """The request it belongs to; :meth:`Batch.drop` removes every choice of an owner."""
    index: int
    prompt_len: int
    limit: int
    """Most tokens it may generate: ``max_tokens``, or less when the context ends first."""
    end_at: float
    """Position (from 1) of the token that ends it with "stop", or NEVER."""
    end_token: int
    end_text: str
    ids: Sequence[int]
    texts: Sequence[str]
    """Its pool of ordinary tokens and the text each adds."""
    start: int
    stride: int
    script: Script | None = None
    """Tokens it generates before walking its pool."""
    top: int | None = None
    """Alternatives whose log probabilities each token carries (None: no log probabilities)."""
    rng: random.Random | None = None
    """Draws the log probabilities."""
    generated: int = 0
    todo: int = field(default=-1)
    """Tokens still to prefill before its next token: the prompt at first; after a preemption, the
    prompt and what it had generated."""
    emits: bool = False
    """Set by :meth:`Batch.schedule`: this step gives it a token."""

    def __post_init__(self) -> None:
        if self.todo < 0:
            self.todo = self.prompt_len

    @property
    def held(self) -> int:
        """Tokens it holds in the KV cache."""
        return self.prompt_len + self.generated - self.todo


def plan_choice(
    owner: OwnerT,
    index: int,
    key: str,
    prompt_len: int,
    sampling: Sampling,
    max_model_len: int,
    ids: Sequence[int],
    texts: Sequence[str],
    eos_token: int | None,
    stop_text: Callable[[int], str] = lambda token: "",
    script: Script | None = None,
) -> Choice[OwnerT]:
    """A choice's plan, reproducible from ``key`` (the request's seed, or its id) and its index.

    Its natural end, when it has one, is an EOS (unless ``ignore_eos``) or one of ``stop_token_ids``
    (always honoured, as vLLM does); like vLLM under ``min_tokens``, it never comes before token
    ``min_tokens + 1``, nor before the end of a ``script``. The ending token is part of the choice's
    ids; its text is empty unless ``include_stop_str_in_output`` asks for a stop token's text
    (``stop_text``). A final script ends with EOS right after it (with its last token when the
    tokenizer has no EOS), whatever ``ignore_eos`` says, as a grammar that is complete allows
    nothing else.
    """
    rng = random.Random(f"{key}/{index}")
    enders = [
        *sampling.stop_token_ids,
        *([eos_token] if eos_token is not None and not sampling.ignore_eos else []),
    ]
    end_at, end_token, end_text = NEVER, -1, ""
    scripted = len(script.ids) if script is not None else 0
    if enders:
        end_at = max(sampling.min_tokens, scripted) + 1 + int(rng.expovariate(1 / MEAN_NATURAL_TOKENS))
        end_token = enders[rng.randrange(len(enders))]
        if sampling.include_stop_str_in_output and end_token != eos_token:
            end_text = stop_text(end_token)
    if script is not None and script.final:
        if eos_token is not None:
            end_at, end_token, end_text = scripted + 1, eos_token, ""
        elif scripted:
            end_at, end_token, end_text = scripted, script.ids[-1], script.texts[-1]
    size = len(ids)
    stride = 1 + rng.randrange(size - 1) if size > 1 else 1
    while math.gcd(stride, size) != 1:  # visit the whole pool before repeating
        stride += 1
    return Choice(
        owner=owner,
        index=index,
        prompt_len=prompt_len,
        limit=min(sampling.max_tokens, max_model_len - prompt_len),
        end_at=end_at,
        end_token=end_token,
        end_text=end_text,
        ids=ids,
        texts=texts,
        start=rng.randrange(size),
        stride=stride,
        script=script,
        top=sampling.logprobs,
        rng=random.Random(f"{key}/{index}/logprobs") if sampling.logprobs is not None else None,
    )


class Batch(Generic[OwnerT]):
    """Sequences waiting and running; :meth:`schedule` and :meth:`advance` make one engine step."""

    def __init__(self, capacity: int, token_budget: int, kv_capacity: int) -> None:
        self.capacity = capacity
        self.token_budget = token_budget
        self.kv_capacity = kv_capacity
        self.running: list[Choice[OwnerT]] = []
        self.waiting: deque[Choice[OwnerT]] = deque()
        self.kv_held = 0
        """Tokens the running sequences held after the last schedule."""

    def __bool__(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, choices: Sequence[Choice[OwnerT]]) -> None:
        self.waiting.extend(choices)

    def drop(self, owner: OwnerT) -> None:
        """Remove an owner's choices, running or waiting (an abort): their slots are free at once."""
        self.running = [c for c in self.running if c.owner is not owner]
        if any(c.owner is owner for c in self.waiting):
            self.waiting = deque(c for c in self.waiting if c.owner is not owner)

    def schedule(self) -> StepWork:
        """Choose what the next step computes: decodes, prefill chunks, admissions."""
        self._preempt()
        budget = self.token_budget
        prefill = decoding = decode_kv = held = 0
        for c in self.running:
            if c.todo == 0:
                c.emits = True
                decoding += 1
                decode_kv += c.held
            held += c.held
        held += decoding  # the cache entries this step's decodes write
        budget -= decoding
        for c in self.running:  # sequences part-way through their prompt, oldest first
            if c.todo:
                chunk = min(c.todo, max(budget, 0))
                c.todo -= chunk
                c.emits = c.todo == 0 and chunk > 0
                budget -= chunk
                prefill += chunk
                held += chunk
        while self.waiting and len(self.running) < self.capacity and budget > 0:
            c = self.waiting[0]
            if self.running and held + c.todo > self.kv_capacity:
                break  # no room in the KV cache: wait for sequences to finish
            self.waiting.popleft()
            chunk = min(c.todo, budget)
            c.todo -= chunk
            c.emits = c.todo == 0
            budget -= chunk
            prefill += chunk
            held += chunk
            self.running.append(c)
        self.kv_held = held
        return StepWork(prefill_tokens=prefill, decoding=decoding, kv_tokens=decode_kv)

    def _preempt(self) -> None:
        """Send the newest sequences back to the queue while the next decodes would overflow the cache."""
        # The common case, known without a pass over the batch: since the last schedule each running
        # sequence grew by at most one token, and the next decodes add one each.
        if self.kv_held + 2 * len(self.running) <= self.kv_capacity:
            return
        need = sum(c.held + (c.todo == 0) for c in self.running)
        while len(self.running) > 1 and need > self.kv_capacity:
            victim = self.running.pop()
            need -= victim.held + (victim.todo == 0)
            victim.todo = victim.prompt_len + victim.generated
            victim.emits = False
            self.waiting.appendleft(victim)

    def advance(self) -> list[tuple[OwnerT, Delta]]:
        """Finish the scheduled step: one token for each sequence it computed one for. Finished
        sequences leave the batch."""
        out: list[tuple[OwnerT, Delta]] = []
        still: list[Choice[OwnerT]] = []
        for c in self.running:
            if not c.emits:
                still.append(c)
                continue
            c.emits = False
            c.generated = n = c.generated + 1
            if n == c.end_at:
                ending = _logprobs(c, c.end_token, c.end_text)
                out.append((c.owner, Delta(c.index, c.end_text, (c.end_token,), "stop", ending)))
                continue
            script = c.script
            if script is not None and n <= len(script.ids):
                token, text, alone = script.ids[n - 1], script.texts[n - 1], script.alone[n - 1]
            else:
                k = (c.start + n * c.stride) % len(c.ids)
                token, text = c.ids[k], c.texts[k]
                alone = text
            finish: FinishReason | None = "length" if n >= c.limit else None
            logprobs = _logprobs(c, token, alone) if c.top is not None else None
            out.append((c.owner, Delta(c.index, text, (token,), finish, logprobs)))
            if finish is None:
                still.append(c)
        self.running = still
        return out


def _logprobs(c: Choice[OwnerT], token: int, text: str) -> TokenLogprobs | None:
    if c.top is None or c.rng is None:
        return None
    sampled, top = token_logprobs(c.rng, token, text, c.top, c.ids, c.texts)
    return TokenLogprobs(sampled=[sampled], texts=[text], top=[top])
