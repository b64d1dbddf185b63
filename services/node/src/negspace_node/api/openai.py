"""The OpenAI-compatible routes. Guidance extras travel in the body (``extra_body`` in OpenAI's client)."""

from __future__ import annotations

from fastapi import APIRouter
from negspace_contracts.node import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)

from negspace_node.api.deps import Service

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, service: Service) -> ChatCompletionResponse:
    return await service.chat(body)


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, service: Service) -> CompletionResponse:
    return await service.complete(body)


@router.get("/models", response_model=ModelList)
async def models(service: Service) -> ModelList:
    return service.models()
