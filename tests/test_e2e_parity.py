"""Shape parity with vLLM's own OpenAI server, on the bodies agents send most.

vLLM's answers are the parity study's (``python -m loadtest parity``), kept with its results: its
``same-engine`` pairing ran vLLM's server on the demo model with the tool-call path and grammar
settings Switchyard's workers use. Starting that server beside the session's engine would double the
suite's engines for a handful of answers, so each body goes to the session's system only, and every
difference from vLLM's kept answer (status, finish reason, the keys and types of the body or of
every kind of chunk) must be one the study explains as intended or as vLLM's own defect
(``loadtest/parityreport.py``). A new vLLM, or a new body here, means running the study again.
"""

from __future__ import annotations

import pytest

from loadtest.parity import ask
from loadtest.paritycases import CHECKED_IN_CI, case
from loadtest.parityreport import CaseResult, judge_case
from loadtest.parityshape import Answer
from loadtest.report import RESULTS, read_json
from tests.conftest import System

pytestmark = pytest.mark.e2e

STUDY = RESULTS / "2026-12-06-parity"
PAIR = "same-engine"
REFUSED = {
    "sampling_refused_stream": "n",
    "min_over_max_stream": "min_tokens",
    "bad_schema_stream": "response_format",
}
"""Streamed bodies refused before anything is sent, and the parameter the 400 names."""


@pytest.fixture(scope="module")
def theirs() -> dict[str, Answer]:
    """vLLM's answers to every body, as the study kept them."""
    (pair,) = [doc for doc in read_json(STUDY / "answers.json") if doc["pair"] == PAIR]
    return {name: Answer(**answers["vllm"]) for name, answers in pair["answers"].items()}


def judged(name: str, theirs: dict[str, Answer], system: System) -> CaseResult:
    body = case(name)
    ours = ask(f"{system.base_url}/v1", system.api_key, system.model, [body])[name]
    result = judge_case(body, PAIR, theirs[name], ours)
    found = list(zip(result.differences, result.explanations, strict=True))
    unexplained = [str(diff) for diff, known in found if known is None]
    assert not unexplained, f"differences from vLLM's answer nobody has explained: {unexplained}"
    defects = [f"{diff}: {known.why}" for diff, known in found if known and known.verdict == "Switchyard"]
    assert not defects
    return result


def test_the_kept_answers_are_those_of_the_vllm_installed(theirs: dict[str, Answer]) -> None:
    import vllm

    fingerprint = theirs["plain_chat"].body["system_fingerprint"]
    assert fingerprint.startswith(f"vllm-{vllm.__version__}-"), "run python -m loadtest parity again"
    assert set(CHECKED_IN_CI) | set(REFUSED) <= set(theirs)


@pytest.mark.parametrize("name", CHECKED_IN_CI)
def test_the_answer_has_the_shape_of_vllms(name: str, theirs: dict[str, Answer], system: System) -> None:
    result = judged(name, theirs, system)
    ours = result.switchyard
    assert ours.status == 200 and (ours.done or not ours.streamed)
    assert result.switchyard_breaks in (None, ""), result.switchyard_breaks
    assert result.switchyard_output.finish_reason in ("stop", "tool_calls", "length")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_stream_vllm_refuses_is_a_400_before_it_starts(
    name: str, theirs: dict[str, Answer], system: System
) -> None:
    result = judged(name, theirs, system)
    assert result.switchyard.status == 400
    assert result.switchyard.body["error"]["param"] == REFUSED[name]
