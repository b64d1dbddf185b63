"""ServiceClient over a real socket: requests spread over its pools, idle connections kept and reused."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from negspace_contracts._http import ServiceClient
from negspace_servekit.testing import free_port


@pytest.fixture
def server():
    app = FastAPI()

    @app.get("/peer")
    async def peer(request: Request) -> dict:
        await asyncio.sleep(0.05)  # long enough for every request of a wave to be in flight at once
        return {"port": request.client.port}

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def connections(client: ServiceClient) -> list[int]:
    return [len(c._transport._pool.connections) for c in client._pools if c is not None]


@pytest.mark.parametrize("pools", [4, 16])
async def test_requests_spread_over_the_pools_and_connections_are_reused(server, pools):
    async with ServiceClient(server, token="", pools=pools) as c:
        async def wave() -> set[int]:
            rs = await asyncio.gather(*(c.send("GET", "/peer") for _ in range(48)))
            return {r.json()["port"] for r in rs}

        first = await wave()
        held = connections(c)
        assert held == [48 // pools] * pools, held  # round-robin: an equal share each
        assert len(first) == 48
        # the idle connections were kept and the next wave reuses them (httpcore may still open a few
        # when a release and a new request cross; one pool of 48 reused only 19-29 of them here)
        second = await wave()
        assert len(second & first) >= 40, (len(second & first), connections(c))
    assert all(cl.is_closed for cl in c._pools if cl is not None)


async def test_one_pool_when_a_transport_is_given():
    import httpx

    app = FastAPI()
    c = ServiceClient("http://x", transport=httpx.ASGITransport(app), pools=8)
    assert len(c._pools) == 1
    await c.aclose()
