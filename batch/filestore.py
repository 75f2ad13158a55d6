"""Where the bytes of files live: a directory (the default; shared by every gateway and
background process, e.g. a volume) or Redis (nothing to share but Redis; for modest files).

Both write a file whole under a temporary name and then rename it, so a reader never sees half a
file and an interrupted write leaves nothing behind under the real name. The directory store syncs
the file and then the directory before a write returns, so a record written after it never points
at a file a power cut shortened; a partial copy left by a process that died (it cannot delete its
own) expires in Redis and is swept from the directory by housekeeping.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import IO, Protocol

import anyio
from redis.asyncio import Redis

from shared.names import Names
from shared.settings import GatewaySettings

CHUNK = 1 << 20
"""Bytes read or written at a time: a 200 MB file never sits in memory whole on its way through."""
PART_TTL = 3600
"""Seconds a partial copy outlives its last write: past it, its writer is taken for dead."""


class MissingFile(OSError):
    """The store has no bytes for this file (deleted, expired, or another store)."""


class DamagedFile(OSError):
    """A file read back differs from what was written to it."""


class FileStore(Protocol):
    async def write(self, file_id: str, chunks: AsyncIterable[bytes]) -> int:
        """Store a file whole (replacing any earlier one of that id); returns its size."""
        ...

    def read(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks; raises :class:`MissingFile` before the first if there are none."""
        ...

    async def read_range(self, file_id: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the file from ``offset`` (fewer at its end); :class:`MissingFile`."""
        ...

    async def delete(self, file_id: str) -> None: ...

    async def sweep_parts(self, older_than: float) -> int:
        """Remove partial copies last written more than ``older_than`` seconds ago (their writer
        died); returns how many."""
        ...


class DirectoryStore:
    """One file per id under ``root``, written as ``.<id>.<random>.part`` and renamed."""

    def __init__(self, root: Path) -> None:
        self._root = anyio.Path(root)

    def _path(self, file_id: str) -> anyio.Path:
        # Ids are made here (``file-<hex>``); anything else must never name a path outside root.
        if not file_id or "/" in file_id or "\\" in file_id or file_id.startswith("."):
            raise MissingFile(file_id)
        return self._root / file_id

    async def write(self, file_id: str, chunks: AsyncIterable[bytes]) -> int:
        target = self._path(file_id)
        await self._root.mkdir(parents=True, exist_ok=True)
        part = self._root / f".{file_id}.{secrets.token_hex(4)}.part"
        size = 0
        try:
            async with await anyio.open_file(part, "wb") as out:
                async for chunk in chunks:
                    await out.write(chunk)
                    size += len(chunk)
                await anyio.to_thread.run_sync(_sync_file, out.wrapped)
            await part.rename(target)
            await anyio.to_thread.run_sync(_sync_directory, str(self._root))
        finally:
            await part.unlink(missing_ok=True)
        return size

    async def read(self, file_id: str) -> AsyncIterator[bytes]:
        try:
            source = await anyio.open_file(self._path(file_id), "rb")
        except FileNotFoundError as exc:
            raise MissingFile(file_id) from exc
        async with source:
            while chunk := await source.read(CHUNK):
                yield chunk

    async def read_range(self, file_id: str, offset: int, length: int) -> bytes:
        try:
            source = await anyio.open_file(self._path(file_id), "rb")
        except FileNotFoundError as exc:
            raise MissingFile(file_id) from exc
        async with source:
            await source.seek(offset)
            return await source.read(length)

    async def delete(self, file_id: str) -> None:
        try:
            await self._path(file_id).unlink(missing_ok=True)
        except MissingFile:
            return

    async def sweep_parts(self, older_than: float) -> int:
        return await anyio.to_thread.run_sync(_sweep, Path(self._root), time.time() - older_than)


def _sync_file(out: IO[bytes]) -> None:
    out.flush()
    os.fsync(out.fileno())


def _sync_directory(path: str) -> None:
    """Make a rename in ``path`` durable (the directory's entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep(root: Path, before: float) -> int:
    gone = 0
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".part") and entry.stat().st_mtime < before:
            Path(entry.path).unlink(missing_ok=True)
            gone += 1
    return gone


class RedisStore:
    """One string per id (``Names.file_data``), appended to under a temporary name (which expires
    ``PART_TTL`` seconds after its last chunk) and renamed."""

    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names

    async def write(self, file_id: str, chunks: AsyncIterable[bytes]) -> int:
        part = self._names.file_data(f"{file_id}.{secrets.token_hex(4)}.part")
        target = self._names.file_data(file_id)
        size = 0
        try:
            await self._redis.set(part, b"", ex=PART_TTL)
            async for chunk in chunks:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.append(part, chunk)
                    pipe.expire(part, PART_TTL)
                    size = int((await pipe.execute())[0])
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rename(part, target)
                pipe.persist(target)  # a rename keeps the part's expiry
                await pipe.execute()
        finally:
            await self._redis.delete(part)
        return size

    async def read(self, file_id: str) -> AsyncIterator[bytes]:
        key = self._names.file_data(file_id)
        size = int(await self._redis.strlen(key))
        if not size and not await self._redis.exists(key):
            raise MissingFile(file_id)
        for start in range(0, size, CHUNK):
            yield await self._redis.getrange(key, start, min(size, start + CHUNK) - 1)

    async def read_range(self, file_id: str, offset: int, length: int) -> bytes:
        key = self._names.file_data(file_id)
        data = bytes(await self._redis.getrange(key, offset, offset + length - 1))
        if not data and not await self._redis.exists(key):
            raise MissingFile(file_id)
        return data

    async def delete(self, file_id: str) -> None:
        await self._redis.delete(self._names.file_data(file_id))

    async def sweep_parts(self, older_than: float) -> int:
        return 0  # partial copies expire by themselves


def file_store(settings: GatewaySettings, redis: Redis) -> FileStore:
    """The store the settings name: every process of a deployment must name the same one."""
    if settings.file_store == "redis":
        return RedisStore(redis, settings.names)
    return DirectoryStore(settings.files_path / settings.key_prefix)


async def read_all(store: FileStore, file_id: str) -> bytes:
    return b"".join([chunk async for chunk in store.read(file_id)])


class Tally:
    """Size and SHA-256 of the bytes that went through :meth:`count`."""

    def __init__(self) -> None:
        self.size = 0
        self._hash = hashlib.sha256()

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    async def count(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.size += len(chunk)
            self._hash.update(chunk)
            yield chunk


async def verify(store: FileStore, file_id: str, written: Tally) -> None:
    """Read a file back and raise :class:`DamagedFile` unless it is exactly what was written."""
    read = Tally()
    async for _ in read.count(store.read(file_id)):
        pass
    if (read.size, read.digest) != (written.size, written.digest):
        raise DamagedFile(f"file {file_id} reads back {read.size} bytes of the {written.size} written")
