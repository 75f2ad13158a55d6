"""Files and batch results survive what can go wrong on the way to disk, against a real Redis and a
real directory: a file is synced before its record points at it, a batch's line results stay in
Redis until its result files read back whole, the byte counters are recounted from the records,
and partial uploads do not stay behind."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from batch.batches import Batches
from batch.files import Files
from batch.filestore import DirectoryStore, RedisStore, read_all
from batch.housekeeping import Housekeeping
from batch.role import Background
from control.redis_server import EmbeddedRedis
from shared.settings import BackgroundSettings
from shared.tenants import Tenant, TenantStore
from tests.test_batch_runs import lines, new_batch

T = Tenant(name="t", id="t")
"""The tenant of these tests' files and batches."""


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> BackgroundSettings:
    return BackgroundSettings(
        redis_url=redis_server.url, key_prefix="fs" + uuid.uuid4().hex[:8], files_dir=tmp_path
    )


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_a_file_is_synced_to_disk_before_it_is_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut must not leave a record pointing at a short file: the bytes and the directory
    entry are synced before the write returns (and the record is written only then)."""
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:  # records what each fsync covers, then does it
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, (tmp_path / "file-a").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store = DirectoryStore(tmp_path)
    assert await store.write("file-a", chunks(b"x" * 10, b"y" * 10)) == 20
    parts = [path for path, _ in synced if path.endswith(".part")]
    assert parts and all(not renamed for path, renamed in synced if path.endswith(".part")), synced
    assert (str(tmp_path), True) in synced, "the directory entry was not synced after the rename"
    assert (tmp_path / "file-a").read_bytes() == b"x" * 10 + b"y" * 10


class TornStore(DirectoryStore):
    """A store that loses a file's last chunk without noticing (what a disk or a network volume
    that acknowledges writes it never made does); the size it answers is the full one."""

    torn = True

    async def write(self, file_id: str, chunks: AsyncIterable[bytes]) -> int:
        parts = [chunk async for chunk in chunks]
        size = sum(len(p) for p in parts)
        kept = parts[:-1] if self.torn and len(parts) > 1 else parts

        async def again() -> AsyncIterator[bytes]:
            for part in kept:
                yield part

        await super().write(file_id, again())
        return size


async def test_line_results_stay_until_the_result_files_read_back_whole(
    redis: Redis, settings: BackgroundSettings
) -> None:
    await redis.hset(settings.names.models(), "m", "1")
    await TenantStore(redis, settings.names).put_tenant(T)
    batch_id = await new_batch(redis, settings, count=2500)  # result files of several chunks
    names, batches = settings.names, Batches(redis, settings)
    state = await batches.get(T, batch_id)
    await batches.move(batch_id, "in_progress", total=2500, model="m")
    await redis.hset(names.batch_results(batch_id), mapping={f"l{i}": json.dumps(
        {"custom_id": f"l{i}", "response": {"status_code": 200}}) for i in range(2500)})  # fmt: skip
    await batches.move(batch_id, "finalizing")
    background = Background(settings, redis, asyncio.Event())
    store = TornStore(settings.files_path / settings.key_prefix)
    background.runner._files.store = store  # the run's files go through the torn store

    assert await background.runner.run(batch_id) == "interrupted"
    kept = await batches.get(T, batch_id)
    assert kept.status == "finalizing" and kept.output_file_id is None
    assert await redis.hlen(names.batch_results(batch_id)) == 2500, "results went before the file was whole"

    store.torn = False  # the next run (the periodic check starts one) writes it whole
    assert await background.runner.run(batch_id) == "completed"
    done = await batches.get(T, batch_id)
    output = (await read_all(store, done.output_file_id or "")).splitlines()
    assert [json.loads(x)["custom_id"] for x in output] == [f"l{i}" for i in range(2500)]
    assert not await redis.exists(names.batch_results(batch_id))
    assert state.request.input_file_id != done.output_file_id


async def test_the_byte_counters_are_recounted_from_the_records(
    redis: Redis, settings: BackgroundSettings
) -> None:
    """A counter that drifted (a process killed between two steps, in an older release, or a
    reservation whose gateway died) would refuse every upload in the end; housekeeping puts it
    right, for the store and for each tenant."""
    names, files = settings.names, Files(redis, settings)
    kept = [
        await files.create(Tenant(name=t, id=t), "in.jsonl", "batch", io.BytesIO(lines(2)), 2, ttl=3600)
        for t in ("a", "b")
    ]
    lapsed = await files.reserve("a", 700, quota=None)
    await redis.zadd(names.file_reservation_expiry(), {lapsed: time.time() - 1})  # its gateway died
    live = await files.reserve("b", 300, quota=None)
    for key in (names.file_bytes(), names.tenant_file_bytes("a")):
        await redis.incrby(key, 10_000)  # drift
    result = await Housekeeping(redis, settings).recount_files()
    size = kept[0].bytes
    assert int(await redis.get(names.file_bytes())) == 2 * size + 300
    assert int(await redis.get(names.tenant_file_bytes("a"))) == size
    assert int(await redis.get(names.tenant_file_bytes("b"))) == size + 300
    assert result["reservations_lapsed"] == 1 and result["drift"] == 10_000
    await files.release(live)
    assert int(await redis.get(names.file_bytes())) == 2 * size


async def test_a_partial_upload_in_redis_expires(redis: Redis, settings: BackgroundSettings) -> None:
    """A gateway killed mid-upload cannot remove its partial copy: it must not stay for ever."""
    store = RedisStore(redis, settings.names)
    ttls: list[int] = []

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * 100
        parts = [k async for k in redis.scan_iter(settings.names.file_data("*.part"))]
        ttls.extend([await redis.ttl(k) for k in parts])  # half written: as a killed gateway leaves it
        yield b"b" * 100

    assert await store.write("file-x", slow()) == 200
    assert len(ttls) == 1 and 0 < ttls[0] <= 3600, ttls
    assert await redis.ttl(settings.names.file_data("file-x")) == -1, "the stored file must not expire"


async def test_partial_files_left_in_the_directory_are_swept(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    old, fresh = tmp_path / ".file-a.1234.part", tmp_path / ".file-b.5678.part"
    for part in (old, fresh):
        part.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    await store.write("file-c", chunks(b"kept"))
    assert await store.sweep_parts(older_than=3600) == 1
    assert not old.exists() and fresh.exists() and (tmp_path / "file-c").exists()
