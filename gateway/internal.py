"""What monitoring and autoscalers read from a gateway, on a port of its own
(``SWITCHYARD_METRICS_PORT``), never on the API's: ``/metrics`` lists every tenant's traffic and
every queue, ``/scaling`` every model's backlog, and neither asks for a key. On Kubernetes a
NetworkPolicy lets only Prometheus and KEDA reach that port; with Compose it is never published.

One server listens on both ports; :class:`ByPort` hands each connection to the application of the
port it came in on, so the public application has no such routes at all.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.metrics import GatewayMetrics
from scaling.decision import Decision, Load, Scaler


def internal_app(metrics: GatewayMetrics, scaler: Scaler) -> Starlette:
    def prometheus_metrics(request: Request) -> Response:  # sync: the multiprocess merge reads files
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    def scaling(request: Request) -> JSONResponse:
        """Workers each model should have, by the scaling decision: what KEDA's metrics-api trigger
        reads (``valueLocation: desired_workers`` with ``?model=``)."""
        rows = {m: scaling_row(load, d) for m, (load, d) in dict(scaler.latest).items()}
        model = request.query_params.get("model")
        if model is None:
            return JSONResponse({"models": rows})
        if model not in rows:
            return JSONResponse({"model": model, "desired_workers": 0, "known": False})
        return JSONResponse({"model": model, "known": True, **rows[model]})

    return Starlette(
        routes=[
            Route("/metrics", prometheus_metrics, methods=["GET"]),
            Route("/scaling", scaling, methods=["GET"]),
        ]
    )


def scaling_row(load: Load, decision: Decision) -> dict[str, Any]:
    return {
        "desired_workers": decision.desired,
        "reason": decision.reason,
        "workers": load.workers,
        "waiting": load.waiting,
        "running": load.running,
        "capacity": load.capacity,
        "drain_rate": round(load.drain_rate, 3),
    }


class ByPort:
    """An ASGI application that serves connections to ``port`` with ``internal`` and every other
    one (and the lifespan) with ``public``."""

    def __init__(self, public: ASGIApp, internal: ASGIApp, port: int) -> None:
        self.public, self.internal, self.port = public, internal, port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") if scope["type"] in ("http", "websocket") else None
        if server is not None and server[1] == self.port:
            await self.internal(scope, receive, send)
        else:
            await self.public(scope, receive, send)
