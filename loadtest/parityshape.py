"""Two servers' answers to one body, compared: pure functions, no I/O.

An answer's *shape* is every path of its JSON with the types found there (``choices[].delta.content``:
string, null), lists merged over their elements; a streamed answer's is taken over every chunk, and
again over its first chunk, the chunks that carry a ``finish_reason``, its usage chunk and its error
events, so a key missing from one kind of chunk is not hidden by another kind that has it. Shapes
are compared path by path; a path absent on one side is reported once, not with everything below it.

An answer's *output* is what the model said, as a client sees it once a stream is folded: content,
reasoning, tool calls, finish reason, token counts and the logprobs' tokens. Outputs are compared
for equality (greedy decoding on the same model should agree) and checked against what the body
asked the model to hold to (:class:`loadtest.paritycases.Holds`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from loadtest.paritycases import Holds

Shape = dict[str, frozenset[str]]
"""Path -> the JSON types seen there (``object``, ``array``, ``string``, ``integer``, ``number``,
``boolean``, ``null``)."""


@dataclass
class Answer:
    """One server's answer to one body, as received."""

    status: int
    body: Any = None
    """The JSON body of an answer that is not a stream (an error's too)."""
    events: list[Any] = field(default_factory=list)
    """The data of each event of a stream, parsed, in order; ``[DONE]`` not included."""
    done: bool = False
    """The stream ended with ``[DONE]``."""
    sent: dict[str, Any] | None = None
    """The body sent, when it is not the case's own (the second turn of an agent loop)."""

    @property
    def streamed(self) -> bool:
        return self.body is None and self.status == 200


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def shape(values: Iterable[Any]) -> Shape:
    """The merged shape of ``values`` (e.g. every chunk of a stream)."""
    seen: dict[str, set[str]] = {}

    def walk(value: Any, path: str) -> None:
        seen.setdefault(path, set()).add(json_type(value))
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else key)
        elif isinstance(value, list):
            for item in value:
                walk(item, f"{path}[]")

    for value in values:
        walk(value, "")
    return {path: frozenset(types) for path, types in seen.items()}


def _finishes(event: Any) -> bool:
    return any(c.get("finish_reason") for c in event.get("choices") or () if isinstance(c, dict))


def parts(answer: Answer) -> dict[str, Shape]:
    """The shapes an answer is compared by: its body, or its stream's chunks by kind."""
    if not answer.streamed:
        return {"body": shape([answer.body])}
    events = [e for e in answer.events if isinstance(e, dict)]
    errors = [e for e in events if "error" in e]
    chunks = [e for e in events if "error" not in e]
    kinds = {
        "any chunk": chunks,
        "first chunk": chunks[:1],
        "finish chunk": [e for e in chunks if _finishes(e)],
        "usage chunk": [e for e in chunks if not e.get("choices") and e.get("usage")],
        "error event": errors,
    }
    return {kind: shape(found) for kind, found in kinds.items() if found}


@dataclass(frozen=True)
class Difference:
    """One path whose types differ between the two answers (empty: the path is absent)."""

    part: str
    path: str
    vllm: tuple[str, ...]
    switchyard: tuple[str, ...]

    @property
    def kind(self) -> str:
        if not self.switchyard:
            return "only vLLM"
        if not self.vllm:
            return "only Switchyard"
        return "types differ"

    def __str__(self) -> str:
        def show(types: tuple[str, ...]) -> str:
            return "|".join(types) or "absent"

        return (
            f"{self.part}: {self.path or '(top)'}: vLLM {show(self.vllm)}, Switchyard {show(self.switchyard)}"
        )


def _parent(path: str) -> str | None:
    if not path:
        return None
    if path.endswith("[]"):
        return path[:-2]
    head, dot, _ = path.rpartition(".")
    return head if dot else ""


def compare_shapes(part: str, vllm: Shape, switchyard: Shape) -> list[Difference]:
    """The paths whose types differ; under a path absent on one side, nothing more is reported."""
    found = []
    for path in sorted(vllm.keys() | switchyard.keys()):
        ours, theirs = switchyard.get(path, frozenset()), vllm.get(path, frozenset())
        if ours == theirs:
            continue
        parent = _parent(path)
        if parent is not None and (parent not in vllm or parent not in switchyard):
            continue  # its parent is already reported as absent on one side
        found.append(Difference(part, path, tuple(sorted(theirs)), tuple(sorted(ours))))
    return found


def compare(vllm: Answer, switchyard: Answer) -> list[Difference]:
    """Every shape difference between two answers (both streamed, or neither, to be comparable)."""
    theirs, ours = parts(vllm), parts(switchyard)
    found = []
    for part in [*theirs, *(p for p in ours if p not in theirs)]:
        found += compare_shapes(part, theirs.get(part, {}), ours.get(part, {}))
    return found


# --- what the model said -----------------------------------------------------------------------


@dataclass
class Output:
    """An answer as a client reads it: the first choice's message (a stream folded), or the error."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[tuple[str, str]] = field(default_factory=list)
    """(name, arguments) of each call."""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprob_tokens: list[str] | None = None
    error: str | None = None
    others: list[str | None] = field(default_factory=list)
    """The content of the other choices (``n`` > 1), in order."""


def _error_text(doc: Any) -> str:
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    return str(error.get("message", error) if isinstance(error, dict) else error)


def output(answer: Answer) -> Output:
    if answer.status != 200:
        return Output(error=_error_text(answer.body))
    if answer.streamed:
        return _folded(answer.events)
    body = answer.body
    usage = body.get("usage") or {}
    choice, *others = body.get("choices") or [{}]
    message = choice.get("message") or {}
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]
    return Output(
        content=message.get("content"),
        reasoning=message.get("reasoning") or message.get("reasoning_content"),
        tool_calls=calls,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        logprob_tokens=_tokens((choice.get("logprobs") or {}).get("content")),
        others=[(other.get("message") or {}).get("content") for other in others],
    )


def _tokens(entries: Sequence[Any] | None) -> list[str] | None:
    return None if entries is None else [e["token"] for e in entries]


def _folded(events: Sequence[Any]) -> Output:
    """A stream's choices as a client assembles them: the first, with the others' content."""
    choices: dict[int, Output] = {}
    calls: dict[int, dict[int, list[str]]] = {}
    error: str | None = None
    usage: dict[str, Any] = {}
    for event in events:
        if not isinstance(event, dict):
            continue
        if "error" in event:
            error = _error_text(event)
            continue
        usage = event.get("usage") or usage
        for choice in event.get("choices") or ():
            index = choice.get("index", 0)
            _fold_delta(choices.setdefault(index, Output()), calls.setdefault(index, {}), choice)
    for index, out in choices.items():
        out.tool_calls = [(name, arguments) for name, arguments in calls[index].values()]
    first = choices.get(0, Output())
    first.others = [choices[i].content for i in sorted(choices) if i]
    first.error = error
    first.prompt_tokens, first.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return first


def _fold_delta(out: Output, calls: dict[int, list[str]], choice: dict[str, Any]) -> None:
    delta = choice.get("delta") or {}
    if (text := delta.get("content")) is not None:
        out.content = (out.content or "") + text
    if text := delta.get("reasoning") or delta.get("reasoning_content"):
        out.reasoning = (out.reasoning or "") + text
    for call in delta.get("tool_calls") or ():
        function = call.get("function") or {}
        entry = calls.setdefault(call.get("index", 0), ["", ""])
        entry[0] += function.get("name") or ""
        entry[1] += function.get("arguments") or ""
    if (logprobs := choice.get("logprobs")) and logprobs.get("content") is not None:
        out.logprob_tokens = (out.logprob_tokens or []) + _tokens(logprobs["content"])  # type: ignore[operator]
    if choice.get("finish_reason"):
        out.finish_reason = choice["finish_reason"]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def same_text(a: Output, b: Output) -> bool:
    """Whether two outputs say the same: content (an empty one as none), reasoning, the calls'
    names and arguments (as JSON values: ``{"a": 1}`` and ``{"a":1}`` are the same call), the
    logprobs' tokens and the other choices' content."""

    def said(out: Output) -> tuple[Any, ...]:
        calls = [(name, _arguments(args)) for name, args in out.tool_calls]
        return out.content or None, out.reasoning, calls, out.logprob_tokens, out.others

    return said(a) == said(b)


def held(holds: Holds | None, out: Output) -> str | None:
    """Why ``out`` breaks what the body asked it to hold to, "" if it holds, None if nothing was asked
    (or the answer is an error)."""
    if holds is None or out.error is not None:
        return None
    if holds.tools is not None:
        return _calls_break(holds.tools, out)
    text = out.content or ""
    if holds.regex is not None:
        return "" if re.fullmatch(holds.regex, text) else f"{text[:40]!r} does not match {holds.regex}"
    if holds.choice is not None:
        return "" if text in holds.choice else f"{text[:40]!r} is none of {list(holds.choice)}"
    try:
        value = json.loads(text)
    except ValueError:
        cut = " (cut at max_tokens)" if out.finish_reason == "length" else ""
        return f"content is not JSON{cut}: {text[:60]!r}"
    if holds.json_schema is not None:
        return _schema_breaks(value, holds.json_schema)
    return "" if isinstance(value, dict) else f"content is JSON but not an object: {text[:40]!r}"


def _calls_break(schemas: dict[str, dict[str, Any]], out: Output) -> str:
    if not out.tool_calls:
        return f"no tool call (content {(out.content or '')[:60]!r})"
    for name, arguments in out.tool_calls:
        if name not in schemas:
            return f"a call to {name!r}, which is not offered"
        try:
            value = json.loads(arguments)
        except ValueError:
            return f"{name} arguments are not JSON: {arguments[:60]!r}"
        if problem := _schema_breaks(value, schemas[name]):
            return f"{name} arguments {arguments[:60]!r}: {problem}"
    return ""


def _schema_breaks(value: Any, schema: dict[str, Any]) -> str:
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return exc.message[:120]
    return ""
