"""Text completions, pure: echo and log probabilities in the answer's shape, and a request of several
prompts merged into one answer (choice numbering, interleaving, restarts, failures)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from api.assembly import Meta
from api.completions.assembly import TEXT, Echo, TextFull, TextPlan, TextStream
from api.errors import APIError, UpstreamFailure
from serving.fanout import FanIn, merged
from shared.messages import Final, Job, Logprobs, Sampling, Started, Tokens, Usage

META = Meta(id="cmpl-1", created=1, model="m", family=TEXT)

# "Hello" as the prompt's tokens "H", "ell", "o"; the worker scores the second and third.
PROMPT = Logprobs(
    sampled=(-2.0, -3.0),
    texts=("ell", "o"),
    top=(((424, -2.0, "ell"), (613, -1.0, " HTTP"), (7, -4.0, "x")), ((84, -3.0, "o"), (346, -0.5, "ome"))),
)
HELLO = Echo(text="Hello", first_token="H")


def generated(*tokens: tuple[str, float]) -> Logprobs:
    """Sampled tokens, each its own best alternative and a worse one after it."""
    return Logprobs(
        sampled=tuple(p for _, p in tokens),
        texts=tuple(t for t, _ in tokens),
        top=tuple(((1, p, t), (2, p - 1, t + "?")) for t, p in tokens),
    )


def tok(
    seq: int,
    text: str,
    index: int = 0,
    finish: str | None = None,
    logprobs: Logprobs | None = None,
    prompt: Logprobs | None = None,
) -> Tokens:
    ids = tuple(range(len(logprobs.sampled))) if logprobs else (seq,)
    return Tokens(
        seq=seq,
        index=index,
        text=text,
        token_ids=ids,
        finish_reason=finish,  # type: ignore[arg-type]
        logprobs=logprobs,
        prompt_logprobs=prompt,
    )


def final(*reasons: str, prompt: int = 3, completion: int = 2) -> Final:
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
    return Final(seq=9, finish_reasons=reasons, usage=usage)  # type: ignore[arg-type]


def test_echo_with_logprobs_lists_the_prompt_then_the_completion() -> None:
    asm = TextFull(META, plan=TextPlan(n=1, echo=(HELLO,), top=1))
    asm.tokens(tok(1, " w", logprobs=generated((" w", -0.7)), prompt=PROMPT))
    asm.tokens(tok(2, "or", finish="length", logprobs=generated(("or", -0.2))))
    choice = asm.response(final("length"))["choices"][0]
    assert choice["text"] == "Hello wor"
    assert choice["logprobs"] == {
        "tokens": ["H", "ell", "o", " w", "or"],
        "token_logprobs": [None, -2.0, -3.0, -0.7, -0.2],
        # the token itself, then up to ``logprobs`` alternatives: one more entry than asked
        "top_logprobs": [
            None,
            {"ell": -2.0, " HTTP": -1.0},
            {"o": -3.0, "ome": -0.5},
            {" w": -0.7, " w?": -1.7},
            {"or": -0.2, "or?": -1.2},
        ],
        "text_offset": [0, 1, 4, 5, 7],
    }


def test_logprobs_zero_lists_each_token_alone() -> None:
    asm = TextFull(META, plan=TextPlan(n=1, top=0))
    asm.tokens(tok(1, "ab", finish="stop", logprobs=generated(("a", -1.0), ("b", -9e9))))
    logprobs = asm.response(final("stop"))["choices"][0]["logprobs"]
    assert logprobs["top_logprobs"] == [{"a": -1.0}, {"b": -9999.0}]
    assert logprobs["token_logprobs"] == [-1.0, -9999.0] and logprobs["text_offset"] == [0, 1]


def test_scoring_a_prompt_answers_the_prompt_alone() -> None:
    """max_tokens 0 with echo: the token generated to score the prompt is not shown."""
    plan = TextPlan(n=1, echo=(HELLO,), top=0, echo_only=True)
    whole = TextFull(META, plan=plan)
    whole.tokens(tok(1, "ome", finish="length", logprobs=generated(("ome", -0.5)), prompt=PROMPT))
    choice = whole.response(final("length", completion=1))["choices"][0]
    assert choice["text"] == "Hello" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["H", "ell", "o"]
    assert choice["logprobs"]["top_logprobs"] == [None, {"ell": -2.0}, {"o": -3.0}]
    streamed = TextStream(META, include_usage=False, plan=plan)
    (chunk,) = streamed.tokens(
        tok(1, "ome", finish="length", logprobs=generated(("ome", -0.5)), prompt=PROMPT)
    )
    assert chunk["choices"][0]["text"] == "Hello"
    assert chunk["choices"][0]["logprobs"]["tokens"] == ["H", "ell", "o"]
    assert chunk["choices"][0]["finish_reason"] == "length"


def test_scoring_a_prompt_ends_at_its_limit_even_when_the_scoring_step_sampled_the_end() -> None:
    """Sampled (not greedy), the one step run to score the prompt may draw the end of text: the
    answer still generated nothing, so it stopped at its limit of 0 tokens."""
    plan = TextPlan(n=1, echo=(HELLO,), top=0, echo_only=True)
    whole = TextFull(META, plan=plan)
    whole.tokens(tok(1, "", finish="stop", logprobs=generated(("", -0.5)), prompt=PROMPT))
    assert whole.response(final("stop", completion=1))["choices"][0]["finish_reason"] == "length"
    streamed = TextStream(META, include_usage=False, plan=plan)
    (chunk,) = streamed.tokens(tok(1, "", finish="stop", logprobs=generated(("", -0.5)), prompt=PROMPT))
    assert chunk["choices"][0]["text"] == "Hello" and chunk["choices"][0]["finish_reason"] == "length"
    echoed = TextFull(META, plan=TextPlan(n=1, echo=(HELLO,)))  # a real completion keeps its reason
    echoed.tokens(tok(1, "", finish="stop"))
    assert echoed.response(final("stop"))["choices"][0]["finish_reason"] == "stop"


def test_echo_without_logprobs_is_text_only() -> None:
    asm = TextFull(META, plan=TextPlan(n=1, echo=(HELLO,)))
    asm.tokens(tok(1, "!", finish="stop"))
    assert asm.response(final("stop"))["choices"][0] == {
        "index": 0,
        "text": "Hello!",
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_streamed_echo_comes_with_each_choices_first_text_and_offsets_run_on() -> None:
    plan = TextPlan(n=2, echo=(HELLO, Echo(text="Sea", first_token="S")), top=0)
    asm = TextStream(META, include_usage=False, plan=plan)
    sea = Logprobs(sampled=(-1.0,), texts=("ea",), top=(((9, -1.0, "ea"),),))
    chunks = [
        *asm.tokens(tok(1, " w", index=0, logprobs=generated((" w", -0.7)), prompt=PROMPT)),
        *asm.tokens(tok(2, "!", index=2, logprobs=generated(("!", -0.1)), prompt=sea)),
        *asm.tokens(tok(3, "or", index=0, logprobs=generated(("or", -0.2)))),
        *asm.tokens(tok(4, "?", index=1, finish="stop", logprobs=generated(("?", -0.3)))),
    ]
    choices = [c["choices"][0] for c in chunks]
    assert [(c["index"], c["text"]) for c in choices] == [
        (0, "Hello w"),
        (2, "Sea!"),
        (0, "or"),
        (1, "Hello?"),
    ]
    assert choices[0]["logprobs"]["tokens"] == ["H", "ell", "o", " w"]
    assert choices[1]["logprobs"]["tokens"] == ["S", "ea", "!"]  # prompt 1's own prompt
    assert choices[2]["logprobs"]["text_offset"] == [7]  # after "Hello w"
    assert choices[3]["logprobs"]["tokens"] == ["H", "ell", "o", "?"]  # the prompt is each choice's
    assert choices[3]["finish_reason"] == "stop"


def test_a_restart_forgets_the_first_attempt() -> None:
    asm = TextFull(META, plan=TextPlan(n=1, echo=(HELLO,), top=0))
    asm.tokens(tok(1, "zz", logprobs=generated(("zz", -5.0)), prompt=PROMPT))
    asm.restart()
    asm.tokens(tok(1, "!", finish="stop", logprobs=generated(("!", -0.1)), prompt=PROMPT))
    choice = asm.response(final("stop"))["choices"][0]
    assert choice["text"] == "Hello!" and choice["logprobs"]["tokens"] == ["H", "ell", "o", "!"]


def test_the_answer_is_what_the_openapi_document_says() -> None:
    from api.completions.protocol import TextCompletion

    asm = TextFull(META, plan=TextPlan(n=1, echo=(HELLO,), top=2))
    asm.tokens(tok(1, "!", finish="stop", logprobs=generated(("!", -0.1)), prompt=PROMPT))
    TextCompletion.model_validate(asm.response(final("stop")))
    json.dumps(asm.response(final("stop")), allow_nan=False)


# -- several prompts --------------------------------------------------------------------------------


def job(k: int) -> Job:
    return Job(
        id=f"req_x-{k}",
        tenant="t",
        model="m",
        prompt_token_ids=(1, 2, 3),
        sampling=Sampling(max_tokens=2, n=2),
        created_at=0.0,
    )


@dataclass
class Scripted:
    """A job's reply stream that plays given replies, each after a given delay."""

    job: Job
    script: list[tuple[float, Started | Tokens | Final | APIError]]
    restartable: bool = False
    error: str | None = None
    closed: bool = False
    finished: bool = False
    interrupted: list[APIError] = field(default_factory=list)

    async def __aiter__(self) -> AsyncIterator[Started | Tokens | Final]:
        for delay, reply in self.script:
            await asyncio.sleep(delay)
            if isinstance(reply, APIError):
                raise reply
            if isinstance(reply, Final):
                self.finished = True
            yield reply

    def interrupt(self, error: APIError) -> None:
        self.interrupted.append(error)

    def usage(self) -> Usage:
        return Usage(prompt_tokens=3, completion_tokens=4 if self.finished else 1)

    async def close(self, stop: bool = True) -> None:
        self.closed = True


def fan(
    *scripts: list[tuple[float, Started | Tokens | Final | APIError]], restartable: bool = False
) -> FanIn:
    streams = [Scripted(job(k), script) for k, script in enumerate(scripts)]
    fanned = FanIn(streams, n=2)  # type: ignore[arg-type]
    fanned.restartable = restartable
    return fanned


async def drain(fanned: FanIn) -> list[Tokens | Final]:
    try:
        return [reply async for reply in fanned]
    finally:
        await fanned.close()


def two_choices(finish: str = "length") -> list[tuple[float, Started | Tokens | Final | APIError]]:
    return [
        (0.0, Started(seq=0, worker="w", attempt=1)),
        (0.01, tok(1, "a", index=0)),
        (0.01, tok(2, "b", index=1)),
        (0.01, tok(3, "c", index=0, finish=finish)),
        (0.0, tok(4, "d", index=1, finish=finish)),
        (
            0.0,
            Final(seq=5, finish_reasons=(finish, finish), usage=Usage(prompt_tokens=3, completion_tokens=4)),
        ),  # type: ignore[arg-type]
    ]


async def test_choices_are_numbered_prompt_times_n_plus_choice_and_interleave() -> None:
    replies = await drain(fan(two_choices("length"), [(0.005, r) for _, r in two_choices("stop")]))
    tokens = [r for r in replies if isinstance(r, Tokens)]
    assert sorted((t.index, t.text) for t in tokens) == [
        (0, "a"),
        (0, "c"),
        (1, "b"),
        (1, "d"),
        (2, "a"),
        (2, "c"),
        (3, "b"),
        (3, "d"),
    ]
    order = [t.index for t in tokens]
    assert order != sorted(order), "streamed as they come, not one prompt after the other"
    last = replies[-1]
    assert isinstance(last, Final) and replies.count(last) == 1
    assert last.finish_reasons == ("length", "length", "stop", "stop")
    assert last.usage == Usage(prompt_tokens=6, completion_tokens=8)


async def test_held_until_each_job_ends_a_job_that_starts_over_replaces_its_first_attempt() -> None:
    again = [
        (0.0, Started(seq=0, worker="w1", attempt=1)),
        (0.0, tok(1, "LOST", index=0)),
        (0.02, Started(seq=0, worker="w2", attempt=2)),  # another worker, from the top
        *two_choices()[1:],
    ]
    replies = await drain(fan(two_choices(), again, restartable=True))
    texts = [(r.index, r.text) for r in replies if isinstance(r, Tokens)]
    assert (2, "LOST") not in texts and sorted(texts).count((2, "a")) == 1
    assert texts[:4] == [(0, "a"), (1, "b"), (0, "c"), (1, "d")], "a job's tokens stay together"


async def test_one_failing_job_fails_the_request_and_the_others_are_cancelled() -> None:
    slow = [(0.0, Started(seq=0, worker="w", attempt=1)), (30.0, tok(1, "never"))]
    failing = [
        (0.0, Started(seq=0, worker="w", attempt=1)),
        (0.01, UpstreamFailure("boom", code="worker_lost")),
    ]
    fanned = fan(slow, failing)
    with pytest.raises(UpstreamFailure):
        await asyncio.wait_for(drain(fanned), 5)
    assert fanned.error == "worker_lost"
    assert all(s.closed for s in fanned.streams)  # type: ignore[attr-defined]
    assert fanned.usage() == Usage(prompt_tokens=6, completion_tokens=2)


def test_the_request_final_puts_every_choice_in_its_place() -> None:
    finals = [
        Final(seq=3, finish_reasons=("stop", "length"), usage=Usage(prompt_tokens=4, completion_tokens=3)),
        Final(seq=2, finish_reasons=("length", "stop"), usage=Usage(prompt_tokens=2, completion_tokens=5)),
    ]
    whole = merged(finals)
    assert whole.finish_reasons == ("stop", "length", "length", "stop")
    assert whole.usage == Usage(prompt_tokens=6, completion_tokens=8)
