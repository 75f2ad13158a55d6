"""The Files, Batches and Usage endpoints (OpenAI's shapes), for the tenant of the request's key.

Uploads are streamed to a temporary file as they arrive (the body cap for ``/v1/files`` is the file
size limit, not the 4 MiB of other requests), checked line by line off the event loop, and stored
only if every line passes: a refused upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import IO, Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.datastructures import UploadFile

from api.batches.protocol import BatchCreateRequest, BatchList, BatchObject, FileDeleted, FileList, FileObject
from api.errors import InvalidRequest, NotFound
from api.usage import UsageList
from batch.batches import Batches, batch_object, new_batch_id
from batch.files import Files, StorageFull, file_object
from batch.lines import Scan, bounded_lines, scan
from batch.role import start_batch
from gateway.openapi import FILE_CONTENT, UPLOAD_BODY, resource_responses
from gateway.service import Gateway
from serving.usage import Usage
from shared.batches import BatchState
from shared.tenants import Tenant

log = logging.getLogger(__name__)

UPLOAD_OVERHEAD = 64 * 1024
"""Bytes of a multipart upload beyond the file itself (boundaries, headers, small fields)."""
LATEST = 253_402_300_799
"""The last second of year 9999: the largest time a query may name."""
DAY = 86400
CREATE_WAIT, CREATE_WAIT_TRIES = 0.1, 20
"""How long a retry under an Idempotency-Key waits for the batch its first request is creating."""


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _tenant(request: Request) -> Tenant:
    tenant = await _gateway(request).auth.tenant(request)
    request.state.tenant = tenant.name
    return tenant


Owner = Annotated[Tenant, Depends(_tenant)]
ObjectId = Annotated[str, Query(max_length=128)]


def _query(*known: str) -> Any:
    """Refuse query parameters the operation does not take, or takes once but got twice: unknown
    fields are refused here as in request bodies, and a repeated one is ambiguous."""

    def check(request: Request, tenant: Owner) -> None:  # the key is checked first, as everywhere
        names = [name for name, _ in request.query_params.multi_items()]
        for name in names:
            if name not in known:
                raise InvalidRequest(f"Unrecognized query parameter: '{name}'", param=name)
            if names.count(name) > 1:
                raise InvalidRequest(f"the query parameter '{name}' is given more than once", param=name)

    return Depends(check)


def upload_cap(max_file_bytes: int) -> int:
    """The body cap of ``POST /v1/files``."""
    return max_file_bytes + UPLOAD_OVERHEAD


def _files(request: Request) -> Files:
    gw = _gateway(request)
    return Files(gw.redis, gw.settings)


def _batches(request: Request) -> Batches:
    gw = _gateway(request)
    return Batches(gw.redis, gw.settings)


def _listing(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}


# -- files -----------------------------------------------------------------------------------------


def _form_text(form: Any, name: str, required: bool = False) -> str | None:
    value = form.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"Missing required parameter: '{name}'", param=name)
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a text field, not a file", param=name)
    return value


def _ttl(form: Any, default: float) -> float:
    """Seconds to keep the file: ``expires_after`` if given (at most the deployment's TTL)."""
    anchor = _form_text(form, "expires_after[anchor]")
    seconds = _form_text(form, "expires_after[seconds]")
    if anchor is None and seconds is None:
        return default
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'", param="expires_after[anchor]")
    # ASCII digits only: str.isdigit() also passes "²" and other scripts' digits.
    if seconds is None or not re.fullmatch(r"[0-9]{1,7}", seconds) or not 3600 <= int(seconds) <= 2_592_000:
        raise InvalidRequest(
            "expires_after[seconds] must be a whole number from 3600 to 2592000",
            param="expires_after[seconds]",
        )
    return min(float(seconds), default)


def _check_file(source: IO[bytes], max_n: int, max_lines: int, max_line: int) -> Scan:
    source.seek(0)
    try:
        return scan(bounded_lines(source, max_line), max_n, max_lines, max_line_bytes=max_line)
    finally:
        source.seek(0)


async def upload_file(request: Request, tenant: Owner) -> dict[str, Any]:
    settings, files = _gateway(request).settings, _files(request)
    # Room in the store and in the tenant's quota is taken before the body is read (from what its
    # Content-Length announces, or the largest file when it announces none): uploads that would
    # not fit are refused at once, and many at a time cannot fill the disk on the way.
    declared = _declared_length(request)
    size = settings.file_max_bytes if declared is None else min(declared, settings.file_max_bytes)
    reservation = await files.reserve(tenant.name, size, tenant.file_bytes)
    try:
        return await _store_upload(request, tenant, files, reservation)
    finally:
        await files.release(reservation)  # what the stored file did not take, or all of it


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else None


async def _store_upload(request: Request, tenant: Tenant, files: Files, reservation: str) -> dict[str, Any]:
    settings = _gateway(request).settings
    form = await request.form(max_files=1, max_fields=8)
    try:
        purpose = _form_text(form, "purpose", required=True)
        if purpose != "batch":
            raise InvalidRequest(f"purpose '{purpose}' is not supported here; use 'batch'", param="purpose")
        upload = form.get("file")
        if upload is None:
            raise InvalidRequest("Missing required parameter: 'file'", param="file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("'file' must be a file upload", param="file")
        ttl = _ttl(form, settings.file_ttl)
        if (upload.size or 0) > settings.file_max_bytes:
            raise StorageFull(f"the file is larger than {settings.file_max_bytes} bytes", param="file")
        checked = await anyio.to_thread.run_sync(
            _check_file, upload.file, settings.max_n, settings.file_max_lines, settings.max_body_bytes
        )
        if checked.errors:
            raise InvalidRequest(checked.summary(), param="file", code="invalid_file")
        name = (upload.filename or "upload.jsonl")[-255:]
        record = await files.create(
            tenant, name, "batch", upload.file, checked.count, ttl, reservation=reservation
        )
    finally:
        await form.close()
    return file_object(record)


async def list_files(
    request: Request,
    tenant: Owner,
    after: ObjectId | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    page = await _files(request).page(tenant, after, limit, order, purpose)
    return _listing([file_object(r) for r in page.records], page.has_more)


async def get_file(file_id: str, request: Request, tenant: Owner) -> dict[str, Any]:
    return file_object(await _files(request).get(tenant, file_id, param="file_id"))


async def delete_file(file_id: str, request: Request, tenant: Owner) -> dict[str, Any]:
    await _files(request).delete(tenant, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


async def file_content(file_id: str, request: Request, tenant: Owner) -> StreamingResponse:
    chunks = await _files(request).content(tenant, file_id)
    return StreamingResponse(chunks, media_type="application/octet-stream")


# -- batches ---------------------------------------------------------------------------------------


async def create_batch(body: BatchCreateRequest, request: Request, tenant: Owner) -> dict[str, Any]:
    """A new batch; under an ``Idempotency-Key`` sent before with the same body, the batch that
    first request created (a retry never makes a second batch)."""
    gw = _gateway(request)
    key = request.headers.get("idempotency-key")
    batch_id = new_batch_id()
    if key is not None:
        # A file not the tenant's is a 404 first, as without a key: the key does not change that.
        await _files(request).get(tenant, body.input_file_id, param="input_file_id")
        what = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        earlier = await gw.idempotency.claim(tenant.name, key, what, batch_id)
        if earlier is not None:
            return batch_object(await _created(request, tenant, earlier.id))
    try:
        state = await _batches(request).create(tenant, body, _files(request), batch_id)
    except BaseException:
        if key is not None:
            await gw.idempotency.forget(tenant.name, key, batch_id)
        raise
    try:
        await start_batch(gw.redis, gw.settings.names, state.request.id, "created")
    except (RedisError, OSError) as exc:  # created all the same: the periodic check starts it
        log.warning("batch %s: could not queue its run now: %s", state.request.id, exc)
    return batch_object(state)


async def _created(request: Request, tenant: Owner, batch_id: str) -> BatchState:
    """The batch an earlier request under the same key creates: a moment may pass between that
    request claiming the key and its batch existing."""
    for _ in range(CREATE_WAIT_TRIES):
        try:
            return await _batches(request).get(tenant, batch_id)
        except NotFound:
            await anyio.sleep(CREATE_WAIT)
    return await _batches(request).get(tenant, batch_id)


async def list_batches(
    request: Request,
    tenant: Owner,
    after: ObjectId | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    page = await _batches(request).page(tenant, after, limit)
    return _listing([batch_object(s) for s in page.states], page.has_more)


async def get_batch(batch_id: str, request: Request, tenant: Owner) -> dict[str, Any]:
    return batch_object(await _batches(request).get(tenant, batch_id))


async def cancel_batch(batch_id: str, request: Request, tenant: Owner) -> dict[str, Any]:
    return batch_object(await _batches(request).cancel(tenant, batch_id))


# -- usage -----------------------------------------------------------------------------------------


async def usage(
    request: Request,
    tenant: Owner,
    start_time: Annotated[int | None, Query(ge=0, le=LATEST)] = None,
    end_time: Annotated[int | None, Query(ge=0, le=LATEST)] = None,
) -> dict[str, Any]:
    """The tenant's own usage per hour and model, as rolled up so far (a minute or so behind)."""
    gw = _gateway(request)
    if start_time is not None and end_time is not None and end_time < start_time:
        raise InvalidRequest("end_time must not be before start_time", param="end_time")
    reader = Usage(gw.redis, gw.settings.names, gw.settings.usage_retention_days)
    since = start_time if start_time is not None else int(time.time()) - DAY
    rows = await reader.read(tenant.name, since, end_time)
    return {"object": "list", "tenant": tenant.name, "data": [row.as_bucket() for row in rows]}


def router() -> APIRouter:
    """The Files, Batches and Usage routes, to add to an app."""
    routes = APIRouter()

    def add(path: str, endpoint: Any, methods: list[str], **options: Any) -> None:
        routes.add_api_route(path, endpoint, methods=methods, response_model=None, **options)

    add(
        "/v1/files",
        upload_file,
        ["POST"],
        openapi_extra=UPLOAD_BODY,
        responses=resource_responses(FileObject, 400, 413),
    )
    add(
        "/v1/files",
        list_files,
        ["GET"],
        responses=resource_responses(FileList, 400),
        dependencies=[_query("after", "limit", "order", "purpose")],
    )
    add("/v1/files/{file_id}", get_file, ["GET"], responses=resource_responses(FileObject, 404))
    add("/v1/files/{file_id}", delete_file, ["DELETE"], responses=resource_responses(FileDeleted, 404, 409))
    add(
        "/v1/files/{file_id}/content",
        file_content,
        ["GET"],
        responses={**resource_responses(None, 404), 200: FILE_CONTENT},
    )
    add("/v1/batches", create_batch, ["POST"], responses=resource_responses(BatchObject, 400, 404, 409))
    add(
        "/v1/batches",
        list_batches,
        ["GET"],
        responses=resource_responses(BatchList, 400),
        dependencies=[_query("after", "limit")],
    )
    add("/v1/batches/{batch_id}", get_batch, ["GET"], responses=resource_responses(BatchObject, 404))
    add(
        "/v1/batches/{batch_id}/cancel",
        cancel_batch,
        ["POST"],
        responses=resource_responses(BatchObject, 404, 409),
    )
    add(
        "/v1/usage",
        usage,
        ["GET"],
        responses=resource_responses(UsageList, 400),
        dependencies=[_query("start_time", "end_time")],
    )
    return routes
