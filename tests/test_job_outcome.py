"""The worker's decisions about a job, as tables: what goes out when (coalescing), how a resumed job
continues, and what a job that ends early does. Pure functions; no Redis, no engine."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from shared.messages import Logprobs, Sampling
from worker.coalesce import Chunk, Coalescer, EngineAborted, flush_interval, resumed
from worker.engine import Delta, EngineRejected, TokenLogprobs
from worker.outcome import Action, early_end


def d(index: int, ids: tuple[int, ...], finish: str | None = None) -> Delta:
    return Delta(index=index, text="x" * len(ids), token_ids=ids, finish_reason=finish)  # type: ignore[arg-type]


def sent(chunks: list[Chunk]) -> list[tuple[int, tuple[int, ...], str | None]]:
    return [(c.index, tuple(c.ids), c.finish) for c in chunks]


def test_first_token_of_each_choice_goes_out_at_once_then_at_the_ticks() -> None:
    c = Coalescer(n=2, now=0.0)
    assert sent(c.add([d(0, (1,))], now=0.001, interval=0.04)) == [(0, (1,), None)]  # opens: at once
    assert sent(c.add([d(0, (2,))], now=0.010, interval=0.04)) == []  # gathered until the 0.04 tick
    assert sent(c.add([d(0, (3,)), d(1, (7,))], now=0.020, interval=0.04)) == [
        (0, (2, 3), None),
        (1, (7,), None),
    ]
    assert sent(c.add([d(0, (4,))], now=0.030, interval=0.04)) == []  # the next tick is 0.04
    assert sent(c.add([d(0, (5,))], now=0.041, interval=0.04)) == [(0, (4, 5), None)]
    assert sent(c.add([d(1, (8,))], now=0.079, interval=0.04)) == []
    assert sent(c.add([d(1, (9,))], now=0.081, interval=0.04)) == [(1, (8, 9), None)]
    assert c.generated == 8


def test_every_job_flushes_on_the_same_ticks() -> None:
    """Jobs that started at different times flush in the same engine step after a tick."""
    jobs = [Coalescer(n=1, now=start) for start in (0.003, 0.017, 0.029)]
    for job, start in zip(jobs, (0.003, 0.017, 0.029), strict=True):
        job.add([d(0, (1,))], now=start, interval=0.04)  # first token: at once
    steps = [0.035, 0.045, 0.055, 0.085]
    flushed = [[bool(job.add([d(0, (2,))], now=t, interval=0.04)) for job in jobs] for t in steps]
    assert flushed == [[False] * 3, [True] * 3, [False] * 3, [True] * 3]


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [(0, 0.0025), (1, 0.0025), (4, 0.01), (16, 0.04), (32, 0.08), (40, 0.1), (256, 0.1)],
)
def test_the_flush_interval_grows_with_the_jobs_a_worker_runs(jobs: int, expected: float) -> None:
    """About 400 messages a second per worker, until the longest interval caps it."""
    assert flush_interval(0.04, 0.1, jobs) == pytest.approx(expected)


def test_once_every_choice_finished_the_rest_waits_for_the_final_message() -> None:
    c = Coalescer(n=1, now=0.0)
    assert sent(c.add([d(0, (1,))], now=0.0, interval=0.0)) == [(0, (1,), None)]
    assert sent(c.add([d(0, (2, 3), "length")], now=1.0, interval=0.0)) == []  # goes with the final
    ending = c.end()
    assert sent(ending.tail) == [(0, (2, 3), "length")]
    assert ending.finish_reasons == ("length",) and ending.generated == 3


def test_a_choice_that_did_not_finish_is_an_abort_not_a_stop() -> None:
    c = Coalescer(n=2, now=0.0)
    c.add([d(0, (1,), "stop"), d(1, (2,))], now=0.0, interval=0.04)
    with pytest.raises(EngineAborted):
        c.end()
    aborted = Coalescer(n=1, now=0.0)
    aborted.add([d(0, (1,), "abort")], now=0.0, interval=0.04)
    with pytest.raises(EngineAborted):
        aborted.end()


def test_a_resumed_job_counts_what_earlier_attempts_generated() -> None:
    c = Coalescer(n=1, now=0.0, prior=5)
    c.add([d(0, (9,), "stop")], now=0.0, interval=0.04)
    assert c.end().generated == 6
    nothing_left = Coalescer(n=1, now=0.0, prior=8)
    nothing_left.finish_all("length")
    ending = nothing_left.end()
    assert (ending.tail, ending.finish_reasons, ending.generated) == ([], ("length",), 8)


@pytest.mark.parametrize(
    ("max_tokens", "min_tokens", "prior", "expected"),
    [
        (10, 0, 0, (10, 0)),  # a first attempt runs as asked
        (10, 4, 3, (7, 1)),  # continue with what is left, minimum included
        (10, 4, 6, (4, 0)),
        (10, 0, 10, None),  # everything was generated: only the final message is missing
    ],
)
def test_resumed_sampling(
    max_tokens: int, min_tokens: int, prior: int, expected: tuple[int, int] | None
) -> None:
    s = resumed(Sampling(max_tokens=max_tokens, min_tokens=min_tokens, seed=3), prior)
    assert (None if s is None else (s.max_tokens, s.min_tokens)) == expected
    if s is not None:
        assert s.seed == 3


def test_the_prompts_log_probabilities_go_out_once_on_the_first_message() -> None:
    scored = TokenLogprobs(sampled=[-1.5, -0.5], texts=["b", "c"], top=[((1, -1.5, "b"),), ((2, -0.5, "c"),)])
    c = Coalescer(n=2, now=0.0)
    # they come with one choice's first delta, but go out on whichever message is published first
    first = c.add([d(0, (1,)), replace(d(1, (5,)), prompt_logprobs=scored)], now=0.0, interval=0.04)
    assert [(chunk.index, chunk.prompt) for chunk in first] == [
        (0, Logprobs(sampled=(-1.5, -0.5), texts=("b", "c"), top=(((1, -1.5, "b"),), ((2, -0.5, "c"),)))),
        (1, None),
    ]
    c.add([d(0, (2,), "stop"), d(1, (6,), "stop")], now=1.0, interval=0.04)
    assert [chunk.prompt for chunk in c.end().tail] == [None, None]


def test_a_resumed_job_does_not_ask_for_the_prompts_log_probabilities_again() -> None:
    asked = Sampling(max_tokens=10, logprobs=1, prompt_logprobs=1)
    assert resumed(asked, 0) == asked
    again = resumed(asked, 4)
    assert again is not None and (again.prompt_logprobs, again.logprobs) == (None, 1)


CANCELLED = asyncio.CancelledError()
SHUTDOWN = Action("fail", 503, "worker_shutdown", "the worker stopped before the job finished")


@pytest.mark.parametrize(
    ("error", "stop", "n", "stopping", "expected"),
    [
        # cancelled: another worker took it over -> say nothing, touch nothing
        (CANCELLED, "lost", 1, False, Action("nothing")),
        (CANCELLED, "lost", 2, True, Action("nothing")),
        # cancelled: the client left -> end the job without a word
        (CANCELLED, "client", 1, False, Action("acknowledge")),
        (CANCELLED, "client", 3, True, Action("acknowledge")),
        # cancelled by the worker's shutdown -> hand back what can be resumed, fail the rest
        (CANCELLED, None, 1, True, Action("hand_back")),
        (CANCELLED, None, 2, True, SHUTDOWN),
        # stopped to make room for another tenant's job -> parked here, to resume from its progress
        (CANCELLED, "preempted", 1, False, Action("park")),
        # the engine refused the request -> the client's fault, whatever else holds
        (EngineRejected("bad top_k"), None, 1, False, Action("fail", 400, "invalid_request", "bad top_k")),
        (EngineRejected("bad"), None, 1, True, Action("fail", 400, "invalid_request", "bad")),
        # the engine died with the stopping worker -> resumable jobs go back to the queue
        (RuntimeError("engine dead"), None, 1, True, Action("hand_back")),
        (EngineAborted("cut"), None, 1, True, Action("hand_back")),
        (EngineAborted("cut"), None, 2, True, Action("fail", 503, "engine_aborted", "cut")),
        (EngineAborted("cut"), None, 1, False, Action("fail", 503, "engine_aborted", "cut")),
        # anything else is a defect: reported to the client and logged with its traceback
        (
            KeyError("x"),
            None,
            1,
            False,
            Action("fail", 500, "engine_error", "generation failed: KeyError", unexpected=True),
        ),
        (
            RuntimeError("x"),
            None,
            2,
            True,
            Action("fail", 500, "engine_error", "generation failed: RuntimeError", unexpected=True),
        ),
    ],
)
def test_a_job_that_ends_early(
    error: BaseException, stop: str | None, n: int, stopping: bool, expected: Action
) -> None:
    assert early_end(error, stop, n, stopping) == expected  # type: ignore[arg-type]
