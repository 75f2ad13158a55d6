"""Where the bytes of files live: a directory (the default; shared by every gateway and
background process, e.g. a volume) or Redis (nothing to share but Redis; for modest files).

Both write a file whole under a temporary name and then rename it, so a reader never sees half a
file and an interrupted write leaves nothing behind under the real name.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Protocol

import anyio
from redis.asyncio import Redis

from shared.names import Names
from shared.settings import GatewaySettings

CHUNK = 1 << 20
"""Bytes read or written at a time: a 200 MB file never sits in memory whole on its way through."""


class MissingFile(Exception):
    """The store has no bytes for this file (deleted, expired, or another store)."""


class FileStore(Protocol):
    async def write(self, file_id: str, chunks: AsyncIterable[bytes]) -> int:
        """Store a file whole (replacing any earlier one of that id); returns its size."""
        ...

    def read(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks; raises :class:`MissingFile` before the first if there are none."""
        ...

    async def delete(self, file_id: str) -> None: ...


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
            await part.rename(target)
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

    async def delete(self, file_id: str) -> None:
        try:
            await self._path(file_id).unlink(missing_ok=True)
        except MissingFile:
            return


class RedisStore:
    """One string per id (``Names.file_data``), appended to under a temporary name and renamed."""

    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names

    async def write(self, file_id: str, chunks: AsyncIterable[bytes]) -> int:
        part = self._names.file_data(f"{file_id}.{secrets.token_hex(4)}.part")
        size = 0
        try:
            await self._redis.set(part, b"")
            async for chunk in chunks:
                size = int(await self._redis.append(part, chunk))
            await self._redis.rename(part, self._names.file_data(file_id))
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

    async def delete(self, file_id: str) -> None:
        await self._redis.delete(self._names.file_data(file_id))


def file_store(settings: GatewaySettings, redis: Redis) -> FileStore:
    """The store the settings name: every process of a deployment must name the same one."""
    if settings.file_store == "redis":
        return RedisStore(redis, settings.names)
    return DirectoryStore(settings.files_path / settings.key_prefix)


async def read_all(store: FileStore, file_id: str) -> bytes:
    return b"".join([chunk async for chunk in store.read(file_id)])
