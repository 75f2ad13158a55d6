"""The simulated engine's answers in the shapes agent traffic asks for: structured output, tool calls,
reasoning, log probabilities.

A request's shape is planned once, when it arrives: the text each choice must say first is encoded
with the model's tokenizer into a :class:`Script` of tokens, which the batch then generates at the
engine's usual pace (:mod:`worker.sim_batch`). Nothing here looks at a real model's probabilities:
documents and calls are valid, their content is random words and numbers.

- ``structured_output``: a JSON schema gives a compact document valid against it
  (:mod:`worker.sim_schema` says what is honoured), ``json_object`` a small object of words, a
  ``choice`` one of its strings, a ``regex`` a string in :mod:`worker.sim_regex`'s subset, a
  ``structural_tag`` its tags and schemas (below). The document is followed by EOS ("stop"), unless
  ``max_tokens`` cuts it ("length"). A ``grammar``, a regex outside the subset and a structural
  tag's free text are not held: the answer is the usual words (the worker logs it once).
- Tool calls: ``required`` and named tool choices reach the engine as JSON schemas and are
  answered as above. For ``auto``, on a worker whose tool-call parser is ``hermes``, a prompt that
  lists tools Hermes-style (JSON objects between ``<tools>`` and ``</tools>``, as the demo model's
  and Qwen's templates write them) is answered, with probability ``sim_tool_calls``, by one call
  ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` to one of its tools, drawn,
  with arguments valid against its parameters. The engine sees token ids only and cannot know
  ``tool_choice``: a prompt rendered with tools under ``tool_choice: none`` may be answered with
  the markup too, as a model that ignored the instruction would.
- Reasoning: on a worker with a reasoning parser, every answer starts with ``<think>``,
  ``sim_reasoning_tokens`` words (at most half of ``max_tokens``) and ``</think>``, unless the
  prompt ends with ``</think>`` (a template's thinking-off marker) or the gateway says the reasoning
  is over; a prompt that ends with ``<think>`` (DeepSeek-R1's template) gets no second one.
- Log probabilities: each token's is drawn (at most 0), and the ``logprobs`` alternatives are other
  vocabulary tokens with lower probabilities, the sampled token first, as vLLM lists them.

A job resumed on another worker after a failover (its prompt then ends with the tokens already
sent) is planned afresh: a reasoning block or tool call it was in the middle of is started again.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from shared.messages import Sampling, StructuredOutput
from worker.sim_regex import UnsupportedRegex, sample
from worker.sim_schema import SchemaValues, compact, document, plain_words
from worker.sim_tokens import CONTEXT_TOKENS, Detokenizer, Tokenizer

log = logging.getLogger(__name__)

THINK_START, THINK_END = "<think>", "</think>"
TOOLS_START, TOOLS_END = "<tools>", "</tools>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
TAIL_TOKENS = 8
"""Prompt tokens decoded to see whether the template opened or closed the reasoning."""

Thinking = Literal["off", "open", "fresh"]
Words = tuple[Sequence[int], Sequence[str]]
"""Plain tokens a choice may use: their ids, and the text each adds."""


@dataclass(frozen=True, slots=True)
class Shaping:
    """What a worker says of its model's answers, as the simulated engine honours it."""

    reasoning: bool = False
    """The worker has a reasoning parser: answers think first."""
    reasoning_tokens: int = 64
    hermes_tools: bool = False
    """``tool_choice: auto`` is parsed with the ``hermes`` tool-call parser."""
    tool_calls: float = 1.0
    """Share of answers to prompts with tools (and ``auto``) that call one."""


@dataclass(frozen=True, slots=True)
class Script:
    """Tokens a choice generates first, and how it goes on."""

    ids: tuple[int, ...]
    texts: tuple[str, ...]
    """What each token adds to the text."""
    alone: tuple[str, ...]
    """Each token decoded on its own (what its log probability is shown with)."""
    final: bool
    """The choice ends after it (EOS); otherwise it goes on with words."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: Any


class Shaper:
    """Plans requests' scripts for one tokenizer and one worker's :class:`Shaping`."""

    def __init__(self, tokenizer: Tokenizer, shaping: Shaping, texts: Sequence[str]) -> None:
        """``texts``: the texts of the plain tokens (words for strings are made of them)."""
        self._tok = tokenizer
        self._words = plain_words(texts)
        self._detokenizer = Detokenizer(tokenizer)
        self.shaping = shaping
        self._start = tokenizer.encode(THINK_START, add_special_tokens=False)
        self._end = tokenizer.encode(THINK_END, add_special_tokens=False)
        self._call_token = tokenizer.get_added_vocab().get(CALL_START)
        self._warned: set[str] = set()

    def scripts(
        self,
        key: str,
        prompt: Sequence[int],
        sampling: Sampling,
        reasoning_ended: bool | None,
        words: Words,
    ) -> list[Script | None]:
        """Each choice's script (None: the choice is words only, as without a shape). ``words``:
        the ids and texts of the plain tokens it may use."""
        so = sampling.structured_output
        thinking = self.thinking(prompt, reasoning_ended) if self.shaping.reasoning else "off"
        tools = self.tools(prompt) if so is None and self._may_call() else ()
        schema = _schema(so)
        if so is None and not tools and thinking == "off":
            return [None] * sampling.n
        out: list[Script | None] = []
        for index in range(sampling.n):
            rng = random.Random(f"{key}/{index}/shape")
            head = self._reasoning(thinking, sampling.max_tokens, rng, words)
            body = self._body(so, schema, tools, rng)
            if not head and body is None:
                out.append(None)
                continue
            ids = [*head, *(self._tok.encode(body, add_special_tokens=False) if body is not None else ())]
            context = list(prompt[-CONTEXT_TOKENS:])
            texts, alone = self._detokenizer.texts(ids, context, sampling.skip_special_tokens)
            out.append(Script(tuple(ids), tuple(texts), tuple(alone), final=body is not None))
        return out

    def thinking(self, prompt: Sequence[int], reasoning_ended: bool | None) -> Thinking:
        """Whether an answer to ``prompt`` thinks first ("fresh"), goes on with reasoning the prompt
        opened ("open"), or answers at once ("off")."""
        if reasoning_ended:
            return "off"
        tail = self._tok.decode(list(prompt[-TAIL_TOKENS:]), skip_special_tokens=False).rstrip()
        if tail.endswith(THINK_START):
            return "open"
        if tail.endswith(THINK_END) and reasoning_ended is None:
            return "off"
        return "fresh"

    def tools(self, prompt: Sequence[int]) -> tuple[Tool, ...]:
        """The tools a prompt lists Hermes-style: JSON objects a line between ``<tools>`` and
        ``</tools>`` (the first such list that holds any)."""
        if self._call_token is not None and self._call_token not in prompt:
            # Hermes-style templates show the call's markup with the tools: where the vocabulary
            # has a token for it, a prompt without that token lists none, and is not decoded.
            return ()
        text = self._tok.decode(list(prompt), skip_special_tokens=False)
        at = text.find(TOOLS_START)
        while at >= 0:
            end = text.find(TOOLS_END, at)
            if end < 0:
                break
            found = tuple(_tools(text[at + len(TOOLS_START) : end]))
            if found:
                return found
            at = text.find(TOOLS_START, at + 1)
        return ()

    def _may_call(self) -> bool:
        return self.shaping.hermes_tools and self.shaping.tool_calls > 0

    def _reasoning(self, thinking: Thinking, max_tokens: int, rng: random.Random, words: Words) -> list[int]:
        if thinking == "off":
            return []
        count = min(self.shaping.reasoning_tokens, max_tokens // 2)
        if thinking == "fresh" and count == 0:
            return []
        ids = words[0]
        start, stride = rng.randrange(len(ids)), 1 + rng.randrange(max(1, len(ids) - 1))
        thought = [ids[(start + k * stride) % len(ids)] for k in range(count)]
        return [*(self._start if thinking == "fresh" else ()), *thought, *self._end]

    def _body(
        self,
        so: StructuredOutput | None,
        schema: Any,
        tools: tuple[Tool, ...],
        rng: random.Random,
    ) -> str | None:
        """The text a choice must say after any reasoning, or None for words."""
        if so is not None:
            return self._structured(so, schema, rng, self._words)
        if tools and rng.random() < self.shaping.tool_calls:
            tool = rng.choice(tools)
            arguments = document(tool.parameters, rng, self._words)
            call = {"name": tool.name, "arguments": arguments}
            return f"{CALL_START}\n{json.dumps(call, ensure_ascii=False)}\n{CALL_END}"
        return None

    def _structured(
        self, so: StructuredOutput, schema: Any, rng: random.Random, words: Sequence[str]
    ) -> str | None:
        if so.json_schema is not None:
            return compact(document(schema, rng, words))
        if so.json_object:
            values = SchemaValues({}, rng, words)
            keys = [f"{values.words((1, 1))}_{i}" for i in range(rng.randint(1, 4))]
            return compact({key: values.words((1, 6)) for key in keys})
        if so.choice is not None:
            return rng.choice(so.choice) if so.choice else ""
        if so.regex is not None:
            try:
                return sample(so.regex, rng)
            except UnsupportedRegex as exc:
                self._warn("regex", f"a regex outside the simulated engine's subset ({exc}): words")
                return None
        if so.structural_tag is not None:
            text = structural_text(so.structural_tag, rng, words)
            if text is None:
                self._warn("structural_tag", "a structural tag the simulated engine cannot follow: words")
            return text
        self._warn("grammar", "grammars are not followed by the simulated engine: answered with words")
        return None

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message)


def _schema(so: StructuredOutput | None) -> Any:
    if so is None or so.json_schema is None:
        return None
    try:
        return json.loads(so.json_schema)
    except ValueError:
        return {"type": "object"}


def _tools(block: str) -> list[Tool]:
    tools = []
    for line in block.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("function"), dict):
            entry = entry["function"]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            parameters = entry.get("parameters") or {"type": "object", "properties": {}}
            tools.append(Tool(entry["name"], parameters))
    return tools


def structural_text(tag: str, rng: random.Random, words: Sequence[str]) -> str | None:
    """Text for a structural tag: vLLM's older form (``structures`` of begin, schema, end: one of
    them) or xgrammar's ``format`` tree (constant strings, JSON schemas, regexes, sequences,
    alternatives, tags, triggered tags and repetitions once each). None when it holds nothing
    this can follow."""
    try:
        spec = json.loads(tag)
    except ValueError:
        return None
    if not isinstance(spec, dict):
        return None
    if isinstance(structures := spec.get("structures"), list) and structures:
        one = rng.choice(structures)
        if not isinstance(one, dict):
            return None
        inner = compact(document(one.get("schema", {}), rng, words))
        return f"{one.get('begin', '')}{inner}{one.get('end', '')}"
    if isinstance(spec.get("format"), dict):
        return _format(spec["format"], rng, words)
    return None


def _format(node: Any, rng: random.Random, words: Sequence[str]) -> str | None:
    if not isinstance(node, dict):
        return None
    kind = node.get("type")
    if kind == "const_string":
        return str(node.get("value", ""))
    if kind == "json_schema" and node.get("style", "json") == "json":
        return compact(document(node.get("json_schema", {}), rng, words))
    if kind == "regex":
        try:
            return sample(str(node.get("pattern", "")), rng)
        except UnsupportedRegex:
            return None
    if kind == "any_text":
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
    if kind == "sequence":
        parts = [_format(element, rng, words) for element in node.get("elements", ())]
        return None if None in parts else "".join(p for p in parts if p is not None)
    if kind == "or" and node.get("elements"):
        return _format(rng.choice(node["elements"]), rng, words)
    if kind in ("optional", "plus", "star", "repeat"):
        return _format(node.get("content"), rng, words)
    if kind == "tag" and isinstance(node.get("begin"), str):
        end = node.get("end")
        end = end[0] if isinstance(end, list) and end else end
        content = _format(node.get("content"), rng, words)
        return None if content is None or not isinstance(end, str) else node["begin"] + content + end
    if kind in ("triggered_tags", "tags_with_separator") and node.get("tags"):
        return _format({"type": "tag", **rng.choice(node["tags"])}, rng, words)
    return None


def token_logprobs(
    rng: random.Random, token: int, text: str, k: int, ids: Sequence[int], texts: Sequence[str]
) -> tuple[float, tuple[tuple[int, float, str], ...]]:
    """A sampled token's log probability and the (id, log probability, text) of it and ``k``
    alternatives from ``ids``: the sampled one first, then the others, less and less likely."""
    sampled = -rng.expovariate(3.0)
    share = (1.0 - math.exp(sampled)) / 2
    top = [(token, sampled, text)]
    at = rng.randrange(len(ids))
    for step in range(len(ids)):
        if len(top) > k:
            break
        i = (at + step) % len(ids)
        if ids[i] != token:
            top.append((ids[i], math.log(share) if share > 0 else -9999.0, texts[i]))
            share /= 2
    return sampled, tuple(top)
