"""The dependency clients: node replicas with fail-over, the controller and
the trainer, each reached only through the typed clients of ``negspace_contracts``.

A retryable failure (connection refused, timeout, 429, 502/503/504, or a 500 from a replica) is
retried with exponential backoff and jitter, moving to the next node URL each time; once the
budget is spent ``DependencyDown`` says which service and why, and the driver pauses the run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from negspace_contracts.controller import ControllerClient
from negspace_contracts.errors import NegspaceError, ServerError, is_retryable
from negspace_contracts.node import ChatCompletionRequest, ChatCompletionResponse, NodeClient
from negspace_contracts.trainer import TrainerClient

from negspace_orchestrator.settings import OrchestratorSettings

log = logging.getLogger("negspace.orchestrator")
T = TypeVar("T")


class DependencyDown(Exception):
    """A dependency stayed down for the whole retry budget; the run is paused with this reason."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"{service} unavailable: {reason}")
        self.service = service
        self.reason = reason


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
        self.controller = (ControllerClient(settings.controller_url, token=settings.token,
                                            timeout=httpx.Timeout(settings.controller_timeout_s, connect=5.0),
                                            transport=transports.get(settings.controller_url))
                           if settings.controller_url else None)
        self.trainer = (TrainerClient(settings.trainer_url, token=settings.token,
                                      timeout=httpx.Timeout(settings.trainer_timeout_s, connect=5.0),
                                      transport=transports.get(settings.trainer_url))
                        if settings.trainer_url else None)
        self._rng = random.Random()

    async def aclose(self) -> None:
        for c in [*self.nodes, self.controller, self.trainer]:
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
    def _ctl(self) -> ControllerClient:
        if self.controller is None:
            raise DependencyDown("controller", "no --controller-url configured")
        return self.controller

    async def controller_call(self, what: str, fn: Callable[[ControllerClient], Awaitable[T]]) -> T:
        ctl = self._ctl()
        return await self._retrying(f"controller ({what})", lambda _tries: fn(ctl))

    # ---- health ----------------------------------------------------------------------------
    async def check(self) -> dict[str, str]:
        """Per dependency ``ok`` or the reason it is not (nodes: ok when at least one URL is)."""
        out: dict[str, str] = {}

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
        out["controller"] = await probe(self.controller) if self.controller else "no --controller-url configured"
        if self.trainer is not None:
            out["trainer"] = await probe(self.trainer)
        return out
