"""A worker as shipped compiles its model wherever vLLM can (on a CPU host: with a C++ compiler) and
scores a prompt as an eager one does: the real engine, started without ``SWITCHYARD_ENFORCE_EAGER``,
beside the session's eager worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import System, forget_workers, worker_env
from tests.procs import spawn, stop, wait_until
from worker.vllm_engine import cxx_compiler

# A first compile takes tens of seconds on two cores, minutes when they are busy.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODEL = "compiled-demo"
LOGPROB_TOLERANCE = 1e-3
"""Compiled kernels sum in another order than eager ones: the same weights agree to about 1e-5."""


@pytest.fixture(scope="module")
def compiled_worker(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A worker of its own model with the engine settings as shipped; its log."""
    env = worker_env(
        system.env(), system.model_dir, SWITCHYARD_WORKER_ID="compiled-w", SWITCHYARD_SERVED_MODEL_NAME=MODEL
    )
    del env["SWITCHYARD_ENFORCE_EAGER"]
    log = tmp_path_factory.mktemp("compiled") / "worker.log"
    proc = spawn("worker", env, log)
    try:
        serving = b"worker compiled-w serving"
        wait_until(lambda: serving in log.read_bytes(), 600, "worker", procs=(proc,), logs=(log,))
        yield log
    finally:
        stop(proc, grace=1)
        forget_workers(system, MODEL, "compiled-w")


def test_a_worker_as_shipped_compiles_where_it_can_and_scores_as_an_eager_one(
    client: OpenAI, system: System, compiled_worker: Path
) -> None:
    said = "graph compilation: on" if cxx_compiler() else "graph compilation: off (eager)"
    assert said.encode() in compiled_worker.read_bytes()
    body = {"prompt": "The harbour at night was quiet", "max_tokens": 0, "echo": True, "logprobs": 1}
    compiled = client.completions.create(model=MODEL, **body).choices[0].logprobs
    eager = client.completions.create(model=system.model, **body).choices[0].logprobs
    assert compiled is not None and eager is not None
    assert compiled.tokens == eager.tokens and compiled.token_logprobs and eager.token_logprobs
    assert len(compiled.token_logprobs) > 3 and compiled.token_logprobs[0] is None
    pairs = list(zip(compiled.token_logprobs[1:], eager.token_logprobs[1:], strict=True))
    assert all(a is not None and b is not None and abs(a - b) < LOGPROB_TOLERANCE for a, b in pairs), pairs
    hello = [{"role": "user", "content": "Hello"}]
    answer = client.chat.completions.create(
        model=MODEL,
        messages=hello,
        max_tokens=16,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 16
    assert answer.choices[0].finish_reason == "length"
