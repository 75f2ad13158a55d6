"""Files of the Batch API: each tenant's uploads and batch results, their records in Redis and their
bytes in the file store, with a bound on the bytes all files may take and an expiry for each.

A file belongs to the tenant that created it; any other tenant is told it does not exist, exactly
as for an id that never did.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import IO, Literal

import anyio
from redis.asyncio import Redis

from api.errors import APIError, InvalidRequest, NotFound
from batch.filestore import CHUNK, FileStore, MissingFile, Tally, file_store, verify
from shared.batches import BatchRequest, FilePurpose, FileRecord, is_file_id, owned_by
from shared.names import Names
from shared.scripts import FileScripts
from shared.settings import GatewaySettings
from shared.tenants import Tenant

Order = Literal["asc", "desc"]
PAGE = 500
RESERVATION_TTL = 3600.0
"""Seconds an upload's reservation lasts: past it (its gateway died mid-upload) housekeeping frees it."""


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
        self._scripts = FileScripts(redis)

    async def reserve(self, tenant: str, size: int, quota: int | None) -> str:
        """Room for an upload of ``size`` bytes in the store and in the tenant's ``quota`` (None:
        none), taken before the upload is read; 413 when there is none. Returns the reservation,
        which :meth:`create` turns into the file's bytes or :meth:`release` gives back."""
        reservation = f"{tenant}|{secrets.token_hex(8)}"
        n, cap = self._names, self._settings.files_max_total_bytes
        result = await self._scripts.reserve(
            keys=[
                n.file_bytes(),
                n.tenant_file_bytes(tenant),
                n.file_reservations(),
                n.file_reservation_expiry(),
            ],
            args=[reservation, size, cap, quota or 0, int(time.time() + RESERVATION_TTL)],
        )
        if int(result[0]) == 1:
            return reservation
        used = int(result[2])
        if result[1] == b"tenant":
            message = (
                f"this tenant's files would take more than its {quota} bytes ({used} used, {size} more "
                "asked for); delete files or wait for them to expire"
            )
        else:
            message = (
                f"the file store is full ({used} of {cap} bytes used, {size} more asked for); try again later"
            )
        raise StorageFull(message, param="file")

    async def release(self, reservation: str) -> None:
        """Give back what an upload reserved and did not use (nothing once it was stored)."""
        await self._scripts.release(keys=self._reservation_keys(reservation), args=[reservation])

    async def release_lapsed(self, now: float) -> int:
        """Give back the reservations of uploads whose gateway died mid-way; returns how many."""
        lapsed = await self._redis.zrangebyscore(self._names.file_reservation_expiry(), "-inf", now)
        for raw in lapsed:
            await self.release(raw.decode())
        return len(lapsed)

    async def usage(self) -> tuple[int, dict[str, int]]:
        """What the records and live reservations add up to: (all bytes, bytes per tenant)."""
        tenants: Counter[str] = Counter()
        ids = [i.decode() async for i, _ in self._redis.zscan_iter(self._names.file_expiry(), count=PAGE)]
        for start in range(0, len(ids), PAGE):
            raws = await self._redis.mget([self._names.file(i) for i in ids[start : start + PAGE]])
            for raw in raws:
                if raw:
                    record = FileRecord.model_validate_json(raw)
                    tenants[record.tenant] += record.bytes
        reserved = await self._redis.hgetall(self._names.file_reservations())  # type: ignore[misc]
        for reservation, size in reserved.items():
            tenants[reservation.decode().partition("|")[0]] += int(size)
        return sum(tenants.values()), dict(tenants)

    def _reservation_keys(self, reservation: str) -> list[str]:
        n, tenant = self._names, reservation.partition("|")[0]
        return [
            n.file_bytes(),
            n.tenant_file_bytes(tenant),
            n.file_reservations(),
            n.file_reservation_expiry(),
        ]

    async def create(
        self,
        owner: Tenant,
        filename: str,
        purpose: FilePurpose,
        source: IO[bytes],
        lines: int,
        ttl: float,
        reservation: str | None = None,
        quota: int | None = None,
    ) -> FileRecord:
        """Store an upload (``source``, already checked) as a new file of ``owner``, in the room
        ``reservation`` holds (or room reserved now, within ``quota``)."""
        source.seek(0, 2)
        size = source.tell()
        source.seek(0)
        reserved = reservation or await self.reserve(owner.name, size, quota)
        record = self._record(new_file_id(), owner.name, owner.id, filename, purpose, size, lines, ttl)
        try:
            await self.store.write(record.id, _chunks_of(source))
            await self._index(record, reserved)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.release(reserved)
                await self.store.delete(record.id)
            raise
        return record

    async def put(
        self,
        tenant: str,
        tenant_id: str | None,
        file_id: str,
        filename: str,
        chunks: AsyncIterable[bytes],
        lines: int,
        ttl: float,
    ) -> FileRecord:
        """Store a file the system produced (a batch's output) under a given id, replacing any
        earlier one: writing it again after an interruption leaves one file, not two. Counted in
        the store's bytes but never refused for them: a finished batch's results are not dropped.
        Indexed only once it reads back exactly as written (else :class:`DamagedFile`): what it
        was made from may be deleted then."""
        written = Tally()
        size = await self.store.write(file_id, written.count(chunks))
        await verify(self.store, file_id, written)
        record = self._record(file_id, tenant, tenant_id, filename, "batch_output", size, lines, ttl)
        await self._index(record, None)
        return record

    def _record(
        self,
        file_id: str,
        tenant: str,
        tenant_id: str | None,
        name: str,
        purpose: FilePurpose,
        size: int,
        lines: int,
        ttl: float,
    ) -> FileRecord:
        now = time.time()
        return FileRecord(
            id=file_id,
            tenant=tenant,
            tenant_id=tenant_id,
            filename=name,
            purpose=purpose,
            bytes=size,
            lines=lines,
            created_at=int(now),
            expires_at=int(now + ttl),
        )

    async def _index(self, record: FileRecord, reservation: str | None) -> None:
        """The record, its listings and its bytes counted, in place of the reservation, at once."""
        n = self._names
        keys = self._reservation_keys(reservation or f"{record.tenant}|")
        keys += [n.file(record.id), n.files(record.tenant), n.file_expiry()]
        # Milliseconds, not the record's seconds: files listed in the order they were made.
        listed = time.time() * 1000
        args: list[str | int | float] = [reservation or "", record.id, record.model_dump_json(), record.bytes]
        await self._scripts.index(keys=keys, args=[*args, listed, record.expires_at or ""])

    async def _load(self, file_id: str) -> FileRecord | None:
        raw = await self._redis.get(self._names.file(file_id))
        return FileRecord.model_validate_json(raw) if raw else None

    async def get(self, owner: Tenant, file_id: str, param: str | None = None) -> FileRecord:
        """The tenant's file, or 404 (also for another tenant's)."""
        record = await self._load(file_id) if is_file_id(file_id) else None
        if record is None or not owned_by(owner.name, owner.id, record.tenant, record.tenant_id):
            raise NotFound(f"No such File object: {file_id}", param=param)
        return record

    async def page(
        self, owner: Tenant, after: str | None, limit: int, order: Order, purpose: str | None
    ) -> Page:
        """One page of the tenant's files by creation time, after the file ``after``."""
        key = self._names.files(owner.name)
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
            found += [
                r
                for r in records
                if (purpose is None or r.purpose == purpose)
                and owned_by(owner.name, owner.id, r.tenant, r.tenant_id)
            ]
        return Page(found[:limit], len(found) > limit)

    async def content(self, owner: Tenant, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes; 404 before the first chunk if it has none."""
        await self.get(owner, file_id)
        chunks = self.store.read(file_id)
        try:
            first = await anext(chunks)
        except MissingFile as exc:
            raise NotFound(f"No content for File object: {file_id}") from exc
        except StopAsyncIteration:
            first = b""
        return _prepend(first, chunks)

    async def delete(self, owner: Tenant, file_id: str) -> None:
        """Delete the tenant's file, unless a batch still running reads it (409)."""
        record = await self.get(owner, file_id)
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
        keys = [n.file_bytes(), n.tenant_file_bytes(record.tenant), n.file(record.id)]
        await self._scripts.forget(keys=[*keys, n.files(record.tenant), n.file_expiry()], args=[record.id])
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
