"""``POST /embed``: texts -> unit vectors (and which were truncated)."""

from __future__ import annotations

from fastapi import APIRouter
from negspace_contracts.controller import (
    EmbedRequest,
    EmbedResponse,
)

from negspace_controller.api.deps import ControllerDep

router = APIRouter(tags=["embeddings"])


@router.post("/embed", response_model=EmbedResponse)
async def embed(body: EmbedRequest, controller: ControllerDep) -> EmbedResponse:
    vecs, truncated = await controller.embed(body.texts, body.query)
    return EmbedResponse(embeddings=vecs.tolist(), truncated=truncated)
