"""HTTP routes: thin wrappers over ``Controller`` (the wire models live in negspace_contracts)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from negspace_contracts.controller import (
    AcceptRequest,
    AcceptResponse,
    CollectionInfo,
    CompareRequest,
    CompareResponse,
    DeletePointsRequest,
    DeletePointsResponse,
    DenseRequest,
    DenseResponse,
    EmbedRequest,
    EmbedResponse,
    MetricsRequest,
    MetricsResponse,
    SimilarRequest,
    SimilarResponse,
    UpsertPointsRequest,
    UpsertPointsResponse,
)
from negspace_contracts.errors import ServiceUnavailableError

from negspace_controller import comparison
from negspace_controller.service import Controller


def get_controller(request: Request) -> Controller:
    controller = getattr(request.app.state, "controller", None)
    if controller is None:
        raise ServiceUnavailableError(getattr(request.app.state, "load_error", None)
                                      or "the controller is still loading its embedder and store")
    return controller


ControllerDep = Annotated[Controller, Depends(get_controller)]

collections = APIRouter(prefix="/collections", tags=["collections"])


@collections.put("/{name}", response_model=CollectionInfo)
async def create_collection(name: str, controller: ControllerDep, response: Response) -> CollectionInfo:
    info, created = await controller.create(name)
    response.status_code = 201 if created else 200
    return info


@collections.get("/{name}", response_model=CollectionInfo)
async def get_collection(name: str, controller: ControllerDep) -> CollectionInfo:
    return await controller.info(name)


@collections.delete("/{name}", status_code=204)
async def delete_collection(name: str, controller: ControllerDep) -> Response:
    await controller.delete(name)
    return Response(status_code=204)


@collections.post("/{name}/points", response_model=UpsertPointsResponse)
async def upsert_points(name: str, body: UpsertPointsRequest, controller: ControllerDep) -> UpsertPointsResponse:
    return await controller.upsert(name, body.points)


@collections.post("/{name}/points/delete", response_model=DeletePointsResponse)
async def delete_points(name: str, body: DeletePointsRequest, controller: ControllerDep) -> DeletePointsResponse:
    return DeletePointsResponse(ids=await controller.delete_points(name, body.ids))


@collections.post("/{name}/similar", response_model=SimilarResponse)
async def similar(name: str, body: SimilarRequest, controller: ControllerDep) -> SimilarResponse:
    return await controller.similar(name, body.text, body.k, body.threshold, body.threshold_quantile)


@collections.post("/{name}/accept", response_model=AcceptResponse)
async def accept(name: str, body: AcceptRequest, controller: ControllerDep) -> AcceptResponse:
    return await controller.accept(name, body)


@collections.post("/{name}/dense", response_model=DenseResponse)
async def dense(name: str, body: DenseRequest, controller: ControllerDep) -> DenseResponse:
    return await controller.dense(name, body.k, body.knn)


@collections.post("/{name}/metrics", response_model=MetricsResponse)
async def collection_metrics(name: str, controller: ControllerDep,
                             body: MetricsRequest | None = None) -> MetricsResponse:
    return await controller.metrics(name, body or MetricsRequest())


embeddings = APIRouter(tags=["embeddings"])


@embeddings.post("/embed", response_model=EmbedResponse)
async def embed(body: EmbedRequest, controller: ControllerDep) -> EmbedResponse:
    vecs, truncated = await controller.embed(body.texts, body.query)
    return EmbedResponse(embeddings=vecs.tolist(), truncated=truncated)


comparisons = APIRouter(tags=["metrics"])


@comparisons.post("/compare", response_model=CompareResponse)
async def compare(body: CompareRequest, controller: ControllerDep) -> CompareResponse:
    """Collections ``a`` and ``b`` on one PCA basis fitted on both: metrics of each (and of each
    ``group_by`` value), and every point on their shared 2-D map."""
    return await comparison.compare(controller, body)
