"""Files of the Batch API: each tenant's uploads and batch results, their records in Redis and their
bytes in the file store, with a bound on the bytes all files may take and an expiry for each.

A file belongs to the tenant that created it; any other tenant is told it does not exist, exactly
as for an id that never did.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import IO, Literal

import anyio
from redis.asyncio import Redis

from api.errors import APIError, InvalidRequest, NotFound
from batch.filestore import CHUNK, FileStore, MissingFile, file_store
from shared.batches import BatchRequest, FilePurpose, FileRecord, is_file_id
from shared.names import Names
from shared.settings import GatewaySettings

Order = Literal["asc", "desc"]


class StorageFull(APIError):
    status = 413
    type = "invalid_request_error"
    code = "storage_full"


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def file_object(record: FileRecord) -> dict[str, object]:
    """OpenAI's ``file`` object."""
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


async def _chunks_of(source: IO[bytes]) -> AsyncIterator[bytes]:
    """A local (spooled) file's bytes, read off the event loop."""
    while chunk := await anyio.to_thread.run_sync(source.read, CHUNK):
        yield chunk


@dataclass
class Page:
    records: list[FileRecord]
    has_more: bool


class Files:
    def __init__(self, redis: Redis, settings: GatewaySettings, store: FileStore | None = None) -> None:
        self._redis = redis
        self._names: Names = settings.names
        self._settings = settings
        self.store = store or file_store(settings, redis)

    async def create(
        self, tenant: str, filename: str, purpose: FilePurpose, source: IO[bytes], lines: int, ttl: float
    ) -> FileRecord:
        """Store an upload (``source``, already checked) as a new file of ``tenant``."""
        source.seek(0, 2)
        size = source.tell()
        source.seek(0)
        await self._reserve(size)
        record = self._record(new_file_id(), tenant, filename, purpose, size, lines, ttl)
        try:
            await self.store.write(record.id, _chunks_of(source))
            await self._index(record)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._redis.decrby(self._names.file_bytes(), size)
                await self.store.delete(record.id)
            raise
        return record

    async def put(
        self,
        tenant: str,
        file_id: str,
        filename: str,
        chunks: AsyncIterable[bytes],
        lines: int,
        ttl: float,
    ) -> FileRecord:
        """Store a file the system produced (a batch's output) under a given id, replacing any
        earlier one: writing it again after an interruption leaves one file, not two. Counted in
        the store's bytes but never refused for them: a finished batch's results are not dropped."""
        old = await self._load(file_id)
        size = await self.store.write(file_id, chunks)
        record = self._record(file_id, tenant, filename, "batch_output", size, lines, ttl)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(self._names.file_bytes(), size - (old.bytes if old else 0))
            self._index_into(pipe, record)
            await pipe.execute()
        return record

    def _record(
        self, file_id: str, tenant: str, name: str, purpose: FilePurpose, size: int, lines: int, ttl: float
    ) -> FileRecord:
        now = time.time()
        return FileRecord(
            id=file_id,
            tenant=tenant,
            filename=name,
            purpose=purpose,
            bytes=size,
            lines=lines,
            created_at=int(now),
            expires_at=int(now + ttl),
        )

    async def _reserve(self, size: int) -> None:
        cap = self._settings.files_max_total_bytes
        total = int(await self._redis.incrby(self._names.file_bytes(), size))
        if total > cap:
            await self._redis.decrby(self._names.file_bytes(), size)
            raise StorageFull(
                f"the file store is full ({total - size} of {cap} bytes used); delete files or wait "
                "for them to expire",
                param="file",
            )

    async def _index(self, record: FileRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._index_into(pipe, record)
            await pipe.execute()

    def _index_into(self, pipe: object, record: FileRecord) -> None:
        n = self._names
        pipe.set(n.file(record.id), record.model_dump_json())  # type: ignore[attr-defined]
        # Milliseconds, not the record's seconds: files listed in the order they were made.
        pipe.zadd(n.files(record.tenant), {record.id: time.time() * 1000})  # type: ignore[attr-defined]
        if record.expires_at is not None:
            pipe.zadd(n.file_expiry(), {record.id: record.expires_at})  # type: ignore[attr-defined]

    async def _load(self, file_id: str) -> FileRecord | None:
        raw = await self._redis.get(self._names.file(file_id))
        return FileRecord.model_validate_json(raw) if raw else None

    async def get(self, tenant: str, file_id: str, param: str | None = None) -> FileRecord:
        """The tenant's file, or 404 (also for another tenant's)."""
        record = await self._load(file_id) if is_file_id(file_id) else None
        if record is None or record.tenant != tenant:
            raise NotFound(f"No such File object: {file_id}", param=param)
        return record

    async def page(
        self, tenant: str, after: str | None, limit: int, order: Order, purpose: str | None
    ) -> Page:
        """One page of the tenant's files by creation time, after the file ``after``."""
        key = self._names.files(tenant)
        rank_of = self._redis.zrevrank if order == "desc" else self._redis.zrank
        start = 0
        if after is not None:
            rank = await rank_of(key, after)
            if rank is None:
                raise InvalidRequest(f"after: no file {after} to continue from", param="after")
            start = int(rank) + 1
        found: list[FileRecord] = []
        while len(found) <= limit:
            ids = await self._redis.zrange(key, start, start + max(limit, 100) - 1, desc=order == "desc")
            if not ids:
                break
            start += len(ids)
            raws = await self._redis.mget([self._names.file(i.decode()) for i in ids])
            records = (FileRecord.model_validate_json(r) for r in raws if r)
            found += [r for r in records if purpose is None or r.purpose == purpose]
        return Page(found[:limit], len(found) > limit)

    async def content(self, tenant: str, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes; 404 before the first chunk if it has none."""
        await self.get(tenant, file_id)
        chunks = self.store.read(file_id)
        try:
            first = await anext(chunks)
        except MissingFile as exc:
            raise NotFound(f"No content for File object: {file_id}") from exc
        except StopAsyncIteration:
            first = b""
        return _prepend(first, chunks)

    async def delete(self, tenant: str, file_id: str) -> None:
        """Delete the tenant's file, unless a batch still running reads it (409)."""
        record = await self.get(tenant, file_id)
        user = await self.reader_of(file_id)
        if user is not None:
            raise Conflict(
                f"file {file_id} is the input of batch {user}, which is not finished; cancel it first",
                param="file_id",
            )
        await self.remove(record)

    async def remove(self, record: FileRecord) -> None:
        """Forget a file and free its bytes (idempotent: a second call changes nothing)."""
        n = self._names
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(n.file(record.id))
            pipe.zrem(n.files(record.tenant), record.id)
            pipe.zrem(n.file_expiry(), record.id)
            deleted, _, _ = await pipe.execute()
        if deleted:
            await self._redis.decrby(n.file_bytes(), record.bytes)
        await self.store.delete(record.id)

    async def reader_of(self, file_id: str) -> str | None:
        """The unfinished batch that reads this file, if any."""
        return (await self._inputs()).get(file_id)

    async def _inputs(self) -> dict[str, str]:
        """Input file -> the unfinished batch that reads it."""
        ids = [i.decode() for i in await self._redis.smembers(self._names.active_batches())]  # type: ignore[misc]
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hget(self._names.batch(batch_id), "request")
            requests = await pipe.execute()
        return {
            BatchRequest.model_validate_json(raw).input_file_id: batch_id
            for batch_id, raw in zip(ids, requests, strict=True)
            if raw
        }

    async def expire(self, now: float) -> int:
        """Delete the files whose time is up, except inputs of unfinished batches (they go once
        the batch is done). Returns how many went."""
        due = await self._redis.zrangebyscore(self._names.file_expiry(), "-inf", now)
        if not due:
            return 0
        pinned = await self._inputs()
        gone = 0
        for raw_id in due:
            file_id = raw_id.decode()
            record = await self._load(file_id)
            if record is None:
                await self._redis.zrem(self._names.file_expiry(), file_id)
            elif file_id not in pinned:
                await self.remove(record)
                gone += 1
        return gone


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk
