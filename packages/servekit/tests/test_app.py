"""The shared server pieces, tested through a real app and the real typed client."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter
from negspace_contracts._http import ServiceClient
from negspace_contracts.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)
from negspace_servekit import ServiceSettings, create_app, health_response
from negspace_servekit.settings import parse_settings
from pydantic import BaseModel


class Item(BaseModel):
    x: int


def build(token: str | None = None, max_body: int = 4096, ready: bool = True):
    settings = ServiceSettings(api_token=token, max_body_bytes=max_body)
    app = create_app(service="demo", settings=settings, title="demo")
    router = APIRouter(prefix="/items")

    @router.post("", response_model=Item)
    async def make(item: Item) -> Item:
        if item.x == 404:
            raise NotFoundError("no item 404", param="x")
        if item.x == 429:
            raise RateLimitError("queue full", retry_after=2.5)
        if item.x == 500:
            raise RuntimeError("boom")
        return item

    app.include_router(router)

    @app.get("/health")
    async def health():
        return health_response("demo", "ok" if ready else "loading", None if ready else "warming up")

    return app


def client_for(app, token: str | None = None) -> ServiceClient:
    # raise_app_exceptions=False: like a real server, answer with the 500 envelope instead of
    # re-raising the app's exception into the test.
    return ServiceClient("http://demo", token=token or "",
                         transport=httpx.ASGITransport(app, raise_app_exceptions=False))


async def test_success_and_domain_errors_round_trip_to_typed_exceptions():
    async with client_for(build()) as c:
        assert await c.call("POST", "/items", Item, json_body={"x": 1}) == Item(x=1)
        with pytest.raises(NotFoundError) as nf:
            await c.call("POST", "/items", Item, json_body={"x": 404})
        assert nf.value.message == "no item 404" and nf.value.param == "x"
        with pytest.raises(RateLimitError) as rl:
            await c.call("POST", "/items", Item, json_body={"x": 429})
        assert rl.value.retry_after == 2.0 or rl.value.retry_after == 3.0


async def test_validation_errors_are_422_with_the_field_named():
    async with client_for(build()) as c:
        with pytest.raises(BadRequestError) as e:
            await c.call("POST", "/items", Item, json_body={"x": "not a number"})
        assert e.value.status_code == 422 and e.value.param == "x"
        assert "x:" in e.value.message


async def test_unexpected_errors_are_500_envelopes_without_internals(caplog):
    async with client_for(build()) as c:
        with pytest.raises(ServerError) as e:
            await c.call("POST", "/items", Item, json_body={"x": 500})
        assert "RuntimeError" in e.value.message and "boom" not in e.value.message


async def test_bearer_token_required_everywhere_but_health():
    app = build(token="s3cret")
    async with client_for(app) as anonymous:
        assert (await anonymous.health()).status == "ok"
        with pytest.raises(AuthenticationError):
            await anonymous.call("POST", "/items", Item, json_body={"x": 1})
    async with client_for(app, token="wrong") as wrong:
        with pytest.raises(AuthenticationError):
            await wrong.call("POST", "/items", Item, json_body={"x": 1})
        with pytest.raises(AuthenticationError):
            await wrong.send("GET", "/metrics")
    async with client_for(app, token="s3cret") as good:
        assert (await good.call("POST", "/items", Item, json_body={"x": 7})).x == 7


async def test_token_comes_from_the_shared_environment_variable(monkeypatch):
    monkeypatch.setenv("NEGSPACE_API_TOKEN", "from-env")
    assert ServiceSettings().token == "from-env"
    async with ServiceClient("http://x", transport=httpx.ASGITransport(build(token="from-env"))) as c:
        assert (await c.call("POST", "/items", Item, json_body={"x": 2})).x == 2


async def test_body_limit_by_header_and_by_stream():
    app = build(max_body=2048)
    async with client_for(app) as c:
        with pytest.raises(PayloadTooLargeError):
            await c.send("POST", "/items", json_body={"x": 1, "pad": "y" * 5000})

        async def chunks():
            for _ in range(10):
                yield b"a" * 1024

        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as raw:
            r = await raw.post("/items", content=chunks())
            assert r.status_code == 413


async def test_health_503_while_loading_and_metrics_count_routes():
    async with client_for(build(ready=False)) as c:
        health = await c.health()
        assert health.status == "loading" and health.detail == "warming up"
        with pytest.raises(ServiceUnavailableError):
            await c.send("GET", "/health")
    app = build()
    async with client_for(app) as c:
        await c.call("POST", "/items", Item, json_body={"x": 1})
        text = (await c.send("GET", "/metrics")).text
        assert 'route="/items"' in text and 'status="200"' in text


def test_settings_from_flags_override_environment(monkeypatch):
    monkeypatch.setenv("PORT", "1")
    s = parse_settings(ServiceSettings, ["--port", "9123", "--max-body-bytes", "4096"])
    assert s.port == 9123 and s.max_body_bytes == 4096 and s.host == "127.0.0.1"
