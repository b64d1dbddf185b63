"""App factory pieces: error envelope, bearer auth, body-size limit, Prometheus metrics."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from negspace_contracts.common import HealthResponse
from negspace_contracts.errors import (
    AuthenticationError,
    BadRequestError,
    ErrorBody,
    ErrorResponse,
    NegspaceError,
    PayloadTooLargeError,
    error_class_for,
)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from negspace_servekit.settings import ServiceSettings

log = logging.getLogger("negspace")

UNAUTHENTICATED_PATHS = frozenset({"/health"})


def error_json(exc: NegspaceError) -> JSONResponse:
    return JSONResponse(exc.to_response().model_dump(), status_code=exc.status_code, headers=exc.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc) or "body"
        first = first or where
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request", first


async def _negspace_error(_: Request, exc: NegspaceError) -> JSONResponse:
    if exc.status_code >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    return error_json(exc)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    return error_json(BadRequestError(message, param=param, status_code=422))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    cls = error_class_for(exc.status_code)
    err = cls(str(exc.detail), status_code=exc.status_code, headers=getattr(exc, "headers", None))
    return error_json(err)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = ErrorResponse(error=ErrorBody(message=f"internal error ({type(exc).__name__}); see the service log",
                                         type="internal_error", code=500))
    return JSONResponse(body.model_dump(), status_code=500)


class AuthMiddleware:
    """Require ``Authorization: Bearer <token>`` on every route but /health (constant-time check)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            err = AuthenticationError("missing or invalid bearer token: send 'Authorization: Bearer <token>'",
                                      headers={"WWW-Authenticate": "Bearer"})
            await error_json(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies above ``max_bytes`` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_json(too_large)(scope, receive, send)
            return
        seen = 0
        started = False
        refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer 413 ourselves (FastAPI would turn an exception here into a 400) and
                    # tell the app the client went away, so it stops reading and never answers.
                    refused = True
                    if not started:
                        await error_json(too_large)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not refused:
                raise




class MetricsMiddleware:
    """Count requests and time them per route template, into the app's own registry."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, service: str) -> None:
        self.app = app
        self.requests = Counter("negspace_http_requests", "HTTP requests", ["service", "method", "route", "status"],
                                registry=registry)
        self.latency = Histogram("negspace_http_request_duration_seconds", "HTTP request latency",
                                 ["service", "method", "route"], registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.requests.labels(self.service, scope["method"], route, str(status)).inc()
            self.latency.labels(self.service, scope["method"], route).observe(time.perf_counter() - start)


def health_response(service: str, status: str, detail: str | None = None, **info: Any) -> JSONResponse:
    """``/health`` body: 200 when ``ok``, 503 otherwise (loading, error) with the reason."""
    body = HealthResponse(status=status, service=service, detail=detail, info=info)  # type: ignore[arg-type]
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if status == "ok" else 503)


def create_app(*, service: str, settings: ServiceSettings, title: str, description: str = "",
               lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
               version: str = "0.1.0") -> FastAPI:
    """A FastAPI app with negspace's error envelope, auth, body limit and ``/metrics``.

    Services add their routers and ``/health``; heavy resources belong in ``lifespan``.
    """
    app = FastAPI(title=title, description=description, version=version, lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
    registry = CollectorRegistry()
    app.state.settings = settings
    app.state.metrics_registry = registry
    app.add_exception_handler(NegspaceError, _negspace_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    # Outermost first at request time: metrics see every status, auth runs before body parsing.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.token:
        app.add_middleware(AuthMiddleware, token=settings.token)
    app.add_middleware(MetricsMiddleware, registry=registry, service=service)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
