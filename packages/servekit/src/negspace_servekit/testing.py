"""Helpers shared by every layer's tests: free ports, an app run in-process with its lifespan,
a real process waited on until healthy (importable: pytest runs with ``--import-mode=importlib``,
so test modules cannot share code through conftest imports)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (all bound at once, so distinct)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


# --- in-process apps -------------------------------------------------------------------------
# httpx's ASGITransport does not run an app's lifespan; every layer's tests need "run the
# lifespan, then talk to the app over ASGI", so it is written once here.

@contextlib.asynccontextmanager
async def lifespan(app):
    """Run ``app``'s lifespan (start-up on enter, shutdown on exit)."""
    async with app.router.lifespan_context(app):
        yield app


def asgi_client(app, base_url: str = "http://service", timeout: float = 120) -> httpx.AsyncClient:
    """An httpx client that talks to ``app`` in-process (no socket)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url,
                             timeout=timeout)


@contextlib.asynccontextmanager
async def in_process(app, base_url: str = "http://service", *, client=None, timeout: float = 120):
    """The app with its lifespan running and a client on it: ``async with in_process(app) as http``
    gives a raw httpx client; ``client=TrainerClient`` (any typed client of ``negspace_contracts``,
    called as ``client(base_url, transport=...)``) gives that client instead."""
    async with lifespan(app):
        http = (client(base_url, transport=httpx.ASGITransport(app=app)) if client is not None
                else asgi_client(app, base_url, timeout))
        async with http:
            yield http


# --- real processes --------------------------------------------------------------------------

async def wait_healthy(url: str, proc: subprocess.Popen | None = None, *, timeout: float = 60,
                       describe: Callable[[], str] = lambda: "", poll_s: float = 0.2) -> None:
    """Wait until ``GET {url}/health`` answers 200. Fails at once (with ``describe()``, e.g. the
    process's log tail) if ``proc`` exited, and after ``timeout`` seconds otherwise."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as c:
        while True:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{url}: process exited with {proc.returncode}\n{describe()}")
            try:
                if (await c.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not healthy after {timeout}s\n{describe()}")
            await asyncio.sleep(poll_s)
