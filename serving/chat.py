"""Chat requests as vLLM's own server renders and parses them, with vLLM's own functions.

The gateway renders the prompt (so it can refuse one too long for the model before anything is
enqueued, and a job carries exact token ids), so it applies the chat template as ``vllm serve``
does: vLLM's message parser (``developer`` turned ``system`` where the template lacks it, text
parts joined as vLLM joins them, tool calls' arguments handed over as objects), its template
keywords (``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs``,
``reasoning_effort``, ``documents``) and the request's tools.

Answers are parsed here too, per choice, with vLLM's tool-call and reasoning parsers as the
model's workers name them (``--tool-call-parser``, ``--reasoning-parser``): the parser's state lives
with the gateway that relays the stream, so it survives a worker failover, and the worker's CPU
stays the engine's. Two choices go beyond ``vllm serve`` as shipped:

- ``tool_choice`` ``required`` and named always take vLLM's JSON tool-call path: the engine's
  grammar holds the answer to a list of calls (or the named tool's arguments) that match the tools'
  schemas, on any model, with or without a tool parser. (vLLM's structural tags for Hermes-style
  parsers leave the arguments free unless a tool says ``strict``.)
- Without a tool parser, ``tool_choice: auto`` still renders the tools and answers in text.

This module and ``serving/responses.py`` (the Responses API's input, rendered as chat messages by
vLLM's own functions) are the gateway's only imports of vLLM (seconds at start-up).
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionNamedToolChoiceParam
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as EngineRequest
from vllm.exceptions import VLLMValidationError
from vllm.parser.abstract_parser import DelegatingParser, Parser
from vllm.parser.parser_manager import ParserManager
from vllm.renderers.chat_utils import make_tool_call_id, parse_chat_messages
from vllm.renderers.hf import _detect_content_format, safe_apply_chat_template
from vllm.sampling_params import SamplingParams, StructuredOutputsParams
from vllm.tool_parsers.abstract_tool_parser import ToolParser
from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

from api.chat.assembly import ChoiceParser as ChoiceParsing
from api.chat.assembly import ParsedDelta, ParsedMessage
from api.chat.protocol import ChatCompletionRequest
from api.errors import InvalidRequest
from shared.messages import StructuredOutput

_MODEL = types.SimpleNamespace(
    multimodal_config=None,
    enable_prompt_embeds=False,
    hf_config=types.SimpleNamespace(model_type=""),
    trust_remote_code=False,
    model="",
    tokenizer="",
    tokenizer_revision=None,
    code_revision=None,
    revision=None,
)
"""What vLLM's message parser and template functions read of a model's configuration, for a
text-only model: enough to render without loading the model's configuration here."""

_BACKEND_NOISE = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
"""The time and source line xgrammar puts before its messages."""
PARAMS = ("tool_choice", "tools", "response_format", "structured_outputs", "messages", "chat_template_kwargs")


@dataclass(frozen=True, slots=True)
class Answering:
    """How a model's answers are parsed, as its workers advertise it."""

    tool_call_parser: str | None = None
    auto_tool_choice: bool = False
    reasoning_parser: str | None = None


class _TextOnlyToolParser(ToolParser):
    """A tool parser for a model without one: required and named choices still work (vLLM's JSON
    path, below), and ``auto`` leaves the answer as text."""

    def extract_tool_calls(self, model_output: str, request: Any) -> Any:
        from vllm.entrypoints.generate.base.protocol import ExtractedToolCallInformation

        return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)

    def extract_tool_calls_streaming(self, *args: Any, **kwargs: Any) -> Any:
        from vllm.entrypoints.generate.base.protocol import DeltaMessage

        delta_text = kwargs.get("delta_text", args[2] if len(args) > 2 else "")
        return DeltaMessage(content=delta_text) if delta_text else None


def _json_forced(tool_parser: type[ToolParser]) -> type[ToolParser]:
    """``tool_parser`` with required and named choices on vLLM's JSON tool-call path (a grammar from
    the tools' schemas) instead of its structural tag."""
    return type(
        tool_parser.__name__,
        (tool_parser,),
        {"supports_required_and_named": True, "structural_tag_model": None},
    )


@cache
def parser_class(answering: Answering) -> type[Parser]:
    """The parser of a model's answers: vLLM's composition of its tool and reasoning parsers."""
    auto = answering.auto_tool_choice and answering.tool_call_parser is not None
    try:
        composed = ParserManager.get_parser(
            tool_parser_name=answering.tool_call_parser if auto else None,
            reasoning_parser_name=answering.reasoning_parser,
            enable_auto_tools=auto,
        )
    except (TypeError, KeyError) as exc:  # a parser name this vLLM does not know
        raise InvalidRequest(f"the model's answer parser is not available here: {exc}") from exc
    base: type[Parser] = composed or DelegatingParser
    tool = getattr(base, "tool_parser_cls", None) or _TextOnlyToolParser
    return type("AnswerParser", (base,), {"tool_parser_cls": _json_forced(tool)})


@cache
def _content_format(template: str | None) -> str:
    return str(_detect_content_format(template, default="string"))


@dataclass
class ChatPlan:
    """A chat request after rendering: its prompt, and what answering it needs."""

    text: str
    request: EngineRequest
    parser: type[Parser] | None
    structured_output: StructuredOutput | None
    skip_special_tokens: bool
    auto_tools: bool
    named_tool: bool
    steps: bool
    """Parse the answer a step at a time (a reasoning parser may need it)."""

    def reasoning_ended(self, prompt: Sequence[int]) -> bool | None:
        if self.structured_output is None or self.parser is None:
            return None
        return self.request.resolve_reasoning_ended(self._make(), list(prompt))

    def parsers(self, n: int, prompt: Sequence[int]) -> list[ChoiceParsing] | None:
        """One parser per choice, or None when the answer is plain text."""
        if self.parser is None:
            return None
        return [ChoiceParser(self._make(), self, list(prompt)) for _ in range(n)]

    def _make(self) -> Parser:
        assert self.parser is not None
        return _instance(self.parser, self._tokenizer, self.request)

    _tokenizer: Any = None


class ChoiceParser:
    """vLLM's parser over one choice's output: deltas as they stream, or the whole answer."""

    def __init__(self, parser: Parser, plan: ChatPlan, prompt: list[int]) -> None:
        self._parser = parser
        self._plan = plan
        self._prompt: list[int] | None = prompt
        self._whole_prompt = prompt
        self.named = plan.named_tool

    def delta(self, text: str, token_ids: Sequence[int], finished: bool) -> ParsedDelta | None:
        prompt, self._prompt = self._prompt, None  # the parser looks at the prompt once
        message = self._parser.parse_delta(
            text, list(token_ids), self._plan.request, prompt_token_ids=prompt, finished=finished
        )
        if message is None:
            return None
        calls = [_dropped_none(call.model_dump(exclude_none=True)) for call in message.tool_calls or ()]
        if not (message.content or message.reasoning or calls):
            return None
        return ParsedDelta(
            content=message.content or None, reasoning=message.reasoning or None, tool_calls=calls
        )

    def whole(self, text: str, token_ids: Sequence[int]) -> ParsedMessage:
        plan, parser = self._plan, self._parser
        if isinstance(parser, DelegatingParser) and self._prompt_ended_reasoning():
            # The prompt closed the reasoning (thinking turned off): the whole answer is content,
            # as the streamed answer has it (vLLM's own whole-answer parse does not look).
            reasoning: str | None = None
            calls, content = parser._extract_tool_calls(text, plan.request, enable_auto_tools=plan.auto_tools)
        else:
            reasoning, content, calls = parser.parse(
                text, plan.request, enable_auto_tools=plan.auto_tools, model_output_token_ids=token_ids
            )

        tool_calls = [
            {
                "id": call.id or make_tool_call_id(),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in calls or ()
        ]
        if not self._plan.request.include_reasoning:
            reasoning = None
        return ParsedMessage(content=content, reasoning=reasoning, tool_calls=tool_calls)

    def reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        return self._parser.count_reasoning_tokens(token_ids)

    def _prompt_ended_reasoning(self) -> bool:
        parser = self._parser
        return parser.reasoning_parser is not None and parser.is_reasoning_end(self._whole_prompt)


def _dropped_none(call: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in call.items() if v is not None}


class ChatRenderer:
    """Renders chat requests for one tokenizer, as vLLM's server would."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._format: Any = _content_format(getattr(tokenizer, "chat_template", None))

    def plan(self, body: ChatCompletionRequest, answering: Answering, max_logprobs: int) -> ChatPlan:
        """Render ``body``; a 400 for what vLLM's server refuses, or what the model cannot do."""
        for i, message in enumerate(body.messages):
            if (media := message.media()) is not None:
                part, kind = media
                raise InvalidRequest(
                    f"'{kind}' content parts need a model that takes them; this model takes text only",
                    param=f"messages.{i}.content.{part}",
                )
        if (k := body.wants_logprobs()) is not None and k > max_logprobs:
            raise InvalidRequest(
                f"top_logprobs may be at most {max_logprobs} for this model", param="top_logprobs"
            )
        request = _engine_request(body)
        wants_tools = bool(request.tools) and request.tool_choice != "none"
        parser = parser_class(answering) if wants_tools or answering.reasoning_parser else None
        if parser is not None:
            instance = _instance(parser, self._tok, request)
            request = _checked(lambda: instance.adjust_request(request))
        structured = _structured(request, body)
        plan = ChatPlan(
            text=self._render(request),
            request=request,
            parser=parser,
            structured_output=structured,
            skip_special_tokens=bool(request.skip_special_tokens),
            auto_tools=answering.auto_tool_choice and answering.tool_call_parser is not None,
            named_tool=isinstance(request.tool_choice, ChatCompletionNamedToolChoiceParam),
            steps=parser is not None and answering.reasoning_parser is not None,
        )
        plan._tokenizer = self._tok
        return plan

    def _render(self, request: EngineRequest) -> str:
        model: Any = _MODEL

        def render() -> str:
            conversation, _, _ = parse_chat_messages(request.messages, model, content_format=self._format)
            kwargs = request.build_chat_params(None, "auto").get_apply_chat_template_kwargs()
            kwargs.pop("chat_template", None)
            tools = [tool.model_dump() for tool in request.tools] if request.tools else None
            return str(
                safe_apply_chat_template(
                    model, self._tok, conversation, tools=tools, chat_template=None, tokenize=False, **kwargs
                )
            )

        result: str = _checked(render)
        return result


def _instance(parser: type[Parser], tokenizer: Any, request: EngineRequest) -> Parser:
    tools: Any = request.tools
    kwargs = request.chat_template_kwargs or {}
    return parser(tokenizer, tools, model_config=_MODEL, chat_template_kwargs=kwargs)


def _engine_request(body: ChatCompletionRequest) -> EngineRequest:
    try:
        return EngineRequest.model_validate(body.for_engine())
    except ValidationError as exc:
        errors = exc.errors()
        message = str(errors[0]["msg"] if errors else exc).removeprefix("Value error, ")
        raise InvalidRequest(message, param=_param_of(message, errors[0]["loc"] if errors else ())) from exc


def _checked(step: Any) -> Any:
    """Run a step of vLLM's; what it refuses is the request's fault: a 400."""
    try:
        return step()
    except (VLLMValidationError, ValueError, TypeError, KeyError) as exc:
        message = str(exc)
        raise InvalidRequest(
            message, param=getattr(exc, "parameter", None) or _param_of(message, ())
        ) from exc


def _param_of(message: str, loc: Sequence[Any]) -> str | None:
    if loc:
        return ".".join(str(p) for p in loc)
    return next((p for p in PARAMS if p in message), None)


def _structured(request: EngineRequest, body: ChatCompletionRequest) -> StructuredOutput | None:
    """The request's constraint on the text, in the wire's form, checked as the engine will check
    it (xgrammar), so a schema it cannot compile is a 400 before anything is enqueued."""
    params = request.extract_structured_outputs()
    if params is None:
        return None
    param = "structured_outputs"
    if request.tool_choice == "required" or isinstance(
        request.tool_choice, ChatCompletionNamedToolChoiceParam
    ):
        param = "tools"
    elif body.response_format is not None and body.response_format.type != "text":
        param = "response_format"
    try:
        # vLLM's check rewrites a choice into a grammar in place: give it a copy.
        validate_xgrammar_grammar(SamplingParams(structured_outputs=replace(params)))
    except (VLLMValidationError, ValueError, TypeError, RuntimeError) as exc:
        raise InvalidRequest(
            f"the engine cannot hold the answer to this {param}: {_BACKEND_NOISE.sub('', str(exc)).strip()}",
            param=param,
        ) from exc
    return _wire(params)


def _wire(params: StructuredOutputsParams) -> StructuredOutput:
    schema = params.json
    return StructuredOutput(
        json_schema=json.dumps(schema) if isinstance(schema, dict) else schema,
        regex=params.regex,
        choice=tuple(params.choice) if params.choice is not None else None,
        grammar=params.grammar,
        json_object=bool(params.json_object),
        structural_tag=params.structural_tag,
    )
