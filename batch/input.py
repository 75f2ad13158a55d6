"""A batch's input file as a run holds it: an index of its lines (custom_id, line number, where the
line starts and how long it is), built by streaming the file through a parser that runs off the
event loop, one block of lines at a time; a line is read back and parsed only when its turn comes.

A run of a 50,000-line, 190 MB file holds a few megabytes this way, where the whole file, its lines
and their parsed requests took about 2.5 times its size; and a run restarted after its process died
reads the file again without holding the event loop (other runs renew their leases meanwhile).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from batch.filestore import FileStore, MissingFile
from batch.lines import BatchLine, LineRefused, check_line, parse_line
from shared.batches import LineError

INLINE_PARSE = 64 * 1024
"""A line longer than this is parsed in a thread when it is read back."""


@dataclass
class LineIndex:
    """Where each line of a checked input file is, in file order."""

    custom_ids: list[str] = field(default_factory=list)
    numbers: array[int] = field(default_factory=lambda: array("q"))
    offsets: array[int] = field(default_factory=lambda: array("q"))
    lengths: array[int] = field(default_factory=lambda: array("q"))

    def __len__(self) -> int:
        return len(self.custom_ids)

    def add(self, number: int, custom_id: str, offset: int, length: int) -> None:
        self.custom_ids.append(custom_id)
        self.numbers.append(number)
        self.offsets.append(offset)
        self.lengths.append(length)


class Reading:
    """Pure, fed in blocks: a file's lines split (a line longer than ``max_line_bytes`` is never
    held whole) and handed to ``take(number, offset, raw)``, blank lines skipped."""

    def __init__(self, max_line_bytes: int, take: Callable[[int, int, bytes], None]) -> None:
        self._max = max_line_bytes
        self._take = take
        self._tail = b""
        self._tail_at = 0
        self._number = 0
        self._skipping = False
        """Inside a line too long to hold: its start was handed over, the rest is dropped."""

    def feed(self, block: bytes) -> None:
        start = 0
        while start < len(block):
            end = block.find(b"\n", start)
            if end < 0:
                self._keep(block[start:])
                return
            self._end_line(block[start : end + 1])
            start = end + 1

    def close(self) -> None:
        if self._tail and not self._skipping:
            self._line(self._tail_at, self._tail)
        self._tail, self._skipping = b"", False

    def _keep(self, piece: bytes) -> None:
        if self._skipping:
            self._tail_at += len(piece)
            return
        self._tail += piece
        if len(self._tail) > self._max:  # too long: only its start is ever looked at
            self._line(self._tail_at, self._tail[: self._max + 1])
            self._tail_at += len(self._tail)
            self._tail, self._skipping = b"", True

    def _end_line(self, piece: bytes) -> None:
        if self._skipping:
            self._tail_at += len(piece)
            self._tail, self._skipping = b"", False
            return
        raw = self._tail + piece if self._tail else piece
        self._line(self._tail_at, raw)
        self._tail_at += len(raw)
        self._tail = b""

    def _line(self, offset: int, raw: bytes) -> None:
        self._number += 1
        if raw.strip():
            self._take(self._number, offset, raw[: self._max + 1])


@dataclass
class Check:
    """Pure: what checking a batch's input line by line finds, as the lines come: the index of the
    valid ones, the errors naming the others, and the batch's model."""

    endpoint: str
    known_models: set[str]
    max_n: int
    max_lines: int
    max_line_bytes: int
    index: LineIndex = field(default_factory=LineIndex)
    errors: list[LineError] = field(default_factory=list)
    model: str | None = None
    count: int = 0
    _seen: set[str] = field(default_factory=set)

    def take(self, number: int, offset: int, raw: bytes) -> None:
        self.count += 1
        if self.count > self.max_lines:
            if self.count == self.max_lines + 1:
                message = f"line {number}: a batch takes at most {self.max_lines} requests"
                self.errors.append(LineError(code="too_many_lines", message=message, line=number))
            return
        if len(raw.rstrip(b"\r\n")) > self.max_line_bytes:
            message = f"line {number}: a request may be at most {self.max_line_bytes} bytes"
            self.errors.append(LineError(code="line_too_long", message=message, line=number))
            return
        try:
            line = parse_line(number, raw, self.max_n)
        except LineRefused as exc:
            self.errors.append(exc.error)
            return
        error = check_line(line, self.endpoint, self.known_models, self.model, self._seen)
        if error is not None:
            self.errors.append(error)
            return
        self.model = self.model or line.model
        self._seen.add(line.custom_id)
        self.index.add(number, line.custom_id, offset, len(raw))

    def finish(self) -> list[LineError]:
        if not self.count:
            self.errors.append(LineError(code="empty_file", message="the file has no requests"))
        return self.errors


@dataclass
class Recall:
    """Pure: the index of an input that was checked before (a run restarted), taking from each line
    only its custom_id: its checks passed when the batch was validated."""

    index: LineIndex = field(default_factory=LineIndex)

    def take(self, number: int, offset: int, raw: bytes) -> None:
        self.index.add(number, json.loads(raw)["custom_id"], offset, len(raw))


async def stream_lines(
    store: FileStore, file_id: str, max_line_bytes: int, take: Callable[[int, int, bytes], None],
    limiter: anyio.CapacityLimiter,
) -> None:  # fmt: skip
    """Feed a stored file's lines to ``take`` in threads (at most ``limiter`` at once in this
    process), a block of about a megabyte at a time; raises :class:`MissingFile`."""
    reading = Reading(max_line_bytes, take)
    async for block in store.read(file_id):
        await anyio.to_thread.run_sync(reading.feed, block, limiter=limiter)
    await anyio.to_thread.run_sync(reading.close, limiter=limiter)


async def read_line(store: FileStore, file_id: str, index: LineIndex, i: int, max_n: int) -> BatchLine:
    """The ``i``-th indexed line, read back from the store and parsed (off the event loop when it
    is long)."""
    raw = await store.read_range(file_id, index.offsets[i], index.lengths[i])
    if len(raw) != index.lengths[i]:
        raise MissingFile(f"{file_id} is shorter than when its batch was checked")
    if len(raw) > INLINE_PARSE:
        return await anyio.to_thread.run_sync(parse_line, index.numbers[i], raw, max_n)
    return parse_line(index.numbers[i], raw, max_n)
