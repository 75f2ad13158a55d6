"""A chat request planned with the demo model's tokenizer, engine-free: what the engine could not hold
is refused with a 400 that names the field and says why in the backend's words, and only those."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from api.chat.protocol import ChatCompletionRequest
from api.errors import InvalidRequest
from serving.chat import Answering, ChatRenderer


@pytest.fixture(scope="module")
def renderer(demo_model_dir: Path) -> ChatRenderer:
    return ChatRenderer(AutoTokenizer.from_pretrained(str(demo_model_dir)))


@pytest.mark.parametrize(
    ("extra", "param", "said"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
            'Unsupported type "strin"',
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ],
)
def test_what_the_grammar_backend_refuses_is_said_without_its_log_prefix(
    renderer: ChatRenderer, extra: dict[str, Any], param: str, said: str
) -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}
    )
    with pytest.raises(InvalidRequest) as info:
        renderer.plan(body, Answering(), max_logprobs=20)
    message = str(info.value)
    assert info.value.param == param
    assert said in message
    # xgrammar starts its messages with the time and its C++ source line: a client has no use for them.
    assert not re.search(r"\[\d\d:\d\d:\d\d\]|\.cc:\d+", message), message
