"""Embeddings over HTTP: a request through the shared path (:mod:`serving.embeddings`), answered as
one JSON body once every vector is in, written out a few vectors at a time."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.embeddings.protocol import EmbeddingRequest
from gateway.service import Gateway
from serving.embeddings import prepare_embedding
from serving.path import submit
from serving.relay import until_disconnect
from shared.tenants import Tenant


async def embeddings(gw: Gateway, request: Request, body: EmbeddingRequest, tenant: Tenant) -> Any:
    gw.lifecycle.check_open()
    entry = await gw.resolve(request, body.model)
    await gw.admission.precheck(tenant, entry.name)  # a tenant over its limits costs no encoding
    prepared = await prepare_embedding(gw.tokenizers, entry, body, tenant, request.state.request_id)
    admitted = await submit(prepared.job, tenant, gw.dispatcher, gw.admission, gw.lifecycle)
    # Nothing reaches the client before the last vector: a worker taking the job over runs it again.
    admitted.replies.restartable = True
    try:
        final = await until_disconnect(request, lambda: prepared.gather(admitted.replies))
    finally:
        await admitted.close()
    if final is None:  # the client left; nobody reads a response
        return JSONResponse({}, status_code=499)
    # A sync iterator: Starlette writes it from a thread, so formatting big answers leaves the
    # event loop free for other requests.
    return StreamingResponse(
        prepared.answer.pieces(final.usage), media_type="application/json", headers=admitted.ticket.headers
    )
