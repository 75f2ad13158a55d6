"""The demo model's tokenizer and chat template, through vLLM's own renderer and parsers.

Tools, tool calls, tool results and thinking render in the Hermes/Qwen style; plain chats render
byte for byte as the first template did; vLLM's hermes tool parser and its qwen3 and deepseek_r1
reasoning parsers work on the demo vocabulary. No engine is started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig, AutoTokenizer

from worker.demo_model import CHAT_TEMPLATE, MARKUP_TOKENS, TOOL_ROLE_TOKEN

FIRST_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""The template of the model's first recipe, which every plain chat must still render as."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOL_ROUND = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
]
TOOL_LIST = (
    "# Tools\n\nThese functions can be called; their signatures follow, one JSON object a line, between"
    " <tools> and </tools>:\n<tools>\n"
    + json.dumps(WEATHER)
    + "\n</tools>\n\nTo call a function, answer with a JSON object that gives its name and its arguments,"
    " between <tool_call> and </tool_call>:\n<tool_call>\n"
    '{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>'
)
REPLY = 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok(demo_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(demo_model_dir))


@pytest.fixture(scope="module")
def vllm_tok(demo_model_dir: Path) -> Any:
    """The tokenizer as vLLM's server loads it (what its parsers are given)."""
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(demo_model_dir))


@pytest.fixture(scope="module")
def render(demo_model_dir: Path, vllm_tok: Any) -> Any:
    """Render a request body as vLLM's chat endpoint does, with vLLM's own functions."""
    from vllm.config import ModelConfig
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.chat_utils import parse_chat_messages
    from vllm.renderers.hf import _detect_content_format, safe_apply_chat_template

    model_config = ModelConfig(model=str(demo_model_dir), max_model_len=1024)
    content_format = _detect_content_format(vllm_tok.chat_template, default="string")
    assert content_format == "openai"  # the template joins text parts itself, as before

    def run(body: dict[str, Any]) -> str:
        request = ChatCompletionRequest.model_validate({"model": "m", **body})
        kwargs = request.build_chat_params(None, "auto").get_apply_chat_template_kwargs()
        kwargs.pop("chat_template", None)
        conversation, _, _ = parse_chat_messages(
            request.messages, model_config, content_format=content_format
        )
        tools = [tool.model_dump() for tool in request.tools] if request.tools else None
        text = safe_apply_chat_template(
            model_config, vllm_tok, conversation, tools=tools, chat_template=None, tokenize=False, **kwargs
        )
        return str(text)

    return run


# -- vocabulary -------------------------------------------------------------------------------------


def test_markup_is_single_non_special_tokens_and_the_tool_role_is_special(
    demo_model_dir: Path, tok: Any
) -> None:
    added = {token.content: (i, token.special) for i, token in tok.added_tokens_decoder.items()}
    for markup in MARKUP_TOKENS:
        assert tok.encode(markup, add_special_tokens=False) == [added[markup][0]]
        assert not added[markup][1], markup
    assert added[TOOL_ROLE_TOKEN][1]
    # Special tokens vanish from text when skipped; the markup stays for the parsers.
    ids = tok.encode(f"{TOOL_ROLE_TOKEN}<think>a</think>{REPLY}</s>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == f"<think>a</think>{REPLY}"
    # Added after training: the trained vocabulary and its ids are the first recipe's.
    assert sorted(i for i, _ in added.values())[6:] == list(range(661, 666))
    assert AutoConfig.from_pretrained(str(demo_model_dir)).vocab_size == len(tok) == 666


# -- the template -----------------------------------------------------------------------------------

PLAIN = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": ""},
    ],
    [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"}],
]


@pytest.mark.parametrize("messages", PLAIN)
def test_plain_chats_render_exactly_as_the_first_template_did(
    tok: Any, messages: list[dict[str, Any]]
) -> None:
    for kwargs in (
        {"add_generation_prompt": True},
        {"add_generation_prompt": False},
        {"enable_thinking": True},
    ):
        new = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        assert new == tok.apply_chat_template(
            messages, tokenize=False, chat_template=FIRST_TEMPLATE, **kwargs
        )
    if messages[-1]["role"] == "assistant":
        kwargs = {"continue_final_message": True}
        new = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        assert new == tok.apply_chat_template(
            messages, tokenize=False, chat_template=FIRST_TEMPLATE, **kwargs
        )
        assert new.endswith("<|assistant|>\nOnce upon a time")


def test_plain_chats_through_vllm_render_exactly_as_before(render: Any) -> None:
    body = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}
    assert render(body) == "<s><|system|>\nBe brief.</s>\n<|user|>\nHello</s>\n<|assistant|>\n"
    assert "developer" not in CHAT_TEMPLATE  # so vLLM keeps mapping developer to system
    thinking = {**body, "chat_template_kwargs": {"enable_thinking": True}}
    assert render(thinking) == render(body) == render({**body, "reasoning_effort": "low"})
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    }
    assert render(parts) == "<s><|user|>\nab</s>\n<|assistant|>\n"


def test_tools_a_call_and_its_result(render: Any) -> None:
    text = render({"messages": TOOL_ROUND, "tools": [WEATHER]})
    assert text == (
        f"<s><|system|>\nBe brief.\n\n{TOOL_LIST}</s>\n"
        "<|user|>\nWeather in Paris?</s>\n"
        "<|assistant|>\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call></s>\n'
        '<|tool|>\n{"sky": "clear"}</s>\n'
        "<|assistant|>\n"
    )


def test_tools_without_a_system_message_open_a_system_turn(render: Any) -> None:
    text = render({"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER]})
    assert text == f"<s><|system|>\n{TOOL_LIST}</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_several_calls_follow_the_content_one_a_line(render: Any) -> None:
    second = {
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        {"role": "user", "content": "Paris and Oslo?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [CALL, second]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "clear"}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    text = render({"messages": messages, "add_generation_prompt": False})
    assert text.endswith(
        "<|assistant|>\nLooking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call></s>\n'
        "<|tool|>\nclear</s>\n<|tool|>\nrain</s>\n"
    )


def test_names_follow_the_role_token(render: Any) -> None:
    messages = [
        {"role": "user", "name": "ada", "content": "Hi"},
        {"role": "assistant", "name": "bot", "content": "Yes"},
    ]
    text = render({"messages": messages, "add_generation_prompt": False})
    assert text == "<s><|user|>ada\nHi</s>\n<|assistant|>bot\nYes</s>\n"


def test_thinking_off_closes_an_empty_think_block(render: Any) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
    off = "<s><|user|>\nHi</s>\n<|assistant|>\n<think>\n\n</think>\n\n"
    assert render({**body, "chat_template_kwargs": {"enable_thinking": False}}) == off
    assert render({**body, "reasoning_effort": "none"}) == off  # vLLM turns it into enable_thinking=False


def test_continue_final_message_after_tools(render: Any) -> None:
    messages = [*TOOL_ROUND, {"role": "assistant", "content": "It is"}]
    body = {
        "messages": messages,
        "tools": [WEATHER],
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    assert render(body).endswith('<|tool|>\n{"sky": "clear"}</s>\n<|assistant|>\nIt is')


def test_unknown_roles_are_still_refused(render: Any) -> None:
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="unsupported role: function"):
        render({"messages": [{"role": "function", "name": "f", "content": "x"}]})


# -- vLLM's parsers on the demo vocabulary ----------------------------------------------------------


def _request(**extra: Any) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
    return ChatCompletionRequest.model_validate({**body, **extra})


def test_the_hermes_tool_parser_reads_a_call(vllm_tok: Any) -> None:
    from vllm.tool_parsers import ToolParserManager

    request = _request()
    parser = ToolParserManager.get_tool_parser("hermes")(vllm_tok, request.tools)
    assert parser.adjust_request(request).skip_special_tokens is False
    ids = vllm_tok.encode(REPLY, add_special_tokens=False)
    # With or without skipping special tokens, the markup survives detokenization.
    for skip in (True, False):
        found = parser.extract_tool_calls(vllm_tok.decode(ids, skip_special_tokens=skip), request)
        assert found.tools_called and found.content == "Let me look. "
        assert [(c.function.name, json.loads(c.function.arguments)) for c in found.tool_calls] == [
            ("get_weather", {"city": "Paris"})
        ]


@pytest.mark.parametrize("reasoning_parser", ["qwen3", "deepseek_r1"])
def test_reasoning_parsers_split_thinking_from_the_answer(vllm_tok: Any, reasoning_parser: str) -> None:
    from vllm.reasoning import ReasoningParserManager

    parser = ReasoningParserManager.get_reasoning_parser(reasoning_parser)(vllm_tok)
    think_end = vllm_tok.convert_tokens_to_ids("</think>")
    ids = vllm_tok.encode("<think>Paris, so clear.</think>It is clear.", add_special_tokens=False)
    assert think_end in ids and parser.is_reasoning_end(ids)
    text = vllm_tok.decode(ids)
    assert parser.extract_reasoning(text, _request()) == ("Paris, so clear.", "It is clear.")


@pytest.mark.parametrize("reasoning_parser", ["qwen3", "deepseek_r1"])
def test_streamed_token_by_token_with_hermes(vllm_tok: Any, reasoning_parser: str) -> None:
    """vLLM's serving path: one composed parser fed one token at a time, as its server streams."""
    from vllm.parser import ParserManager

    composed = ParserManager.get_parser(
        tool_parser_name="hermes",
        reasoning_parser_name=reasoning_parser,
        enable_auto_tools=True,
        tokenizer=vllm_tok,
    )
    assert composed is not None
    request = _request(stream=True)
    parser = composed(vllm_tok, request.tools, chat_template_kwargs={})
    prompt = vllm_tok.encode("<s><|user|>\nWeather in Paris?</s>\n<|assistant|>\n", add_special_tokens=False)
    ids = vllm_tok.encode(f"<think>Paris.</think>{REPLY}", add_special_tokens=False)
    reasoning = content = name = arguments = ""
    previous = ""
    for k in range(len(ids)):
        current = vllm_tok.decode(ids[: k + 1], skip_special_tokens=False)
        delta = parser.parse_delta(
            current[len(previous) :],
            ids[k : k + 1],
            request,
            prompt_token_ids=prompt,
            finished=k == len(ids) - 1,
        )
        previous = current
        if delta is None:
            continue
        reasoning += delta.reasoning or ""
        content += delta.content or ""
        for call in delta.tool_calls:
            name += (call.function and call.function.name) or ""
            arguments += (call.function and call.function.arguments) or ""
    assert (reasoning, content.strip(), name) == ("Paris.", "Let me look.", "get_weather")
    assert json.loads(arguments) == {"city": "Paris"}


def test_with_thinking_off_the_prompt_has_ended_reasoning(render: Any, vllm_tok: Any) -> None:
    from vllm.reasoning import ReasoningParserManager

    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
    off = vllm_tok.encode(
        render({**body, "chat_template_kwargs": {"enable_thinking": False}}), add_special_tokens=False
    )
    on = vllm_tok.encode(render(body), add_special_tokens=False)
    deepseek = ReasoningParserManager.get_reasoning_parser("deepseek_r1")(vllm_tok)
    assert deepseek.is_reasoning_end(off) and not deepseek.is_reasoning_end(on)
    with_tools = vllm_tok.encode(
        render({"messages": TOOL_ROUND, "tools": [WEATHER]}), add_special_tokens=False
    )
    assert not deepseek.is_reasoning_end(with_tools)  # (qwen3 would say it ended: see worker/demo_model.py)
    qwen3 = ReasoningParserManager.get_reasoning_parser("qwen3")
    assert not qwen3(vllm_tok, chat_template_kwargs={}).is_reasoning_end(on)
    assert qwen3(vllm_tok, chat_template_kwargs={"enable_thinking": False}).is_reasoning_end(off)
