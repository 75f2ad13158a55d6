"""Embeddings without an engine: the request body, the wire's vectors, the answer in both encodings,
the checks an embedding job passes before it is enqueued, and batch lines for the endpoint."""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.chat.protocol import ChatCompletionRequest
from api.embeddings.assembly import PIECE_VALUES, EmbeddingAnswer
from api.embeddings.protocol import MAX_INPUTS, EmbeddingRequest
from api.errors import InvalidRequest
from batch.lines import LineRefused, parse_line
from gateway.app import validation_error
from serving.embeddings import MAX_TOTAL_TOKENS, check_dimensions, fit, prepare_embedding
from serving.path import JobBuilder
from serving.registry import ModelEntry
from serving.tokenizer import TokenizerCache
from shared.messages import (
    EMBED_VERSION,
    EmbeddingModel,
    Final,
    Job,
    Sampling,
    Usage,
    Vectors,
    WireError,
    decode_job,
    decode_reply,
    encode,
    floats,
)
from shared.tenants import Tenant
from worker.embedding import batches


def vector(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def first_error(body: dict) -> InvalidRequest:
    with pytest.raises(ValidationError) as info:
        EmbeddingRequest.model_validate(body)
    return validation_error([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])


# -- the request -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "inputs", "listed"),
    [
        ("hello", ["hello"], False),
        (["a", "b"], ["a", "b"], True),
        ([1, 2, 3], [[1, 2, 3]], False),
        ([[1, 2], [3]], [[1, 2], [3]], True),
    ],
)
def test_every_form_of_input_is_a_list_of_inputs(given: object, inputs: list, listed: bool) -> None:
    body = EmbeddingRequest.model_validate({"model": "m", "input": given})
    assert body.inputs() == inputs
    assert body.listed() is listed
    assert body.encoding_format == "float"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": ["a", ""]}, "input.1"),
        ({"model": "m", "input": ["a"] * (MAX_INPUTS + 1)}, "input"),
        ({"model": "m", "input": [1, -2]}, "input.1"),
        ({"model": "m", "input": [[1], []]}, "input.1"),
        ({"model": "m", "input": ["a", 1]}, "input.1"),
        ({"model": "m", "input": "x", "encoding_format": "bytes"}, "encoding_format"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "m", "input": "x", "user": "u" * 513}, "user"),
        ({"model": "m", "input": "x", "normalize": True}, "normalize"),
    ],
)
def test_invalid_bodies_name_their_param(body: dict, param: str) -> None:
    assert first_error(body).param == param


def test_the_sdks_fields_are_all_accepted() -> None:
    body = EmbeddingRequest.model_validate(
        {"model": "m", "input": ["a"] * MAX_INPUTS, "encoding_format": "base64", "dimensions": 8, "user": "u"}
    )
    assert len(body.inputs()) == MAX_INPUTS


# -- the wire --------------------------------------------------------------------------------------


def test_vectors_round_trip_as_little_endian_float32() -> None:
    vectors = [vector(1.0, -0.5, 0.25), vector(3.0, 2.0, 1.0)]
    message = Vectors.pack(seq=4, start=10, vectors=vectors)
    assert (message.count, message.dim) == (2, 3)
    back = decode_reply(encode(message))
    assert isinstance(back, Vectors)
    assert back.raw() == vectors
    assert floats(back.raw()[0]) == [1.0, -0.5, 0.25]


def test_vectors_that_do_not_add_up_are_a_wire_error() -> None:
    message = Vectors.pack(seq=1, start=0, vectors=[vector(1.0, 2.0)])
    with pytest.raises(WireError):
        message.model_copy(update={"count": 2}).raw()
    with pytest.raises(WireError):
        message.model_copy(update={"data": "not base64!"}).raw()


def embedding_job(lengths: tuple[int, ...], v: int = EMBED_VERSION) -> Job:
    return Job.model_validate(
        {
            "v": v,
            "id": "req_e",
            "tenant": "t",
            "model": "m",
            "prompt_token_ids": list(range(sum(lengths))),
            "sampling": {"max_tokens": 0},
            "created_at": 1.0,
            "embed": {"lengths": list(lengths), "dimensions": 4},
        }
    )


def test_an_embedding_job_splits_its_token_ids_into_inputs() -> None:
    job = decode_job(encode(embedding_job((2, 1, 3))))
    assert job.embed is not None
    assert [list(i) for i in job.embed.inputs(job.prompt_token_ids)] == [[0, 1], [2], [3, 4, 5]]


def test_an_embedding_job_is_its_own_version_and_must_add_up() -> None:
    with pytest.raises(WireError):  # a release that cannot embed would run it
        decode_job(encode(embedding_job((2,), v=EMBED_VERSION - 1)))
    bad = encode(embedding_job((2, 2))).replace('"lengths":[2,2]', '"lengths":[2,3]')
    with pytest.raises(WireError):
        decode_job(bad)


@pytest.mark.parametrize(
    ("sizes", "limit", "runs"),
    [
        ([], 100, []),
        ([40, 40, 40], 100, [(0, 2), (2, 1)]),
        ([40, 40, 20], 100, [(0, 3)]),
        ([150, 10], 100, [(0, 1), (1, 1)]),
        ([10] * 5, 10, [(i, 1) for i in range(5)]),
    ],
)
def test_vectors_go_out_in_messages_of_bounded_size(
    sizes: list[int], limit: int, runs: list[tuple[int, int]]
) -> None:
    vectors = [bytes(n) for n in sizes]
    got = batches(vectors, limit)
    assert [(start, len(run)) for start, run in got] == runs
    assert [v for _, run in got for v in run] == vectors


# -- the answer ------------------------------------------------------------------------------------


def answer(encoding: str = "float", count: int = 3) -> EmbeddingAnswer:
    return EmbeddingAnswer(id="embd-1", created=7, model="m", count=count, encoding=encoding)  # type: ignore[arg-type]


USAGE = Usage(prompt_tokens=9, completion_tokens=0)


def test_the_answer_has_openais_shape_in_input_order() -> None:
    gathered = answer()
    gathered.add(Vectors.pack(seq=2, start=2, vectors=[vector(0.5, 0.5)]))
    gathered.add(Vectors.pack(seq=1, start=0, vectors=[vector(1.0, 0.0), vector(0.0, 1.0)]))
    body = gathered.body(USAGE)
    assert body["object"] == "list" and body["model"] == "m" and body["id"] == "embd-1"
    assert body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert {d["object"] for d in body["data"]} == {"embedding"}
    assert [d["embedding"] for d in body["data"]] == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]


def test_base64_is_the_vectors_little_endian_float32_bytes() -> None:
    gathered = answer("base64", count=1)
    gathered.add(Vectors.pack(seq=1, start=0, vectors=[vector(0.1, -2.0)]))
    encoded = gathered.body(USAGE)["data"][0]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(encoded)) == struct.unpack("<2f", vector(0.1, -2.0))


def test_the_answer_written_in_pieces_is_the_same_json() -> None:
    count, dim = 40, 1024
    gathered = answer(count=count)
    gathered.add(Vectors.pack(seq=1, start=0, vectors=[vector(*[i / 7] * dim) for i in range(count)]))
    pieces = list(gathered.pieces(USAGE))
    assert len(pieces) == count * dim // PIECE_VALUES + 1
    assert json.loads(b"".join(pieces)) == gathered.body(USAGE)


def test_a_restart_forgets_the_vectors_and_stray_ones_are_refused() -> None:
    gathered = answer(count=2)
    gathered.add(Vectors.pack(seq=1, start=0, vectors=[vector(1.0)]))
    assert gathered.missing() == 1
    gathered.restart()
    assert gathered.missing() == 2
    with pytest.raises(WireError):
        gathered.add(Vectors.pack(seq=1, start=1, vectors=[vector(1.0), vector(2.0)]))


# -- checks before enqueueing ----------------------------------------------------------------------

EMBED = ModelEntry(
    name="e", tokenizer="-", max_model_len=16, created=0, embedding=EmbeddingModel(size=128, matryoshka=True)
)
CHAT = ModelEntry(name="c", tokenizer="-", max_model_len=16, created=0)


@pytest.mark.parametrize(
    ("spec", "dimensions", "ok"),
    [
        (EmbeddingModel(size=128), None, True),
        (EmbeddingModel(size=128), 64, False),
        (EmbeddingModel(size=128, matryoshka=True), 64, True),
        (EmbeddingModel(size=128, matryoshka=True), 128, True),
        (EmbeddingModel(size=128, matryoshka=True), 129, False),
        (EmbeddingModel(size=128, matryoshka=True, dimensions=(32, 64)), 64, True),
        (EmbeddingModel(size=128, matryoshka=True, dimensions=(32, 64)), 48, False),
    ],
)
def test_dimensions_as_vllm_checks_them(spec: EmbeddingModel, dimensions: int | None, ok: bool) -> None:
    if ok:
        check_dimensions(EMBED, spec, dimensions)
        return
    with pytest.raises(InvalidRequest) as info:
        check_dimensions(EMBED, spec, dimensions)
    assert info.value.param == "dimensions"


def test_inputs_must_fit_the_context_each_and_the_bound_together() -> None:
    fit([[1] * 16, [2]], ["input.0", "input.1"], 16)  # an input may fill the whole context
    with pytest.raises(InvalidRequest) as info:
        fit([[1], [2] * 17], ["input.0", "input.1"], 16)
    assert (info.value.param, info.value.code) == ("input.1", "context_length_exceeded")
    with pytest.raises(InvalidRequest) as info:
        fit([[1], []], ["input.0", "input.1"], 16)
    assert info.value.param == "input.1"
    with pytest.raises(InvalidRequest) as info:
        fit([[1] * 1000] * (MAX_TOTAL_TOKENS // 1000 + 1), ["input"] * 301, 1000)
    assert info.value.param == "input"


@pytest.fixture(scope="module")
def tokenizers() -> TokenizerCache:
    return TokenizerCache()


def entry(base: ModelEntry, model_dir: Path) -> ModelEntry:
    return replace(base, tokenizer=str(model_dir))


TENANT = Tenant(name="t")


async def test_an_embeddings_request_becomes_one_job_of_every_input(
    tokenizers: TokenizerCache, demo_model_dir: Path
) -> None:
    body = EmbeddingRequest.model_validate(
        {"model": "e", "input": ["hello", "a longer text"], "dimensions": 32, "encoding_format": "base64"}
    )
    prepared = await prepare_embedding(tokenizers, entry(EMBED, demo_model_dir), body, TENANT, "req_1")
    job = decode_job(encode(prepared.job))
    assert job.embed is not None and job.embed.dimensions == 32 and job.v == EMBED_VERSION
    tokens = await tokenizers.get(str(demo_model_dir))
    assert [list(i) for i in job.embed.inputs(job.prompt_token_ids)] == [
        tokens.text("hello"),
        tokens.text("a longer text"),
    ]
    assert job.sampling.max_tokens == 0  # admission reserves the inputs' tokens and nothing more
    assert prepared.answer.count == 2 and prepared.answer.encoding == "base64"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "dimensions": 500}, "dimensions"),
        ({"input": [5, 99999]}, "input"),
        ({"input": [[1], [7] * 17]}, "input.1"),
        ({"input": ["ok", "word " * 400]}, "input.1"),
    ],
)
async def test_what_the_model_refuses_is_a_400_before_anything_is_enqueued(
    tokenizers: TokenizerCache, demo_model_dir: Path, body: dict, param: str
) -> None:
    request = EmbeddingRequest.model_validate({"model": "e", **body})
    with pytest.raises(InvalidRequest) as info:
        await prepare_embedding(tokenizers, entry(EMBED, demo_model_dir), request, TENANT, "req_2")
    assert info.value.param == param


async def test_each_kind_of_model_answers_only_its_own_endpoint(
    tokenizers: TokenizerCache, demo_model_dir: Path
) -> None:
    request = EmbeddingRequest.model_validate({"model": "c", "input": "x"})
    with pytest.raises(InvalidRequest) as info:
        await prepare_embedding(tokenizers, entry(CHAT, demo_model_dir), request, TENANT, "req_3")
    assert info.value.param == "model"
    chat = ChatCompletionRequest.model_validate(
        {"model": "e", "messages": [{"role": "user", "content": "x"}]}
    )
    builder = JobBuilder(registry=None, tokenizers=tokenizers, max_n=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as info:
        await builder.chat(entry(EMBED, demo_model_dir), chat, TENANT, "req_4")
    assert info.value.param == "model"


def test_the_vectors_and_the_final_message_end_an_embedding_job() -> None:
    final = Final(seq=3, finish_reasons=(), usage=USAGE)
    assert decode_reply(encode(final)) == final
    assert Sampling(max_tokens=0).version == 1


# -- batches ---------------------------------------------------------------------------------------


def test_a_batch_takes_embedding_lines_checked_as_the_endpoint_checks_them() -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "e", "input": "x"}}
    parsed = parse_line(1, json.dumps(line), max_n=1)
    assert isinstance(parsed.body, EmbeddingRequest) and parsed.model == "e"
    bad = {**line, "body": {"model": "e", "input": "x", "stream": True}}
    with pytest.raises(LineRefused) as info:
        parse_line(2, json.dumps(bad), max_n=1)
    assert info.value.error.param == "body.stream"
