"""Request validation and the context-length budget (pure)."""

import pytest
from pydantic import ValidationError

from gateway.app import validation_error
from gateway.errors import InvalidRequest
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.service import fit_context, to_sampling

MSG = [{"role": "user", "content": "hi"}]


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
        ({"model": "m", "messages": MSG, "logit_bias": {"1": 2}}, "logit_bias"),
        ({"model": "m", "messages": MSG, "tools": [{"type": "function"}]}, "tools"),
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
    def prompt(p: object) -> object:
        return CompletionRequest.model_validate({"model": "m", "prompt": p}).single_prompt()

    assert prompt("hi") == "hi"
    assert prompt([1, 2, 3]) == [1, 2, 3]
    assert prompt(["only"]) == "only"
    assert prompt([[4, 5]]) == [4, 5]
    with pytest.raises(ValidationError):
        prompt(["a", "b"])


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


def test_sampling_defaults_and_stop_forms() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "stop": "END", "seed": 3})
    s = to_sampling(req, 12)
    assert (s.max_tokens, s.stop, s.seed, s.temperature, s.top_p, s.top_k) == (12, ("END",), 3, 1.0, 1.0, 0)
