"""``/tokenize`` and ``/detokenize`` end to end, over plain HTTP as their clients call them: the
ids a completion or a chat request would run on, behind the same keys, bad input refused."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import MAX_MODEL_LEN, System

pytestmark = pytest.mark.e2e

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the harbour."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def post(system: System, path: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else system.headers
    return httpx.post(f"{system.base_url}{path}", json=body, headers=headers, timeout=30)


def test_a_prompt_tokenizes_to_what_a_completion_runs_on(client: OpenAI, system: System) -> None:
    prompt = "Once upon a time, in the harbour"
    resp = post(system, "/tokenize", {"model": system.model, "prompt": prompt, "return_token_strs": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    done = client.completions.create(model=system.model, prompt=prompt, max_tokens=1)
    assert done.usage is not None and done.usage.prompt_tokens == body["count"]
    by_ids = client.completions.create(model=system.model, prompt=body["tokens"], max_tokens=1, echo=True)
    assert by_ids.choices[0].text.startswith(prompt)
    plain = post(system, "/tokenize", {"model": system.model, "prompt": prompt}).json()
    assert plain["tokens"] == body["tokens"] and plain["token_strs"] is None
    back = post(system, "/detokenize", {"model": system.model, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": prompt}


@pytest.mark.parametrize("tools", [None, [WEATHER]])
def test_messages_tokenize_as_a_chat_request_renders_them(
    client: OpenAI, system: System, tools: list[dict[str, Any]] | None
) -> None:
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    body = post(system, "/tokenize", {"model": system.model, "messages": USER, **extra}).json()
    chat = client.chat.completions.create(model=system.model, messages=USER, max_tokens=1, **extra)  # type: ignore[arg-type]
    assert chat.usage is not None and chat.usage.prompt_tokens == body["count"]
    bare = post(
        system, "/tokenize", {"model": system.model, "messages": USER, "add_generation_prompt": False}
    )
    assert (
        bare.status_code == 200
        and bare.json()["count"]
        < post(system, "/tokenize", {"model": system.model, "messages": USER}).json()["count"]
    )
    rendered = post(system, "/detokenize", {"model": system.model, "tokens": body["tokens"]}).json()["prompt"]
    assert "Tell me about the harbour." in rendered and ("weather" in rendered) == bool(tools)


def test_without_a_model_the_one_served_is_used(system: System) -> None:
    served = httpx.get(f"{system.base_url}/v1/models", headers=system.headers).json()["data"]
    resp = post(system, "/tokenize", {"prompt": "hi"})
    if len(served) == 1:
        assert resp.status_code == 200 and resp.json()["count"] >= 1
    else:  # other tests of the session register models of their own
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [1, 10**7]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/tokenize", {"prompt": 7}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "echo": True}, 400, "echo"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": USER, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
        ("/tokenize", {"messages": USER, "continue_final_message": True}, 400, None),
        ("/tokenize", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ],
)
def test_bad_input_is_an_openai_shaped_error(
    system: System, path: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    resp = post(system, path, {"model": system.model, **body})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_behind_the_same_keys(system: System, path: str) -> None:
    body = {"model": system.model, "prompt": "hi", "tokens": [1]}
    body.pop("tokens" if path == "/tokenize" else "prompt")
    assert httpx.post(f"{system.base_url}{path}", json=body).status_code == 401
    assert post(system, path, body, key="sy-000000000000-nope").status_code == 401
    assert post(system, path, body).status_code == 200
