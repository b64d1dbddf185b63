"""The dependency clients: node replicas with fail-over, the controller replicas and
the trainer, each reached only through the typed clients of ``negspace_contracts``.

A retryable failure (connection refused, timeout, 429, 502/503/504, or a 500 from a replica) is
retried with exponential backoff and jitter, moving to the next node URL each time; once the
budget is spent ``DependencyDown`` says which service and why, and the driver pauses the run.

Node URLs are interchangeable replicas; controller URLs are not: each run's collection (and its
in-memory index) lives on exactly one controller, the one recorded in the run's row, and every
call for that run goes there, never to another replica (``controller_call(url, ...)``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from negspace_contracts.controller import ControllerClient, controller_for
from negspace_contracts.errors import NegspaceError, ServerError, is_retryable
from negspace_contracts.node import ChatCompletionRequest, ChatCompletionResponse, NodeClient
from negspace_contracts.trainer import TrainerClient

from negspace_orchestrator.errors import DependencyDown
from negspace_orchestrator.settings import OrchestratorSettings

log = logging.getLogger("negspace.orchestrator")
T = TypeVar("T")


def not_configured(url: str, configured: list[str]) -> str:
    """Why a run on controller ``url`` cannot go on, and what to do."""
    have = ", ".join(configured) or "none"
    return (f"its collection lives on controller {url}, which is not among the configured --controller-url "
            f"({have}); a run never moves to another controller (its collection and index are on that "
            "one): add the URL back and resume the run")


def _worth_retrying(exc: BaseException) -> bool:
    return is_retryable(exc) or isinstance(exc, ServerError)


@dataclass
class Generation:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    url: str
    finish_reason: str | None = None  # "stop", or "length" when cut at max_tokens


class Dependencies:
    def __init__(self, settings: OrchestratorSettings, *,
                 transports: dict[str, httpx.AsyncBaseTransport] | None = None) -> None:
        """``transports`` maps a URL to an in-process transport (tests: ``httpx.ASGITransport``)."""
        self.settings = settings
        transports = transports or {}
        self.node_urls = list(settings.node_url)
        self.nodes = [NodeClient(u, token=settings.token, timeout=httpx.Timeout(settings.node_timeout_s, connect=5.0),
                                 transport=transports.get(u)) for u in self.node_urls]
        self.controller_urls = list(settings.controller_url)
        self.controllers = {u: ControllerClient(u, token=settings.token,
                                                timeout=httpx.Timeout(settings.controller_timeout_s, connect=5.0),
                                                transport=transports.get(u)) for u in self.controller_urls}
        self.trainer = (TrainerClient(settings.trainer_url, token=settings.token,
                                      timeout=httpx.Timeout(settings.trainer_timeout_s, connect=5.0),
                                      transport=transports.get(settings.trainer_url))
                        if settings.trainer_url else None)
        self._rng = random.Random()

    async def aclose(self) -> None:
        for c in [*self.nodes, *self.controllers.values(), self.trainer]:
            if c is not None:
                await c.aclose()

    def _backoff(self, tries: int) -> float:
        base = min(self.settings.retry_max_backoff_s, self.settings.retry_backoff_s * (2 ** tries))
        return base * (0.5 + self._rng.random() / 2)

    async def _retrying(self, service: str, fn: Callable[[int], Awaitable[T]]) -> T:
        last: BaseException | None = None
        for tries in range(self.settings.retry_attempts):
            try:
                return await fn(tries)
            except NegspaceError as exc:
                if not _worth_retrying(exc):
                    exc.message = f"{service} refused the request ({exc.status_code}): {exc.message}"
                    raise
                last = exc
                log.warning("%s failed (try %d/%d): %s", service, tries + 1, self.settings.retry_attempts,
                            exc.message)
            if tries + 1 < self.settings.retry_attempts:
                await asyncio.sleep(self._backoff(tries))
        raise DependencyDown(service, getattr(last, "message", str(last)))

    # ---- node ------------------------------------------------------------------------------
    async def generate(self, logical_node: int, request: ChatCompletionRequest) -> Generation:
        """One chat completion for a logical node: its home URL first, then the next ones."""
        if not self.nodes:
            raise DependencyDown("node", "no --node-url configured")

        async def once(tries: int) -> Generation:
            i = (logical_node + tries) % len(self.nodes)
            start = time.perf_counter()
            resp: ChatCompletionResponse = await self.nodes[i].chat.create(request)
            latency = time.perf_counter() - start
            return Generation(text=resp.text, prompt_tokens=resp.usage.prompt_tokens,
                              completion_tokens=resp.usage.completion_tokens, latency_s=latency,
                              url=self.node_urls[i],
                              finish_reason=resp.choices[0].finish_reason if resp.choices else None)

        return await self._retrying("node", once)

    # ---- controller ------------------------------------------------------------------------
    def route(self, collection: str) -> str | None:
        """The controller a NEW collection goes to: rendezvous hashing of its name over the
        configured URLs (None when there is none). Only for placing a new run: an existing run's
        controller is the one recorded with it, whatever the configured list says now."""
        return controller_for(collection, self.controller_urls) if self.controller_urls else None

    def controller(self, url: str | None) -> ControllerClient:
        """The client of controller ``url`` (a run's recorded one); DependencyDown when there is
        none configured or ``url`` is no longer configured (never another replica instead)."""
        if not self.controller_urls:
            raise DependencyDown("controller", "no --controller-url configured")
        if url is None:
            raise DependencyDown("controller", "the run has no controller recorded yet (restart the "
                                               "orchestrator with --controller-url to assign it)")
        client = self.controllers.get(url)
        if client is None:
            raise DependencyDown(f"controller {url}", not_configured(url, self.controller_urls), controller=url)
        return client

    async def controller_call(self, url: str | None, what: str,
                              fn: Callable[[ControllerClient], Awaitable[T]]) -> T:
        """``fn`` on the run's controller ``url``, retried there; DependencyDown names the URL."""
        ctl = self.controller(url)
        try:
            return await self._retrying(f"controller {url} ({what})", lambda _tries: fn(ctl))
        except DependencyDown as exc:
            exc.controller = url
            raise

    # ---- health ----------------------------------------------------------------------------
    async def check(self) -> dict[str, Any]:
        """Per dependency ``ok`` or the reason it is not. Nodes: ok when at least one URL is (they
        are interchangeable); ``controller``: ok when every replica is (each holds its own runs),
        with each replica's own state under ``controllers`` (URL -> ok or the reason)."""
        out: dict[str, Any] = {}

        async def probe(client) -> str:
            try:
                h = await asyncio.wait_for(client.health(), timeout=5.0)
                return "ok" if h.status == "ok" else f"{h.status}: {h.detail or ''}".strip()
            except (NegspaceError, TimeoutError) as exc:
                return getattr(exc, "message", None) or repr(exc)

        if self.nodes:
            results = await asyncio.gather(*(probe(n) for n in self.nodes))
            out["node"] = "ok" if "ok" in results else "; ".join(
                f"{u}: {r}" for u, r in zip(self.node_urls, results, strict=True))
        else:
            out["node"] = "no --node-url configured"
        if self.controllers:
            results = await asyncio.gather(*(probe(c) for c in self.controllers.values()))
            out["controllers"] = dict(zip(self.controller_urls, results, strict=True))
            out["controller"] = "ok" if all(r == "ok" for r in results) else "; ".join(
                f"{u}: {r}" for u, r in out["controllers"].items() if r != "ok")
        else:
            out["controller"] = "no --controller-url configured"
            out["controllers"] = {}
        if self.trainer is not None:
            out["trainer"] = await probe(self.trainer)
        return out
