"""A Responses request as the chat request it runs as, rendered as ``vllm serve`` renders it.

vLLM's own functions turn the input into chat messages (``construct_input_messages``: the
instructions as a system message, a ``function_call`` item as an assistant message's tool call,
several calls in a row merged into one message, a ``function_call_output`` as a tool message, a
``reasoning`` item as the assistant's reasoning), decide whether the last message is continued
(an ``in_progress`` or ``incomplete`` assistant message), turn the tools into chat tools and
``text.format`` into the constraint the engine holds the answer to. The result is a chat
completion request, which then takes the chat path as any other: rendered with the model's
template, tokenized, checked, admitted, enqueued and parsed (``serving/chat.py``).

A turn that continues a stored response (``previous_response_id``) continues from what was
stored with it: its conversation (the messages it was rendered from, its instructions excepted,
as vLLM drops them) and its output items, function calls included, then the new input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as EngineResponses
from vllm.entrypoints.openai.responses.utils import (
    construct_input_messages,
    construct_tool_dicts,
    should_continue_final_message,
)
from vllm.exceptions import VLLMValidationError

from api.chat.protocol import ChatCompletionRequest
from api.errors import InvalidRequest
from api.responses.protocol import FunctionChoice, ResponsesRequest

RENAMED = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "response_format": "text.format",
}
"""Chat request fields by the name the Responses request gives them, for the 400s they cause."""
_MESSAGE_KEYS = ("role", "content", "name", "tool_call_id", "tool_calls", "reasoning")
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")
_TEXT_PARTS = ("text", "input_text", "output_text")


@dataclass(frozen=True, slots=True)
class Previous:
    """What a stored response hands the turn that continues it."""

    conversation: list[dict[str, Any]]
    output: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Turn:
    chat: ChatCompletionRequest
    conversation: list[dict[str, Any]]
    """The messages this turn was rendered from: what is stored for the next one."""


def turn(body: ResponsesRequest, previous: Previous | None) -> Turn:
    """The chat request ``body`` runs as (a 400 naming the Responses field for what cannot be)."""
    if (refused := body.refused()) is not None:
        raise InvalidRequest(refused[1], param=refused[0])
    engine = _engine_request(body, previous)
    messages = [
        _chat_message(m)
        for m in _checked(
            lambda: construct_input_messages(
                request_instructions=body.instructions,
                request_input=engine.input,
                prev_msg=list[Any](previous.conversation) if previous else None,
            )
        )
    ]
    continued = should_continue_final_message(engine.input)
    tools = _checked(lambda: construct_tool_dicts(engine.tools, engine.tool_choice))
    structured = _checked(engine.extract_structured_outputs)
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "tools": [_chat_tool(t) for t in tools] if tools else None,
        "tool_choice": _chat_choice(body),
        "parallel_tool_calls": body.parallel_tool_calls,
        "max_completion_tokens": body.max_output_tokens,
        "reasoning_effort": body.reasoning.effort if body.reasoning else None,
        "add_generation_prompt": not continued,
        "continue_final_message": continued,
        "stream": bool(body.stream),
        **_sampling(body),
    }
    if (top := body.wants_logprobs()) is not None:
        chat |= {"logprobs": True, "top_logprobs": top}
    if structured is not None:
        chat["structured_outputs"] = _structured(body, structured)
    try:
        request = ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise renamed(
            InvalidRequest(
                str(error["msg"]).removeprefix("Value error, "),
                param=".".join(str(p) for p in error["loc"] if not str(p)[:1].isupper()) or None,
            ),
            body,
        ) from exc
    return Turn(request, messages)


def renamed(error: InvalidRequest, body: ResponsesRequest) -> InvalidRequest:
    """``error`` (about the chat request) naming the Responses request's field instead."""
    if error.param is None:
        return error
    head, _, rest = error.param.partition(".")
    if head == "structured_outputs" and body.text is not None and body.text.format is not None:
        head = "text.format"
    elif head == "messages":
        head, rest = "input", ""  # the messages are the input and instructions, rendered
    elif head == "tools" and rest:
        rest = rest.replace(".function.", ".")
    error.param = RENAMED.get(head, head) + (f".{rest}" if rest else "")
    return error


def _engine_request(body: ResponsesRequest, previous: Previous | None) -> EngineResponses:
    """vLLM's own request, for its input conversion: the items as it reads them (a function call
    as the SDK's typed item, ...), after the stored response's output when there is one."""
    given: Any = body.input
    if not isinstance(given, str):
        given = [item.model_dump(exclude_none=True, by_alias=True) for item in given]
    if previous is not None and previous.output:
        new = [{"role": "user", "content": given}] if isinstance(given, str) else given
        given = [*previous.output, *new]
    data: dict[str, Any] = {
        "input": given,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
        "tool_choice": _dumped(body.tool_choice) or "auto",
    }
    if body.text is not None:
        data["text"] = body.text.model_dump(exclude_none=True, by_alias=True)
    if body.structured_outputs is not None:
        data["structured_outputs"] = body.structured_outputs.model_dump(exclude_none=True, by_alias=True)
    try:
        return EngineResponses.model_validate(data)
    except ValidationError as exc:
        # vLLM's models of every item type, tried in turn: which one failed says little.
        at = (
            next((p for p in exc.errors()[0]["loc"][1:3] if isinstance(p, int)), None)
            if exc.errors()
            else None
        )
        where = "input" if at is None else f"input.{at}"
        raise InvalidRequest(f"{where} is not an item vLLM's Responses API reads", param=where) from exc
    except (VLLMValidationError, ValueError) as exc:
        raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None) or "input") from exc


def _checked(step: Any) -> Any:
    """Run a conversion of vLLM's; what it refuses, or stumbles on (an assistant message without
    text parts, say), is the input's fault: a 400."""
    try:
        return step()
    except (VLLMValidationError, ValueError, TypeError, KeyError) as exc:
        raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None) or "input") from exc
    except (IndexError, AttributeError) as exc:
        raise InvalidRequest(f"an input item lacks what it needs ({exc})", param="input") from exc


def _dumped(value: Any) -> Any:
    return value.model_dump() if isinstance(value, FunctionChoice) else value


def _chat_message(message: Any) -> dict[str, Any]:
    """A message of vLLM's conversion as a chat request carries it: the item's own fields (``id``,
    ``status``, ``type``) left out, text parts as chat's text parts."""
    out = {k: message[k] for k in _MESSAGE_KEYS if message.get(k) is not None}
    if isinstance(out.get("content"), list):
        out["content"] = [_chat_part(part) for part in out["content"]]
    if out.get("tool_calls") is not None:
        out["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": dict(c["function"])} for c in out["tool_calls"]
        ]
    if out["role"] == "assistant" and "content" not in out and "tool_calls" not in out:
        out["content"] = ""  # reasoning alone
    return out


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    if part.get("type") == "refusal":
        return {"type": "refusal", "refusal": part.get("refusal", "")}
    if part.get("type") in _TEXT_PARTS:
        return {"type": "text", "text": part.get("text", "")}
    return dict(part)  # anything else is refused by the chat request, naming the message


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {
        "type": "function",
        "function": {k: function[k] for k in _FUNCTION_KEYS if function.get(k) is not None},
    }


def _chat_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if isinstance(choice, FunctionChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice if body.tools else None


def _structured(body: ResponsesRequest, params: Any) -> dict[str, Any]:
    """The constraint vLLM read from ``text.format`` (its ``StructuredOutputsParams``), or vLLM's
    own ``structured_outputs`` as given, in the chat request's form."""
    if body.structured_outputs is not None:  # vLLM refused it together with text.format
        return body.structured_outputs.model_dump(exclude_none=True, by_alias=True)
    if params.json is not None:
        return {"json": params.json}
    return {"json_object": True}


def _sampling(body: ResponsesRequest) -> dict[str, Any]:
    """The sampling fields a Responses request shares with a chat request, by the same name."""
    names: Sequence[str] = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "logit_bias",
        "user",
        "include_reasoning",
        "chat_template_kwargs",
    )
    return {name: getattr(body, name) for name in names}
