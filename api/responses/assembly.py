"""Responses API answers, pure: the response object, and the typed events of a streamed one.

A Responses request runs as a chat job, so its answer is first assembled as a chat answer is (the
chat family's assemblers: vLLM's parsers per choice, log probabilities, grammar-held JSON); this
module reads that chat answer, whole or chunk by chunk, as Responses output items: a ``reasoning``
item, a ``message`` with one ``output_text`` part, and a ``function_call`` item per call. Streamed,
each item opens (``response.output_item.added``), grows (text, reasoning or argument deltas) and
closes (its ``.done`` events) before the next one opens; every event carries ``sequence_number``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.assembly import StreamAssembler
from api.chat.assembly import ChoiceParser
from api.responses.protocol import FunctionChoice, ResponsesRequest
from shared.messages import Final, Tokens, Usage

OBJECT = "response"
NewId = Callable[[str], str]


def new_id(prefix: str) -> str:
    """An item id (``msg_…``, ``fc_…``, ``rs_…``)."""
    return f"{prefix}_{secrets.token_hex(16)}"


def skeleton(body: ResponsesRequest, response_id: str, created: int, model: str) -> dict[str, Any]:
    """The response object before any output: what the request asked for, echoed as OpenAI does."""
    text = body.text.format if body.text is not None and body.text.format is not None else None
    reasoning = body.reasoning
    choice = body.tool_choice
    return {
        "id": response_id,
        "object": OBJECT,
        "created_at": created,
        "completed_at": None,
        "status": "in_progress",
        "background": bool(body.background),
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "metadata": body.metadata,
        "model": model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "prompt_cache_key": body.prompt_cache_key,
        "reasoning": {
            "effort": reasoning.effort if reasoning else None,
            "summary": reasoning.summary if reasoning else None,
        },
        "safety_identifier": body.safety_identifier,
        "service_tier": "default",
        "store": body.storing,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {
            "format": text.model_dump(by_alias=True) if text is not None else {"type": "text"},
            "verbosity": body.text.verbosity if body.text is not None else None,
        },
        "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto",
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict,
            }
            for t in body.tools or ()
        ],
        "top_logprobs": body.top_logprobs,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": body.truncation or "disabled",
        "usage": None,
        "user": body.user,
    }


def usage(used: Usage, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": used.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": used.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": used.total_tokens,
    }


def ending(finish: str | None) -> dict[str, Any]:
    """The fields a chat finish reason sets on the response: its status, and why it is
    incomplete or failed."""
    if finish == "length":
        return {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    if finish == "abort":
        error = {"code": "server_error", "message": "the engine stopped the answer before it finished"}
        return {"status": "failed", "error": error}
    return {"status": "completed"}


def failed(response: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    """The response ended by an error (a worker lost, a timeout, the gateway stopping)."""
    return {**response, "status": "failed", "error": {"code": code, "message": message}, "output": []}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text or status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _message_item(item_id: str, part: dict[str, Any] | None, status: str) -> dict[str, Any]:
    content = [part] if part is not None else []
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def completed(
    response: dict[str, Any], chat: dict[str, Any], logprobs: bool, make_id: NewId = new_id
) -> dict[str, Any]:
    """The whole response from a chat completion answer (``stream: false``)."""
    choice = chat["choices"][0]
    message = choice["message"]
    output = []
    if message.get("reasoning"):
        output.append(_reasoning_item(make_id("rs"), message["reasoning"], "completed"))
    if message.get("content"):
        entries = (choice.get("logprobs") or {}).get("content") or []
        part = _text_part(message["content"], entries if logprobs else None)
        output.append(_message_item(make_id("msg"), part, "completed"))
    for call in message.get("tool_calls") or ():
        function = call["function"]
        output.append(
            _call_item(make_id("fc"), call["id"], function["name"], function["arguments"], "completed")
        )
    details = chat["usage"].get("completion_tokens_details") or {}
    used = Usage(
        prompt_tokens=chat["usage"]["prompt_tokens"], completion_tokens=chat["usage"]["completion_tokens"]
    )
    return {
        **response,
        **ending(choice["finish_reason"]),
        "completed_at": int(time.time()),
        "output": output,
        "usage": usage(used, details.get("reasoning_tokens", 0)),
    }


ENDS = {"completed": "response.completed", "incomplete": "response.incomplete"}
"""The last event of a stream by the response's status (any other: ``response.failed``)."""


def replayed(ended: dict[str, Any]) -> list[bytes]:
    """Every event of a response that has ended, from the response alone (one stored, asked for
    again as a stream): each output item opens, gets its whole text or arguments in one delta and
    closes, as a live stream's items do, and the last event holds the response as it ended."""
    opening = {
        **ended,
        **dict.fromkeys(("completed_at", "error", "incomplete_details", "usage")),
        "status": "in_progress",
        "output": [],
    }
    out = [_plain("response.created", response=opening), _plain("response.in_progress", response=opening)]
    for index, item in enumerate(ended["output"]):
        out += _replayed_item(index, item)
    out.append(_plain(ENDS.get(ended["status"], "response.failed"), response=ended))
    return [encode({"type": e.pop("type"), "sequence_number": n, **e}) for n, e in enumerate(out)]


def _plain(kind: str, **fields: Any) -> dict[str, Any]:
    """An event before it is numbered."""
    return {"type": kind, **fields}


def _replayed_item(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    where = {"item_id": item["id"], "output_index": index}
    if item["type"] == "function_call":
        opened = {**item, "arguments": "", "status": "in_progress"}
        arguments = item["arguments"]
        grown = [
            _plain("response.function_call_arguments.delta", **where, delta=arguments),
            _plain("response.function_call_arguments.done", **where, name=item["name"], arguments=arguments),
        ]
    elif item["type"] == "reasoning":
        opened = _reasoning_item(item["id"], "", "in_progress")
        part = item["content"][0] if item["content"] else {"type": "reasoning_text", "text": ""}
        grown = [
            _plain("response.content_part.added", **where, content_index=0, part={**part, "text": ""}),
            _plain("response.reasoning_text.delta", **where, content_index=0, delta=part["text"]),
            _plain("response.reasoning_text.done", **where, content_index=0, text=part["text"]),
            _plain("response.content_part.done", **where, content_index=0, part=part),
        ]
    else:
        opened = _message_item(item["id"], None, "in_progress")
        part = item["content"][0]
        text, logprobs = part["text"], part["logprobs"]
        empty = _text_part("", [] if logprobs is not None else None)
        grown = [
            _plain("response.content_part.added", **where, content_index=0, part=empty),
            _plain(
                "response.output_text.delta", **where, content_index=0, delta=text, logprobs=logprobs or []
            ),
            _plain("response.output_text.done", **where, content_index=0, text=text, logprobs=logprobs or []),
            _plain("response.content_part.done", **where, content_index=0, part=part),
        ]
    return [
        _plain("response.output_item.added", output_index=index, item=opened),
        *grown,
        _plain("response.output_item.done", output_index=index, item=item),
    ]


def encode(event: dict[str, Any]) -> bytes:
    """One typed event as Server-Sent Events frame it: its type as the event name, then its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


@dataclass
class ResponseEvents:
    """The events of one streamed response, from the chat answer's chunks (``chat``: the chat
    family's stream assembler for the same job, ``parser``: its answer parser, if any)."""

    response: dict[str, Any]
    chat: StreamAssembler
    parser: ChoiceParser | None = None
    logprobs: bool = False
    make_id: NewId = new_id
    result: dict[str, Any] | None = None
    """The whole response, once the final reply came."""
    _seq: int = 0
    _output: list[dict[str, Any]] = field(default_factory=list)
    _open: dict[str, Any] | None = None
    _calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    _ids: list[int] = field(default_factory=list)
    _finish: str | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start(self) -> list[bytes]:
        """``response.created`` and ``response.in_progress``: sent before the job starts."""
        return [
            encode(self._event("response.created", response=self.response)),
            encode(self._event("response.in_progress", response=self.response)),
        ]

    def events(self, reply: Tokens | Final) -> list[bytes]:
        if isinstance(reply, Tokens):
            self._ids.extend(reply.token_ids)
            chunks = self.chat.tokens(reply)
        else:
            chunks = self.chat.final(reply)
        out = [e for chunk in chunks for e in self._chunk(chunk)]
        if isinstance(reply, Final):
            out += self._close()
            out.append(self._end(reply))
        return [encode(e) for e in out]

    def error(self, envelope: dict[str, Any]) -> bytes:
        """The stream's last event when it fails: OpenAI's ``error`` event, with the error envelope
        too, so that the SDK raises it as it raises a chat stream's error."""
        detail = envelope["error"]
        return encode(
            self._event(
                "error",
                code=detail["code"],
                message=detail["message"],
                param=detail["param"],
                error=detail,
            )
        )

    def _chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if not chunk["choices"]:
            return []
        choice = chunk["choices"][0]
        delta = choice["delta"]
        out = []
        if delta.get("reasoning"):
            out += self._reasoning(delta["reasoning"])
        if delta.get("content"):
            entries = (choice.get("logprobs") or {}).get("content") or []
            out += self._text(delta["content"], entries)
        for fragment in delta.get("tool_calls") or ():
            out += self._call(fragment)
        if choice["finish_reason"] is not None:
            self._finish = choice["finish_reason"]
        return out

    def _opening(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._close()
        self._open = item
        self._output.append(item)
        added = {k: v for k, v in item.items() if not k.startswith("_")}
        return [
            *out,
            self._event("response.output_item.added", output_index=len(self._output) - 1, item=added),
        ]

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._output) - 1}

    def _reasoning(self, text: str) -> list[dict[str, Any]]:
        out = []
        if self._open is None or self._open["type"] != "reasoning":
            out += self._opening({**_reasoning_item(self.make_id("rs"), "", "in_progress"), "_text": ""})
            part = {"type": "reasoning_text", "text": ""}
            out.append(
                self._event("response.content_part.added", **self._where(), content_index=0, part=part)
            )
        assert self._open is not None
        self._open["_text"] += text
        out.append(self._event("response.reasoning_text.delta", **self._where(), content_index=0, delta=text))
        return out

    def _text(self, text: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        if self._open is None or self._open["type"] != "message":
            item = {**_message_item(self.make_id("msg"), None, "in_progress"), "_text": "", "_logprobs": []}
            out += self._opening(item)
            part = _text_part("", [] if self.logprobs else None)
            out.append(
                self._event("response.content_part.added", **self._where(), content_index=0, part=part)
            )
        assert self._open is not None
        self._open["_text"] += text
        entries = entries if self.logprobs else []
        self._open["_logprobs"] += entries
        out.append(
            self._event(
                "response.output_text.delta", **self._where(), content_index=0, delta=text, logprobs=entries
            )
        )
        return out

    def _call(self, fragment: dict[str, Any]) -> list[dict[str, Any]]:
        function = fragment.get("function") or {}
        out = []
        call = self._calls.get(fragment["index"])
        if call is None:
            call_id = fragment.get("id") or self.make_id("call")
            call = _call_item(self.make_id("fc"), call_id, function.get("name") or "", "", "in_progress")
            self._calls[fragment["index"]] = call
            out += self._opening(call)
        elif function.get("name") and not call["name"]:
            call["name"] = function["name"]
        if arguments := function.get("arguments"):
            call["arguments"] += arguments
            index = self._output.index(call)
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=call["id"],
                    output_index=index,
                    delta=arguments,
                )
            )
        return out

    def _close(self) -> list[dict[str, Any]]:
        """The events that close the open item, which takes its final form in the output."""
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self._output.index(item)}
        index = where["output_index"]
        out = []
        if item["type"] == "reasoning":
            text = item["_text"]
            final = _reasoning_item(item["id"], text, "completed")
            part = final["content"][0]
            out.append(self._event("response.reasoning_text.done", **where, content_index=0, text=text))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=part))
        elif item["type"] == "message":
            logprobs = item["_logprobs"] if self.logprobs else None
            part = _text_part(item["_text"], logprobs)
            final = _message_item(item["id"], part, "completed")
            out.append(
                self._event(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=item["_text"],
                    logprobs=logprobs or [],
                )
            )
            out.append(self._event("response.content_part.done", **where, content_index=0, part=part))
        else:
            final = {**item, "status": "completed"}
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        self._output[index] = final
        for key, call in self._calls.items():
            if call is item:
                self._calls[key] = final
        out.append(self._event("response.output_item.done", output_index=index, item=final))
        return out

    def _end(self, reply: Final) -> dict[str, Any]:
        reasoning = self.parser.reasoning_tokens(self._ids) if self.parser is not None else 0
        ends = ending(self._finish or (reply.finish_reasons[0] if reply.finish_reasons else None))
        self.result = {
            **self.response,
            **ends,
            "completed_at": int(time.time()),
            "output": list(self._output),
            "usage": usage(reply.usage, reasoning),
        }
        return self._event(ENDS.get(ends["status"], "response.failed"), response=self.result)
