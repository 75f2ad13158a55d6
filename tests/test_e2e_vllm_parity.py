"""The same bodies to Switchyard and to vLLM's own server on the same demo model: text completions
(several prompts, echo, log probabilities, scoring a prompt, the default budget, streamed or not)
and ``/tokenize``/``/detokenize`` answer in the same shape, and greedily with the same tokens and
log probabilities; what vLLM refuses, Switchyard refuses with the same ``param``.

vLLM's server starts once for the module (about a minute on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control.processes import free_port
from tests.conftest import MAX_MODEL_LEN, System
from tests.procs import ROOT, stop, wait_until

# vLLM's server takes a minute to start on two cores, several when they are busy.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

LOGPROB_TOLERANCE = 1e-3
"""Two engines on the same weights and dtype agree to about 1e-5; batching may reorder sums."""


@pytest.fixture(scope="module")
def vllm_url(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(demo_model_dir)]
    argv += ["--served-model-name", "switchyard-demo", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 600, "vLLM's server", procs=(proc,), logs=(log,))
        yield url
    finally:
        stop(proc)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def post(base: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=headers or {}, timeout=120)


def both(
    system: System, vllm_url: str, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, httpx.Response]:
    full = {"model": system.model, **body}
    return post(system.base_url, path, full, system.headers), post(vllm_url, path, full)


def streamed(resp: httpx.Response) -> dict[str, Any]:
    """A streamed answer folded into the shape of a whole one: per choice its text, its finish
    reason and its log probabilities' lists joined; the usage chunk's usage."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event)
        assert chunk["object"] == "text_completion"
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            choice = choices.setdefault(c["index"], {"index": c["index"], "text": "", "logprobs": None})
            choice["text"] += c["text"]
            choice["finish_reason"] = c["finish_reason"] or choice.get("finish_reason")
            if c["logprobs"] is not None:
                lists = choice["logprobs"] = choice["logprobs"] or {k: [] for k in c["logprobs"]}
                for key, values in c["logprobs"].items():
                    lists[key] += values
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


OPENAI_CHOICE = ("index", "text", "logprobs", "finish_reason")


def same_answer(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """OpenAI's fields agree: every choice's text, finish reason and log probabilities, the usage."""
    assert len(ours["choices"]) == len(theirs["choices"])
    for mine, other in zip(ours["choices"], theirs["choices"], strict=True):
        for key in ("index", "text", "finish_reason"):
            assert mine[key] == other[key], (key, mine, other)
        if other["logprobs"] is None:
            assert mine["logprobs"] is None
            continue
        a, b = mine["logprobs"], other["logprobs"]
        assert set(a) == set(b) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
        for x, y in zip(a["token_logprobs"], b["token_logprobs"], strict=True):
            assert (x is None) == (y is None) and (x is None or abs(x - y) < LOGPROB_TOLERANCE)
        for x, y in zip(a["top_logprobs"], b["top_logprobs"], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert set(x) == set(y) and all(abs(x[t] - y[t]) < LOGPROB_TOLERANCE for t in x)
    if theirs["usage"] is not None:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert ours["usage"][key] == theirs["usage"][key], key


BODIES: dict[str, dict[str, Any]] = {
    "several prompts": {"prompt": ["Hello", "The sea at night"], "max_tokens": 5},
    "token prompts, echo, logprobs": {
        "prompt": [[5, 6, 7], [8, 9]],
        "max_tokens": 3,
        "echo": True,
        "logprobs": 2,
    },
    "scoring": {"prompt": "Hello world", "max_tokens": 0, "echo": True, "logprobs": 1},
    "scoring several": {
        "prompt": ["Hello world", "Ships in the harbour"],
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
    },
    "logprobs 0": {"prompt": "Once upon a time", "max_tokens": 4, "logprobs": 0},
    "logprobs 5": {"prompt": "Once upon a time", "max_tokens": 3, "logprobs": 5},
    "default budget": {"prompt": "Hi", "max_tokens": None, "ignore_eos": True},
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", list(BODIES))
def test_completions_answer_as_vllm_does(system: System, vllm_url: str, name: str, stream: bool) -> None:
    body = {**BODIES[name], "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    ours, theirs = both(system, vllm_url, "/v1/completions", body)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    if stream:
        same_answer(streamed(ours), streamed(theirs))
        return
    mine, other = ours.json(), theirs.json()
    assert mine["object"] == other["object"] == "text_completion"
    assert all(set(OPENAI_CHOICE) <= set(c) for c in mine["choices"])
    same_answer(mine, other)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "suffix": "and then"}, "suffix"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_what_vllm_refuses_is_refused_naming_the_same_param(
    system: System, vllm_url: str, body: dict[str, Any], param: str
) -> None:
    ours, theirs = both(system, vllm_url, "/v1/completions", body)
    assert ours.status_code == theirs.status_code == 400
    assert ours.json()["error"]["param"] == theirs.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "Once upon a time, in the harbour", "return_token_strs": True},
        {"prompt": "Hello", "add_special_tokens": False},
        {"messages": [{"role": "user", "content": "Tell me about the harbour."}]},
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "add_generation_prompt": False,
            "return_token_strs": True,
        },
    ],
)
def test_tokenize_answers_as_vllm_does(system: System, vllm_url: str, body: dict[str, Any]) -> None:
    ours, theirs = both(system, vllm_url, "/tokenize", body)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    assert ours.json() == theirs.json()
    ids = theirs.json()["tokens"]
    ours, theirs = both(system, vllm_url, "/detokenize", {"tokens": ids})
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json()
