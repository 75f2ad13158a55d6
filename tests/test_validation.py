"""Request validation and the context-length budget (pure)."""

import pytest
from pydantic import ValidationError

from api.chat.protocol import ChatCompletionRequest
from api.completions.protocol import MAX_PROMPTS, CompletionRequest
from api.errors import InvalidRequest
from gateway.app import validation_error
from serving.path import check_sampling, fit_context
from shared.messages import Sampling, StructuredOutput

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def first_error(cls: type, body: dict) -> InvalidRequest:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    return validation_error([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])


def test_unknown_field_is_named() -> None:
    err = first_error(ChatCompletionRequest, {"model": "m", "messages": MSG, "bogus": 1})
    assert err.param == "bogus"
    assert "Unrecognized request argument" in err.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MSG}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": MSG, "temperature": 5}, "temperature"),
        ({"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": MSG, "n": 0}, "n"),
        ({"model": "m", "messages": MSG, "stop": [""]}, "stop"),
        ({"model": "m", "messages": MSG, "stop": ["x" * 513]}, "stop"),
        ({"model": "m", "messages": MSG, "stop": "x" * 513}, "stop"),
        ({"model": "m", "messages": MSG, "logit_bias": {"x": 2}}, "logit_bias"),
        ({"model": "m", "messages": MSG, "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": "m", "messages": MSG, "tools": [{"type": "function"}]}, "tools.0.function"),
        ({"model": "m", "messages": MSG, "tools": [TOOL | {"type": "custom"}]}, "tools.0.type"),
        (
            {"model": "m", "messages": MSG, "tools": [{**TOOL, "function": {"name": "a b"}}]},
            "tools.0.function.name",
        ),
        ({"model": "m", "messages": MSG, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"model": "m", "messages": MSG, "tool_choice": "sometimes"}, "tool_choice"),
        ({"model": "m", "messages": MSG, "response_format": {"type": "xml"}}, "response_format"),
        ({"model": "m", "messages": MSG, "reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"model": "m", "messages": [{"role": "tool", "content": "42"}]}, "messages.0"),
        ({"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages.0.content.0",
        ),
        ({"model": "m", "messages": MSG, "stop_token_ids": [2, -1]}, "stop_token_ids.1"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_invalid_chat_bodies_name_their_param(body: dict, param: str) -> None:
    assert first_error(ChatCompletionRequest, body).param == param


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MSG, "max_tokens": 5, "max_completion_tokens": 7}
    )
    assert req.output_limit() == 7


def test_completion_prompt_forms() -> None:
    def prompts(p: object) -> object:
        return CompletionRequest.model_validate({"model": "m", "prompt": p}).prompts()

    assert prompts("hi") == ["hi"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts(["only"]) == ["only"]
    assert prompts([[4, 5]]) == [[4, 5]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ([], [[]], ["a", 1], [[1], "b"], [-1], ["x"] * (MAX_PROMPTS + 1)):
        with pytest.raises(ValidationError) as info:
            prompts(bad)
        assert info.value.errors()[0]["loc"][0] == "prompt"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1, "echo": True}, "max_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"suffix": "tail"}, "suffix"),
        ({"echo": "yes please"}, "echo"),
    ],
)
def test_invalid_completion_bodies_name_their_param(body: dict, param: str) -> None:
    assert first_error(CompletionRequest, {"model": "m", "prompt": "hi", **body}).param == param


def test_completion_budget_is_openais() -> None:
    def request(**fields: object) -> CompletionRequest:
        return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})

    assert request().max_tokens == request(max_tokens=None).max_tokens == 16
    scoring = request(max_tokens=0, echo=True, logprobs=0)
    assert scoring.echo_only and scoring.budget == 0 and scoring.logprobs == 0
    assert not request(max_tokens=1, echo=True).echo_only


def test_context_budget() -> None:
    assert fit_context(10, 5, 100, "messages") == 5
    assert fit_context(10, None, 100, "messages") == 90
    with pytest.raises(InvalidRequest) as info:
        fit_context(10, 91, 100, "messages")
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequest):
        fit_context(100, None, 100, "prompt")
    with pytest.raises(InvalidRequest) as info:
        fit_context(0, 5, 100, "prompt")
    assert info.value.param == "prompt"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2, "temperature": 0}, "n"),
        ({"n": 2, "temperature": 1e-6}, "n"),
        ({"min_tokens": 9}, "min_tokens"),
        ({"n": 2}, None),  # the default temperature samples
        ({"n": 2, "temperature": 0.5}, None),
        ({"temperature": 0}, None),
        ({"min_tokens": 8}, None),
    ],
)
def test_what_vllm_refuses_across_sampling_fields_is_refused_before_enqueueing(
    fields: dict, param: str | None
) -> None:
    for cls, body in ((ChatCompletionRequest, {"messages": MSG}), (CompletionRequest, {"prompt": "hi"})):
        req = cls.model_validate({"model": "m", **body, **fields})
        if param is None:
            check_sampling(req, 8)
            continue
        with pytest.raises(InvalidRequest) as info:
            check_sampling(req, 8)
        assert info.value.param == param


def test_sampling_defaults_and_stop_forms() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "stop": "END", "seed": 3})
    s = req.to_sampling(12)
    assert (s.max_tokens, s.stop, s.seed, s.temperature, s.top_p, s.top_k) == (12, ("END",), 3, 1.0, 1.0, 0)


# A value other than the default for every field of the wire's Sampling but max_tokens. A field
# added there without one here fails the test below: it must reach the engine, and be checked to.
NON_DEFAULT = {
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 7,
    "min_p": 0.05,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "repetition_penalty": 1.2,
    "stop": ("END",),
    "stop_token_ids": (3, 4),
    "seed": 11,
    "n": 2,
    "ignore_eos": True,
    "min_tokens": 2,
    "include_stop_str_in_output": True,
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "logprobs": 3,
    "logit_bias": ((5, 1.5),),
    "structured_output": StructuredOutput(json_schema='{"type": "object"}'),
    "prompt_logprobs": 2,
}
# How those reach the request, where its form differs from the wire's, or the request path decides.
IN_REQUEST = {"logprobs": {"logprobs": True, "top_logprobs": 3}, "logit_bias": {"logit_bias": {"5": 1.5}}}
DECIDED = ("structured_output", "prompt_logprobs")
# What the engine's parameters hold for them, where its form differs from the wire's.
IN_ENGINE = {
    "logit_bias": lambda p: p.logit_bias == {5: 1.5},
    "structured_output": lambda p: p.structured_outputs.json == '{"type": "object"}',
}


def test_every_sampling_parameter_travels_from_the_request_to_the_engine() -> None:
    from worker.vllm_engine import sampling_params

    fields = set(Sampling.model_fields) - {"max_tokens"}
    assert fields == set(NON_DEFAULT), "a new sampling field needs a value in NON_DEFAULT"
    body: dict[str, object] = {}
    for name, value in NON_DEFAULT.items():
        if name in IN_REQUEST:
            body |= IN_REQUEST[name]
        elif name not in DECIDED:
            body[name] = list(value) if isinstance(value, tuple) else value
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **body})
    decided = {name: NON_DEFAULT[name] for name in DECIDED}
    wire = req.to_sampling(12, logprobs=req.wants_logprobs(), **decided)
    defaults = Sampling(max_tokens=12)
    for name, value in NON_DEFAULT.items():
        assert getattr(wire, name) == value != getattr(defaults, name), name
    params = sampling_params(wire)
    assert params.max_tokens == 12
    for name, value in NON_DEFAULT.items():
        if name in IN_ENGINE:
            assert IN_ENGINE[name](params), name
            continue
        got = getattr(params, name)
        assert (tuple(got) if isinstance(got, list) else got) == value, name


def test_engine_parameters_are_bounded_like_vllms_server() -> None:
    for field, value in [
        ("top_k", 2**31),
        ("top_k", 100325800847805464576),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
    ]:
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, field: value})
        assert info.value.errors()[0]["loc"] == (field,)
    for field, value in [("top_k", 2**31 - 1), ("top_k", -1), ("seed", 2**63 - 1), ("seed", -(2**63))]:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, field: value})
