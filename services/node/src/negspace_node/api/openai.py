"""The OpenAI-compatible routes. Guidance extras travel in the body (``extra_body`` in OpenAI's client).

A client that disconnects while its request waits or decodes aborts it: the generation is
cancelled (the engine frees the group's rows and KV blocks before its next step) instead of
decoding for nobody. ``stream: true`` answers server-sent events (``negspace_node.streaming``);
a client that leaves mid-stream aborts the generation the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from negspace_contracts.node import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)

from negspace_node.api.deps import Service

router = APIRouter(prefix="/v1", tags=["openai"])
T = TypeVar("T")
#: How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
#: nginx's "client closed request": nobody reads it, but logs and metrics show what happened.
CLIENT_CLOSED = 499


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | JSONResponse:
    """Run ``work``; if the client goes away first, cancel it and answer 499 (to nobody)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return JSONResponse({"error": {"message": "client disconnected; the request was aborted",
                                               "type": "client_closed_request", "param": None,
                                               "code": CLIENT_CLOSED}}, status_code=CLIENT_CLOSED)
    finally:
        if not task.done():          # we were cancelled ourselves (server shutdown)
            task.cancel()


#: OpenAPI: with ``stream: true`` the 200 is an event stream; each event (schema below) carries
#: one ``data`` line: a chunk (ChatCompletionChunk / CompletionChunk in negspace_contracts.node) as
#: JSON, an error envelope, or ``[DONE]``.
_STREAM = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chunk as JSON, {\"error\": {...}}, or [DONE]"}}}}}}}


def event_stream(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=_STREAM)
async def chat_completions(body: ChatCompletionRequest, service: Service, request: Request) -> ChatCompletionResponse:
    if body.stream:
        return event_stream(service.chat_stream(body))
    return await until_disconnected(request, service.chat(body))


@router.post("/completions", response_model=CompletionResponse, responses=_STREAM)
async def completions(body: CompletionRequest, service: Service, request: Request) -> CompletionResponse:
    if body.stream:
        return event_stream(service.complete_stream(body))
    return await until_disconnected(request, service.complete(body))


@router.get("/models", response_model=ModelList)
async def models(service: Service) -> ModelList:
    return service.models()
