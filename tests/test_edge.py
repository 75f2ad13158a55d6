"""The gateway's ASGI edge on its own (no server): request ids, the body cap, and what a client sees
when a handler fails in a way nobody foresaw."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from gateway.edge import RequestEdge


async def broken(scope: Scope, receive: Receive, send: Send) -> None:
    raise KeyError("a defect")


async def test_an_unexpected_error_is_an_openai_envelope_with_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = RequestEdge(broken, max_body=1024, new_id=lambda: "req_abc")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        with caplog.at_level(logging.ERROR, logger="gateway.edge"):
            resp = await client.post("/v1/chat/completions", json={})
    assert resp.status_code == 500
    assert resp.headers["x-request-id"] == "req_abc"
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "req_abc" in error["message"]
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "req_abc" in logged[0].getMessage()
    assert isinstance(logged[0].exc_info[1], KeyError)  # type: ignore[index]


async def test_a_body_over_the_cap_is_a_413() -> None:
    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the app must not see an oversized body")

    app = RequestEdge(echo, max_body=10, new_id=lambda: "req_x")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        resp = await client.post("/v1/completions", content=b"x" * 11)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
