"""The one HTTP layer under every typed client: base URL, auth, timeouts, error mapping.

Callers never build URLs or parse dicts: each service's client (e.g. ``ControllerClient``)
groups its calls by resource and returns parsed models.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from negspace_contracts.common import TOKEN_ENV
from negspace_contracts.errors import (
    ConnectionFailedError,
    NegspaceError,
    RateLimitError,
    TimeoutError_,
    error_class_for,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
# Streams (server-sent events, JSONL) may last hours but never go quiet for long: the orchestrator
# sends a keep-alive every 15 s, so a 60 s silence means a dead connection, not a slow run.
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


# httpx keeps 20 idle connections by default: the orchestrator's 64-256 concurrent slots per
# service then close and reopen connections all the time (a TCP connect per call).
DEFAULT_LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=1024, keepalive_expiry=5.0)
# httpcore 1.0's pool walks every connection it holds (a poll() on each idle socket) at every
# request and release, so a client's cost per call grows with its concurrency (encode/httpcore#1035;
# fixed only in the pydantic/httpx2 fork, #974/#1169). Requests are spread round-robin over this
# many independent pools, each holding a 1/POOLS share of the connections. bench-scale, 64
# concurrent slots, one run each: 1 pool 103 instructions/s, 4: 159, 8: 197 and 205, 16: 206.
DEFAULT_POOLS = 16


@functools.cache
def _ssl_context():
    """One SSL context for every client of the process (httpx builds one per client otherwise: ~25 ms each)."""
    return httpx.create_ssl_context()


class _UseClientDefault:
    """Marker: a call without ``timeout=`` uses the client's timeout; ``timeout=None`` waits forever."""

    def __repr__(self) -> str:
        return "CLIENT_DEFAULT"


CLIENT_DEFAULT: Any = _UseClientDefault()


def _error_from_response(response: httpx.Response) -> NegspaceError:
    message = response.text[:2000] or response.reason_phrase
    param = None
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message", message))
            param = err.get("param")
        elif isinstance(body, dict) and "detail" in body:
            message = str(body["detail"])
    except (ValueError, json.JSONDecodeError):
        pass
    cls = error_class_for(response.status_code)
    if cls is RateLimitError:
        retry_after = response.headers.get("Retry-After")
        return RateLimitError(message, param=param, status_code=response.status_code,
                              retry_after=float(retry_after) if retry_after else None)
    return cls(message, param=param, status_code=response.status_code)


class ServiceClient:
    """Async HTTP client for one negspace service.

    ``token`` defaults to ``$NEGSPACE_API_TOKEN``; ``transport`` lets tests talk to an app
    in-process (``httpx.ASGITransport(app)``). ``pools``: independent connection pools the
    requests are spread over (see ``DEFAULT_POOLS``); streams and health checks use the first.
    """

    def __init__(self, base_url: str, *, token: str | None = None,
                 timeout: float | httpx.Timeout | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 headers: Mapping[str, str] | None = None, pools: int = DEFAULT_POOLS) -> None:
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        self.base_url = base_url.rstrip("/")
        n = 1 if transport is not None else max(1, pools)  # a given transport (tests' ASGI app): one client

        def make() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=self.base_url, headers=all_headers, timeout=timeout,
                                     transport=transport, limits=DEFAULT_LIMITS, verify=_ssl_context())

        self._make = make
        self._http = make()
        # created on first use: a client that never has more than one call in flight builds one
        self._pools: list[httpx.AsyncClient | None] = [self._http] + [None] * (n - 1)
        self._next = 0

    def _pool(self) -> httpx.AsyncClient:
        """The next pool, round-robin."""
        self._next = (self._next + 1) % len(self._pools)
        client = self._pools[self._next]
        if client is None:
            client = self._pools[self._next] = self._make()
        return client

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        errors = []
        for c in self._pools:  # every pool closed, even when one fails
            if c is None:
                continue
            try:
                await c.aclose()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def send(self, method: str, path: str, *, json_body: Any = None,
                   params: Mapping[str, Any] | None = None,
                   timeout: float | httpx.Timeout | None = CLIENT_DEFAULT) -> httpx.Response:
        """Send a request; return the response on 2xx, raise the mapped error otherwise.

        ``timeout``: omitted = the client's; a number or ``httpx.Timeout``; ``None`` = no limit
        on reading (long server-side work such as Q/A conversion; connecting still times out).
        """
        if isinstance(json_body, BaseModel):
            json_body = json_body.model_dump(mode="json", exclude_unset=False)
        kwargs: dict[str, Any] = {}
        if timeout is None:
            kwargs["timeout"] = httpx.Timeout(None, connect=5.0)
        elif timeout is not CLIENT_DEFAULT:
            kwargs["timeout"] = timeout
        try:
            response = await self._pool().request(method, path, json=json_body, params=params, **kwargs)
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"{method} {self.base_url}{path} timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise ConnectionFailedError(
                f"cannot reach {self.base_url} ({method} {path}): {exc!r}") from exc
        if response.status_code >= 400:
            raise _error_from_response(response)
        return response

    async def call(self, method: str, path: str, response_type: type[T] | Any, *,
                   json_body: Any = None, params: Mapping[str, Any] | None = None,
                   timeout: float | httpx.Timeout | None = CLIENT_DEFAULT) -> T:
        response = await self.send(method, path, json_body=json_body, params=params, timeout=timeout)
        if response_type is None:
            return None  # type: ignore[return-value]
        return TypeAdapter(response_type).validate_json(response.content)

    async def stream_lines(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                           timeout: float | httpx.Timeout | None = None) -> AsyncIterator[str]:
        """Yield the body's lines as they arrive (JSONL exports, server-sent events)."""
        try:
            async with self._http.stream(method, path, params=params,
                                         timeout=timeout if timeout is not None else
                                         STREAM_TIMEOUT) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_from_response(response)
                async for line in response.aiter_lines():
                    yield line
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"{method} {self.base_url}{path} timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise ConnectionFailedError(f"cannot reach {self.base_url}: {exc!r}") from exc

    async def health(self) -> HealthResponse:
        """GET /health, returning the body whether the service is ready (200) or not (503)."""
        from negspace_contracts.common import HealthResponse

        try:
            response = await self._http.get("/health")
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"{self.base_url}/health timed out") from exc
        except httpx.TransportError as exc:
            raise ConnectionFailedError(f"cannot reach {self.base_url}: {exc!r}") from exc
        if response.status_code in (200, 503):
            try:
                return HealthResponse.model_validate_json(response.content)
            except ValueError:
                pass
        raise _error_from_response(response)


class Resource:
    """A group of calls on one resource of a service (``client.collections``, ``client.runs``)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client


from negspace_contracts.common import HealthResponse  # noqa: E402  (typing of health())
