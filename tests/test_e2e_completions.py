"""Text completions end to end with the official SDK: several prompts in one request (whole and
streamed), echo, log probabilities, scoring a prompt (``max_tokens: 0``), OpenAI's default budget,
and what is refused."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from redis.asyncio import Redis
from transformers import AutoTokenizer

from tests.conftest import MAX_MODEL_LEN, System
from tests.test_e2e_api import EXACT, entries_added
from tests.test_metrics import scrape, settle, value

pytestmark = pytest.mark.e2e

PROMPTS = ["Once upon a time", "The harbour at night", "Ships"]
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": EXACT}
JOBS = "switchyard:worker_jobs_total"


def greedy_text(client: OpenAI, system: System, prompt: str | list[int], max_tokens: int) -> str:
    resp = client.completions.create(model=system.model, prompt=prompt, max_tokens=max_tokens, **GREEDY)
    return resp.choices[0].text


def test_several_prompts_answer_as_indexed_choices(client: OpenAI, system: System) -> None:
    resp = client.completions.create(model=system.model, prompt=PROMPTS, max_tokens=6, n=2, extra_body=EXACT)
    assert [c.index for c in resp.choices] == list(range(6))
    assert all(c.finish_reason == "length" and c.text for c in resp.choices)
    assert resp.usage is not None and resp.usage.completion_tokens == 6 * 6
    singles = [client.completions.create(model=system.model, prompt=p, max_tokens=1) for p in PROMPTS]
    assert resp.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles if s.usage)
    # Greedy, each prompt's choice is what the prompt alone gets: choice k continues prompt k.
    greedy = client.completions.create(model=system.model, prompt=PROMPTS, max_tokens=6, **GREEDY)
    assert [c.text for c in greedy.choices] == [greedy_text(client, system, p, 6) for p in PROMPTS]


def test_several_prompts_stream_interleaved_each_choice_with_its_index(
    client: OpenAI, system: System
) -> None:
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    stream = client.completions.create(
        model=system.model,
        prompt=prompts,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    texts: dict[int, str] = {}
    finished: dict[int, str | None] = {}
    chunks = list(stream)
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finished[choice.index] = choice.finish_reason
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert [texts[i] for i in range(3)] == [greedy_text(client, system, p, 8) for p in prompts]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None and usage.completion_tokens == 24


async def test_several_prompts_are_admitted_as_one_request(
    aclient: AsyncOpenAI, system: System, redis: Redis
) -> None:
    done = {"model": system.model, "outcome": "completed"}
    before = value(scrape(system.worker_metrics_url), JOBS, **done)
    raw = await aclient.completions.with_raw_response.create(model=system.model, prompt=PROMPTS, max_tokens=2)
    request_id = raw.headers["x-request-id"]
    assert raw.parse().id == "cmpl-" + request_id.removeprefix("req_")
    after = settle(system.worker_metrics_url, lambda s: value(s, JOBS, **done) >= before + len(PROMPTS))
    assert value(after, JOBS, **done) == before + len(PROMPTS)  # a job per prompt
    window = system.names.rate("main", "req")
    assert await redis.zscore(window, request_id) is not None  # one request against the limits
    assert not [m async for m in redis.zscan_iter(window, match=f"{request_id}-*")]
    assert await redis.zscore(system.names.inflight("main"), request_id) is None  # settled


def test_echo_puts_the_prompt_before_the_completion(client: OpenAI, system: System) -> None:
    plain = greedy_text(client, system, "Hello world", 4)
    echoed = client.completions.create(
        model=system.model, prompt="Hello world", max_tokens=4, echo=True, **GREEDY
    )
    assert echoed.choices[0].text == "Hello world" + plain
    streamed = client.completions.create(
        model=system.model, prompt="Hello world", max_tokens=4, echo=True, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed) == "Hello world" + plain


def check_lists(logprobs: Any, tokens: int, top: int) -> None:
    """The legacy shape's four lists in step, offsets counted in the tokens' texts."""
    assert logprobs is not None and len(logprobs.tokens) == tokens
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == tokens
    for i in range(1, tokens):
        assert logprobs.text_offset[i] == logprobs.text_offset[i - 1] + len(logprobs.tokens[i - 1])
    for p, alternatives in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        if p is None:
            assert alternatives is None
            continue
        assert p <= 0 and 1 <= len(alternatives) <= top + 1
        assert all(v <= 0 for v in alternatives.values())


def test_logprobs_of_each_token(client: OpenAI, system: System) -> None:
    resp = client.completions.create(model=system.model, prompt="The sea", max_tokens=5, logprobs=3, **GREEDY)
    check_lists(resp.choices[0].logprobs, 5, 3)
    # greedy: the token taken is the likeliest, so it is listed with its own log probability
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None
    for token, p, alternatives in zip(lp.tokens or [], lp.token_logprobs or [], lp.top_logprobs, strict=True):
        # (two alternatives may decode to the same text: the dict keeps one of them)
        assert token in alternatives and p is not None and p >= max(alternatives.values()) - 1e-6
    zero = client.completions.create(model=system.model, prompt="The sea", max_tokens=3, logprobs=0)
    check_lists(zero.choices[0].logprobs, 3, 0)
    assert zero.choices[0].logprobs and all(len(t) == 1 for t in zero.choices[0].logprobs.top_logprobs or [])


def test_streamed_logprobs_cover_every_token_with_running_offsets(client: OpenAI, system: System) -> None:
    stream = client.completions.create(
        model=system.model, prompt="Hello world", max_tokens=10, echo=True, logprobs=1, stream=True, **GREEDY
    )
    tokens: list[str] = []
    offsets: list[int] = []
    text = ""
    for chunk in stream:
        (choice,) = chunk.choices
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens or []
            offsets += choice.logprobs.text_offset or []
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    whole = client.completions.create(
        model=system.model, prompt="Hello world", max_tokens=10, echo=True, logprobs=1, **GREEDY
    )
    assert whole.choices[0].logprobs is not None
    assert tokens == whole.choices[0].logprobs.tokens and text == whole.choices[0].text


def test_scoring_prompts_max_tokens_0_with_echo_and_logprobs(client: OpenAI, system: System) -> None:
    """What lm-evaluation-harness sends for log-likelihoods: the prompts' log probabilities, no
    completion; each prompt scored the same alone or beside others, streamed or not."""
    resp = client.completions.create(
        model=system.model,
        prompt=["Hello world", "Ships"],
        max_tokens=0,
        echo=True,
        logprobs=1,
        temperature=0,
    )
    first, second = resp.choices
    assert (first.text, second.text) == ("Hello world", "Ships")
    assert first.finish_reason == second.finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 2  # one step per prompt, as vLLM
    ids = [5, 6, 7, 8, 9]
    by_ids = client.completions.create(
        model=system.model, prompt=[ids, ids[:2]], max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    scored = by_ids.choices[0]
    assert scored.text == AutoTokenizer.from_pretrained(system.model_dir).decode(ids)  # as vLLM echoes ids
    check_lists(scored.logprobs, 5, 1)
    assert scored.logprobs is not None and scored.logprobs.token_logprobs is not None
    assert scored.logprobs.token_logprobs[0] is None and None not in scored.logprobs.token_logprobs[1:]
    # a prompt token's log probability depends on what precedes it only
    shorter = by_ids.choices[1].logprobs
    assert shorter is not None and shorter.token_logprobs is not None and shorter.token_logprobs[0] is None
    assert shorter.token_logprobs[1] == pytest.approx(scored.logprobs.token_logprobs[1], abs=1e-4)
    alone = client.completions.create(
        model=system.model, prompt="Hello world", max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    assert alone.choices[0].logprobs == first.logprobs
    streamed = list(
        client.completions.create(
            model=system.model, prompt="Hello world", max_tokens=0, echo=True, logprobs=1, stream=True
        )
    )
    (only,) = streamed
    assert only.choices[0].text == "Hello world" and only.choices[0].finish_reason == "length"
    assert only.choices[0].logprobs == first.logprobs


def test_max_tokens_null_means_16(client: OpenAI, system: System) -> None:
    resp = client.completions.create(model=system.model, prompt="Hello", max_tokens=None, extra_body=EXACT)
    assert resp.usage is not None and resp.usage.completion_tokens == 16


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"suffix": "and then"}, "suffix"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": ["fine", [1] * MAX_MODEL_LEN]}, "prompt.1"),
        ({"prompt": [[1, 2], [10**7]]}, "prompt"),
        ({"prompt": ["x"] * 1025}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
    ],
)
async def test_bad_completions_are_a_400_and_enqueue_nothing(
    aclient: AsyncOpenAI, system: System, redis: Redis, kwargs: dict, param: str
) -> None:
    before = await entries_added(redis, system)
    body = {"model": system.model, "prompt": "Hello", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.completions.create(**body)
    assert info.value.param == param
    assert await entries_added(redis, system) == before


@pytest.mark.parametrize(
    ("headers", "stream_options", "param"),
    [
        ({}, {"resumable": True}, "stream_options.resumable"),
        ({"Last-Event-ID": "0" * 32 + ".00000000.1.0"}, None, "Last-Event-ID"),
        ({"Idempotency-Key": "several-prompts"}, None, "Idempotency-Key"),
    ],
)
async def test_several_prompts_are_not_resumable_nor_idempotent(
    aclient: AsyncOpenAI,
    system: System,
    redis: Redis,
    headers: dict[str, str],
    stream_options: dict[str, Any] | None,
    param: str,
) -> None:
    """Event ids and an Idempotency-Key name one job: a request of several is refused, not run
    without what it asked for."""
    before = await entries_added(redis, system)
    extra = {"stream_options": stream_options} if stream_options else {}
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.completions.create(
            model=system.model,
            prompt=PROMPTS,
            max_tokens=2,
            stream=True,
            extra_headers=headers,
            extra_body=extra,
        )
    assert info.value.param == param
    assert await entries_added(redis, system) == before
