"""One run of a batch, by whichever background process holds its lease: validate the input, feed the
lines (:mod:`batch.feeder`), and finish as OpenAI's batches do, with the output and error files.

Any number of ``switchyard jobs`` processes may start a run of the same batch; only the one that
takes the lease runs it, and it renews the lease while it runs. A process that dies or stalls loses
the lease after ``batch_lease`` seconds and a free batch slot elsewhere (:mod:`batch.slots`) starts
a new run, which picks up where the last one was: every step below can be done again without doing
anything twice.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

import anyio
from redis.exceptions import RedisError

from batch.batches import Batches
from batch.feeder import Feeder, Parts, cancel_jobs, tenant_of
from batch.files import Files
from batch.filestore import MissingFile
from batch.input import Check, LineIndex, Recall, stream_lines
from batch.lines import encode_line, is_output, unanswered_line
from shared.batches import BatchState, LineError, owner_key
from shared.fleet import known_models
from shared.scripts import BatchScripts
from shared.tenants import Tenant

log = logging.getLogger(__name__)

CANCEL_KEEP = 86400.0
"""How long the jobs of a finished batch stay marked cancelled: the longest they could still wait."""
READ_CHUNK = 1000
"""Results read per round trip while writing a batch's files."""
UNANSWERED = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
}


def result_file_id(batch_id: str, kind: str) -> str:
    """A batch's output or error file id: fixed, so writing the files again replaces them."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


class BatchRunner:
    """Runs batches for one background process, at most ``max_batches`` at once."""

    def __init__(self, parts: Parts) -> None:
        self._parts = parts
        self._batches = Batches(parts.redis, parts.settings)
        self._files = Files(parts.redis, parts.settings, parts.files)
        self._scripts = BatchScripts(parts.redis)
        self._running: set[str] = set()

    async def run(self, batch_id: str, token: str | None = None) -> str:
        """Run the batch if no other process does (``token``: the lease this process took for it
        already); returns what happened, for the log."""
        if batch_id in self._running or len(self._running) >= self._parts.settings.max_batches:
            return "busy here"
        token = token or secrets.token_hex(8)
        lease = self._parts.names.batch_lease(batch_id)
        ms = int(self._parts.settings.batch_lease * 1000)
        if not int(await self._scripts.lease_keep(keys=[lease], args=[token, ms])):
            return "run by another process"
        self._running.add(batch_id)
        outcome = "lease lost"
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._keep_lease, lease, token, ms, group.cancel_scope)
                outcome = await self._drive(batch_id, token)
                group.cancel_scope.cancel()
        except* (RedisError, OSError) as errors:
            log.warning("batch %s: run stopped: %s", batch_id, errors.exceptions[0])
            outcome = "interrupted"
        finally:
            self._running.discard(batch_id)
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._scripts.lease_release(keys=[lease], args=[token])
        return outcome

    async def _keep_lease(self, lease: str, token: str, ms: int, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(self._parts.settings.batch_lease / 3)
            try:
                held = int(await self._scripts.lease_keep(keys=[lease], args=[token, ms]))
            except (RedisError, OSError) as exc:  # the writes are fenced: losing it stops them
                log.warning("renewing the lease %s failed: %s", lease, exc)
                continue
            if not held:
                log.warning("lost the lease %s; stopping this run", lease)
                scope.cancel()
                return

    async def _drive(self, batch_id: str, token: str) -> str:
        state = await self._batches.load(batch_id)
        if state is None:  # its record expired: nothing left to run
            await self._batches.retire(batch_id, None)
            return "gone"
        if state.final:
            if batch_id in await self._batches.active():
                await self._batches.finished(batch_id)
            else:  # listed for a slot again by a reckoning that read it just before it finished
                await self._batches.retire(batch_id, owner_key(state.request))
            return state.status
        tenant = await self._owner(state)
        if tenant is None:
            return await self._owner_gone(batch_id)
        lines = LineIndex()
        if state.status == "validating":
            state, lines = await self._validate(state)
        elif state.status != "cancelling" or state.total:
            lines = await self._recall(state)
        if state.status == "in_progress" and time.time() < state.request.expires_at:
            outcome = await Feeder(self._parts, state, lines, token, tenant).run()
            if outcome == "stopping":
                return "stopped; to be continued"
            if outcome == "yielded":
                return "gave its slot to another tenant; to be continued"
            if outcome == "gone":
                return await self._owner_gone(batch_id)
            if outcome == "done" and await self._batches.move(batch_id, "finalizing"):
                state = await self._reload(batch_id)
        return await self._finish(await self._reload(batch_id), lines)

    async def _owner(self, state: BatchState) -> Tenant | None:
        """The tenant the batch belongs to, with the limits in force; None once it was removed (a
        tenant of the same name created since is another one)."""
        return await tenant_of(self._parts.tenants, state.request.tenant, state.request.tenant_id)

    async def _owner_gone(self, batch_id: str) -> str:
        """Its tenant was removed: no line of it runs any more, and no result file is written for
        nobody; it ends cancelled (or as it was about to end, if all its lines had run)."""
        log.info("batch %s: its tenant was removed; cancelling it", batch_id)
        await self._batches.move(batch_id, "cancelling")
        await self._stop_lines(batch_id)
        state = await self._reload(batch_id)
        target = {"cancelling": "cancelled", "finalizing": "completed"}.get(state.status)
        if target is not None:
            await self._batches.move(batch_id, target)
            state = await self._reload(batch_id)
        if state.final:
            await self._batches.finished(batch_id)
        return state.status

    async def _reload(self, batch_id: str) -> BatchState:
        state = await self._batches.load(batch_id)
        if state is None:
            raise RedisError(f"batch {batch_id} vanished while running")
        return state

    async def _recall(self, state: BatchState) -> LineIndex:
        """The index of an input checked by an earlier run (streamed again, off the event loop)."""
        recall = Recall()
        try:
            await self._stream(state.request.input_file_id, recall.take)
        except MissingFile:
            return LineIndex()
        return recall.index

    async def _stream(self, file_id: str, take: Callable[[int, int, bytes], None]) -> None:
        parts = self._parts
        await stream_lines(self._files.store, file_id, parts.settings.max_body_bytes, take, parts.parsing)

    async def _validate(self, state: BatchState) -> tuple[BatchState, LineIndex]:
        """``validating`` -> ``in_progress`` with the line count and model, or ``failed`` with the
        errors naming each line."""
        req, settings = state.request, self._parts.settings
        known = await known_models(self._parts.redis, self._parts.names)
        check = Check(req.endpoint, known, settings.max_n, settings.file_max_lines, settings.max_body_bytes)
        try:
            await self._stream(req.input_file_id, check.take)
            errors = check.finish()
        except MissingFile:
            message = f"the input file {req.input_file_id} no longer exists"
            errors = [LineError(code="input_file_missing", message=message, param="input_file_id")]
        if errors:
            encoded = "[" + ",".join(e.model_dump_json() for e in errors) + "]"
            await self._batches.move(req.id, "failed", errors=encoded)
        else:
            await self._batches.move(req.id, "in_progress", total=len(check.index), model=check.model or "")
        return await self._reload(req.id), check.index

    async def _finish(self, state: BatchState, lines: LineIndex) -> str:
        """Write the result files and move to the final status the current one leads to."""
        batch_id = state.request.id
        target = {"finalizing": "completed", "cancelling": "cancelled", "in_progress": "expired"}.get(
            state.status
        )
        if target is not None:
            await self._stop_lines(batch_id)
            files = await self._write_files(state, lines, target)
            if not await self._batches.move(batch_id, target, **files):
                return await self._finish(await self._reload(batch_id), lines)  # cancelled meanwhile
            state = await self._reload(batch_id)
        if state.final:
            await self._batches.finished(batch_id)
        log.info(
            "batch %s %s: %d completed, %d failed", batch_id, state.status, state.completed, state.failed
        )
        return state.status

    async def _stop_lines(self, batch_id: str) -> None:
        """Cancel the jobs lines still have on a queue (left by a run that died): a worker skips or
        aborts them, and with the batch's jobs forgotten none can record a result."""
        jobs_key = self._parts.names.batch_jobs(batch_id)
        jobs = await self._parts.redis.hgetall(jobs_key)  # type: ignore[misc]
        await cancel_jobs(self._parts, [j.decode() for j in jobs.values()], keep=CANCEL_KEEP)
        await self._parts.redis.delete(jobs_key)

    async def _write_files(self, state: BatchState, lines: LineIndex, target: str) -> dict[str, str]:
        """The output file (answered lines) and the error file (refused, failed and, for a batch
        cancelled or expired, unanswered lines), in input order; each only if it has a line."""
        req, files = state.request, {}
        ttl = req.output_ttl or self._parts.settings.file_ttl
        counts = {"output": 0, "error": 0}
        async for kind, _ in self._result_lines(req.id, lines, target):
            counts[kind] += 1
        for kind, count in counts.items():
            if count:
                file_id = result_file_id(req.id, kind)
                chunks = self._file_chunks(req.id, lines, target, kind)
                name = f"{req.id}_{kind}.jsonl"
                await self._files.put(req.tenant, req.tenant_id, file_id, name, chunks, count, ttl)
                files[f"{kind}_file_id"] = file_id
        return files

    async def _file_chunks(
        self, batch_id: str, lines: LineIndex, target: str, kind: str
    ) -> AsyncIterator[bytes]:
        buffer: list[str] = []
        async for line_kind, text in self._result_lines(batch_id, lines, target):
            if line_kind == kind:
                buffer.append(text + "\n")
            if len(buffer) >= READ_CHUNK:
                yield "".join(buffer).encode()
                buffer.clear()
        if buffer:
            yield "".join(buffer).encode()

    async def _result_lines(
        self, batch_id: str, lines: LineIndex, target: str
    ) -> AsyncIterator[tuple[str, str]]:
        """(``output`` or ``error``, line) for each input line with something to report."""
        key = self._parts.names.batch_results(batch_id)
        for start in range(0, len(lines), READ_CHUNK):
            chunk = lines.custom_ids[start : start + READ_CHUNK]
            stored = await self._parts.redis.hmget(key, chunk)  # type: ignore[misc]
            for custom_id, raw in zip(chunk, stored, strict=True):
                if raw is not None:
                    text = raw.decode()
                    yield ("output" if is_output(text) else "error"), text
                elif target in UNANSWERED:
                    code, message = UNANSWERED[target]
                    yield "error", encode_line(unanswered_line(custom_id, code, message))
