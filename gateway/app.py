"""The FastAPI application: routes, error mapping, and the lifespan that owns Redis connections."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.chat.protocol import ChatCompletion, ChatCompletionRequest
from api.completions.protocol import CompletionRequest, TextCompletion
from api.embeddings.protocol import EmbeddingList, EmbeddingRequest
from api.errors import APIError, InvalidRequest, NotFound
from api.tokenize.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from gateway import batch_api, responses_api
from gateway.auth import Authenticator
from gateway.edge import RequestEdge
from gateway.embeddings import embeddings
from gateway.internal import internal_app
from gateway.metrics import ENDPOINTS, GatewayMetrics, RequestCounter, rejection_reason
from gateway.openapi import (
    AUTH_ERRORS,
    MODEL_NOT_FOUND,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    completion_responses,
    embedding_responses,
    install,
    tokens_responses,
)
from gateway.probe import QueueProbe
from gateway.service import Gateway
from scaling.decision import Scaler, scaling_policy
from serving import redis_pool, tokenization
from serving.admission import Admission, DrainMeter
from serving.dispatch import Dispatcher, Timeouts
from serving.lifecycle import Lifecycle
from serving.path import new_request_id
from serving.registry import WorkerRegistry
from serving.replies import ReplyHub
from serving.tokenizer import TokenizerCache
from shared.settings import GatewaySettings, redact_url
from shared.tenants import Tenant, TenantStore

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()
    lifecycle = Lifecycle(settings.shutdown_grace)
    scaler = Scaler(scaling_policy(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        names = settings.names
        redis = redis_pool.connect(settings.redis_url, health_check_interval=30)
        hub = ReplyHub.for_process(redis, names)
        hub_task = asyncio.create_task(hub.run(), name="reply-hub")
        timeouts = Timeouts(
            total=settings.request_timeout, stall=settings.stall_timeout, queue=settings.queue_timeout
        )
        registry = WorkerRegistry(redis, names, settings.worker_ttl, scale_from_zero=settings.scale_from_zero)
        drain = DrainMeter()
        gateway = Gateway(
            settings=settings,
            redis=redis,
            registry=registry,
            tokenizers=TokenizerCache(),
            dispatcher=Dispatcher(redis, hub, names, timeouts, metrics=metrics),
            auth=Authenticator(TenantStore(redis, names, settings.tenant_defaults()), required=settings.auth),
            admission=Admission(redis, names, settings.request_timeout, drain, settings.max_backlog_total),
            lifecycle=lifecycle,
        )
        app.state.gateway = gateway
        app.state.responses = responses_api.ResponsesAPI(gateway)
        probe = QueueProbe(redis, names, metrics, settings.worker_ttl, drain, scaler)
        background = [
            hub_task,
            asyncio.create_task(gateway.prewarm(), name="tokenizer-prewarm"),
            asyncio.create_task(probe.run(), name="fleet-probe"),
            asyncio.create_task(metrics.watch_loop(), name="loop-lag"),
        ]
        try:
            async with asyncio.timeout(5):
                await hub.connected.wait()
            await gateway.admission.prepare()
        except (TimeoutError, RedisError, OSError):
            log.warning(
                "Redis at %s is not answering yet; requests get 503 until it does",
                redact_url(settings.redis_url),
            )
        try:
            yield
        finally:
            await app.state.responses.close()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await redis.aclose()
            metrics.process_exited()

    app = FastAPI(title="Switchyard", version="0.1.0", lifespan=lifespan)
    app.state.lifecycle = lifecycle  # the server that runs the app drains it when told to stop
    _install_error_handlers(app, metrics)
    _install_routes(app)
    app.include_router(batch_api.router())  # Files, Batches, Usage
    app.include_router(responses_api.router())
    install(app, auth=settings.auth, max_n=settings.max_n)

    # /metrics and /scaling: on the metrics port only (see gateway.internal), never on this app's.
    app.state.internal = internal_app(metrics, scaler)

    uploads = {"/v1/files": batch_api.upload_cap(settings.file_max_bytes)}
    app.add_middleware(RequestEdge, max_body=settings.max_body_bytes, new_id=new_request_id, streamed=uploads)
    app.add_middleware(RequestCounter, metrics=metrics)
    return app


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _tenant(request: Request) -> Tenant:
    """Authentication runs as a dependency, before the body is even validated."""
    tenant = await _gateway(request).auth.tenant(request)
    request.state.tenant = tenant.name  # labels the request's metrics
    return tenant


AuthenticatedTenant = Annotated[Tenant, Depends(_tenant)]


def _install_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions", response_model=None, responses=completion_responses(ChatCompletion))
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, tenant: AuthenticatedTenant
    ) -> Any:
        return await _gateway(request).chat(request, body, tenant)

    @app.post("/v1/completions", response_model=None, responses=completion_responses(TextCompletion))
    async def completions(body: CompletionRequest, request: Request, tenant: AuthenticatedTenant) -> Any:
        return await _gateway(request).completion(request, body, tenant)

    @app.post(
        "/tokenize",
        dependencies=[Depends(_tenant)],
        response_model=None,
        responses=tokens_responses(TokenizeResponse),
    )
    async def tokenize(body: TokenizeRequest, request: Request) -> Any:
        gw = _gateway(request)
        entry = await tokenization.model_of(gw.jobs, body.model)
        request.state.model = entry.name
        return await tokenization.tokenize(gw.jobs, entry, body)

    @app.post(
        "/detokenize",
        dependencies=[Depends(_tenant)],
        response_model=None,
        responses=tokens_responses(DetokenizeResponse),
    )
    async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
        gw = _gateway(request)
        entry = await tokenization.model_of(gw.jobs, body.model)
        request.state.model = entry.name
        return await tokenization.detokenize(await gw.tokenizers.get(entry.tokenizer), body)

    @app.post("/v1/embeddings", response_model=None, responses=embedding_responses(EmbeddingList))
    async def create_embeddings(body: EmbeddingRequest, request: Request, tenant: AuthenticatedTenant) -> Any:
        return await embeddings(_gateway(request), request, body, tenant)

    @app.get(
        "/v1/models",
        dependencies=[Depends(_tenant)],
        response_model=None,
        responses={200: {"model": ModelList}, **AUTH_ERRORS},
    )
    async def list_models(request: Request) -> dict[str, Any]:
        models = await _gateway(request).registry.models()
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": m.created,
                    "owned_by": "switchyard",
                    "max_model_len": m.max_model_len,
                    "engine": m.engine,
                }
                for m in sorted(models.values(), key=lambda m: m.name)
            ],
        }

    @app.get(
        "/v1/models/{model_id:path}",
        dependencies=[Depends(_tenant)],
        response_model=None,
        responses={200: {"model": ModelCard}, 404: MODEL_NOT_FOUND, **AUTH_ERRORS},
    )
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        models = await _gateway(request).registry.models()
        if model_id not in models:
            raise NotFound(f"The model '{model_id}' does not exist", param="model")
        m = models[model_id]
        return {
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "switchyard",
            "max_model_len": m.max_model_len,
            "engine": m.engine,
        }

    @app.get("/healthz", response_model=None, responses={200: {"model": Health}})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None, responses={200: {"model": Readiness}, 503: {"model": Readiness}})
    async def readyz(request: Request) -> JSONResponse:
        """Ready means fast: Redis answers, a live worker serves a model and its tokenizer is loaded.
        Anyone may ask, so the answer names no model and no address (the log has the details)."""
        try:
            reason = await _gateway(request).unready()
        except (RedisError, OSError):
            reason = "Redis is not answering"
        if reason is not None:
            return JSONResponse({"status": "unready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})


def _install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if not exc.admitted and request.url.path in ENDPOINTS:
            metrics.rejected(rejection_reason(exc))
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = NotFound(str(exc.detail)) if exc.status_code == 404 else InvalidRequest(str(exc.detail))
        err.status = exc.status_code
        return JSONResponse(err.envelope(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("redis error: %s", exc)
        if request.url.path in ENDPOINTS:
            metrics.rejected("redis_unavailable")
        body = {
            "error": {
                "message": "the queue is unreachable",
                "type": "server_error",
                "param": None,
                "code": "service_unavailable",
            }
        }
        return JSONResponse(body, status_code=503, headers={"retry-after": "2"})


_UNION_MEMBERS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc: Any) -> list[str]:
    """The parameter a pydantic error location names, without the union members it tried (``str``,
    ``list[...]``, a model's class name) and FastAPI's ``body``."""
    return [
        str(p)
        for p in loc
        if p != "body" and not (isinstance(p, str) and ("[" in p or p in _UNION_MEMBERS or p[:1].isupper()))
    ]


def validation_error(errors: Any) -> InvalidRequest:
    """FastAPI's 422 detail list → one OpenAI-style 400 naming the first offending parameter. A
    parameter that may take several forms fails once per form: the error that got furthest into
    one of them says best what is wrong."""
    errors = list(errors or ())
    first = errors[0] if errors else {}
    field = _field_path(first.get("loc", ()))[:1]
    same = [e for e in errors if _field_path(e.get("loc", ()))[:1] == field]
    first = max(same, key=lambda e: len(_field_path(e.get("loc", ()))), default=first)
    loc = _field_path(first.get("loc", ()))
    param = ".".join(loc) or None
    kind = first.get("type", "")
    msg = str(first.get("msg", "invalid request"))
    if kind == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif kind == "json_invalid" or (param is None and isinstance(first.get("input"), bytes | str)):
        # Also a body sent with another content type: FastAPI hands it over unparsed.
        msg = "The request body is not valid JSON (send a JSON object with content-type: application/json)"
    elif param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        msg = "The request body must be a JSON object"
    elif kind == "missing":
        msg = f"Missing required parameter: '{param}'"
    else:
        msg = f"Invalid value for '{param}': {msg}" if param else msg
    return InvalidRequest(msg, param=param)
