"""The Files API with the official SDK: uploads checked line by line, listing with a cursor, content,
deletion, expiry requests; and size bounds on a gateway of its own that keeps files in Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from redis import Redis as SyncRedis

from control.processes import free_port
from shared.names import Names
from shared.tenants import Tenant
from tests.conftest import System, create_tenant
from tests.procs import spawn, stop, wait_until
from tests.test_e2e_batches import chat_line, jsonl

pytestmark = pytest.mark.e2e


def upload(client: OpenAI, data: bytes, name: str = "in.jsonl", **extra: Any) -> Any:
    return client.files.create(file=(name, data), purpose="batch", **extra)


def test_a_file_round_trips(client: OpenAI, system: System) -> None:
    data = jsonl([chat_line(f"f{i}", system.model) for i in range(3)])
    created = upload(client, data, "mine.jsonl")
    assert (created.object, created.purpose, created.bytes, created.filename) == (
        "file",
        "batch",
        len(data),
        "mine.jsonl",
    )
    assert created.id.startswith("file-") and created.expires_at and created.expires_at > created.created_at
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)


def test_files_are_listed_with_a_cursor(client: OpenAI, system: System) -> None:
    ids = [upload(client, jsonl([chat_line("x", system.model)])).id for _ in range(3)]
    newest = client.files.list(limit=2, purpose="batch")
    assert [f.id for f in newest.data] == ids[::-1][:2] and newest.has_more
    rest = client.files.list(limit=2, after=ids[1], purpose="batch")
    assert rest.data[0].id == ids[0]
    oldest_first = [f.id for f in client.files.list(order="asc", purpose="batch")]
    assert oldest_first.index(ids[0]) < oldest_first.index(ids[1]) < oldest_first.index(ids[2])
    paged = [f.id for f in client.files.list(limit=1, purpose="batch")]  # the SDK follows the cursor
    assert set(ids) <= set(paged)
    with pytest.raises(openai.BadRequestError):
        client.files.list(after="file-" + "0" * 24)


BAD_FILES = {
    "bad JSON": (b'{"custom_id": "a"\n', "line 1: not valid JSON"),
    "duplicate custom_id": (None, "line 3: custom_id 'a' appears more than once"),
    "wrong url": (
        b'{"custom_id": "a", "method": "POST", "url": "/v1/moderations", "body": {}}\n',
        "line 1: url must be",
    ),
    "a body the endpoint refuses": (None, "line 2: invalid 'body.temperature'"),
    "empty": (b"\n\n", "the file has no requests"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_refused_naming_its_lines_and_nothing_is_stored(
    client: OpenAI, system: System, case: str
) -> None:
    data, says = BAD_FILES[case]
    if case == "duplicate custom_id":
        data = jsonl(
            [chat_line("a", system.model), chat_line("b", system.model), chat_line("a", system.model)]
        )
    if case == "a body the endpoint refuses":
        data = jsonl([chat_line("a", system.model), chat_line("b", system.model, temperature=7)])
    before = [f.id for f in client.files.list()]
    with pytest.raises(openai.BadRequestError) as refused:
        upload(client, data)
    assert says in refused.value.message and refused.value.code == "invalid_file"
    assert [f.id for f in client.files.list()] == before


def test_uploads_take_batch_files_and_their_expiry(client: OpenAI, system: System) -> None:
    data = jsonl([chat_line("a", system.model)])
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("a.jsonl", data), purpose="fine-tune")
    assert purpose.value.param == "purpose"
    soon = upload(client, data, expires_after={"anchor": "created_at", "seconds": 3600})
    assert soon.expires_at == soon.created_at + 3600
    with pytest.raises(openai.BadRequestError):
        upload(client, data, expires_after={"anchor": "created_at", "seconds": 60})


def test_the_input_of_an_unfinished_batch_cannot_be_deleted(client: OpenAI, system: System) -> None:
    source = upload(client, jsonl([chat_line("a", system.model)]))
    batch = client.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.ConflictError):
        client.files.delete(source.id)
    client.batches.cancel(batch.id)  # a jobs process finishes the cancel whenever one runs


# -- bounds, on a gateway of its own ---------------------------------------------------------------

SMALL_FILE, SMALL_STORE = 2000, 3000


@pytest.fixture(scope="module")
def small(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Names]]:
    """A gateway keeping files in Redis, at most SMALL_FILE bytes each and SMALL_STORE in all."""
    prefix, port = "small" + uuid.uuid4().hex[:6], free_port()
    key = asyncio.run(create_tenant(system.redis_url, Names(prefix), Tenant(name="small")))
    log = tmp_path_factory.mktemp("small") / "gateway.log"
    env = {
        **system.env(),
        "SWITCHYARD_KEY_PREFIX": prefix,
        "SWITCHYARD_PORT": str(port),
        "SWITCHYARD_FILE_STORE": "redis",
        "SWITCHYARD_FILE_MAX_BYTES": str(SMALL_FILE),
        "SWITCHYARD_FILES_MAX_TOTAL_BYTES": str(SMALL_STORE),
    }
    proc: subprocess.Popen[bytes] = spawn("gateway", env, log)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "small gateway", procs=(proc,), logs=(log,))
        yield base, key, Names(prefix)
    finally:
        stop(proc)


def padded(size: int) -> bytes:
    """One valid line of exactly ``size`` bytes."""
    line = {
        "custom_id": "p",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "m", "prompt": ""},
    }
    empty = len(json.dumps(line)) + 1
    line["body"]["prompt"] = "x" * (size - empty)  # type: ignore[index]
    return (json.dumps(line) + "\n").encode()


def test_files_are_bounded_one_by_one_and_in_all(small: tuple[str, str, Names], system: System) -> None:
    base, key, names = small
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as too_big:
        upload(client, padded(SMALL_FILE + 1))
    assert too_big.value.status_code == 413
    first = upload(client, padded(1500))
    assert client.files.content(first.id).content == padded(1500)  # bytes kept in Redis
    with pytest.raises(openai.APIStatusError) as full:
        upload(client, padded(1600))
    assert full.value.status_code == 413 and full.value.code == "storage_full"
    client.files.delete(first.id)
    second = upload(client, padded(1600))
    assert second.bytes == 1600
    redis = SyncRedis.from_url(system.redis_url)
    try:
        assert not redis.exists(names.file_data(first.id)) and redis.exists(names.file_data(second.id))
        assert int(redis.get(names.file_bytes())) == 1600
    finally:
        redis.close()


def test_a_chunked_upload_past_the_cap_is_cut_off(small: tuple[str, str, Names]) -> None:
    base, key, _ = small
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()

    def body() -> Iterator[bytes]:  # no content-length: the size shows only as it arrives
        yield head
        for _ in range(100):
            yield b"x" * 1000

    resp = httpx.post(
        f"{base}/v1/files",
        content=body(),
        headers={
            "authorization": f"Bearer {key}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
        timeout=10,
    )
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"
