"""``/collections/{name}``: create, read, delete; points; similar, accept, dense, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from negspace_contracts.controller import (
    AcceptRequest,
    AcceptResponse,
    CollectionInfo,
    DeletePointsRequest,
    DeletePointsResponse,
    DenseRequest,
    DenseResponse,
    MetricsRequest,
    MetricsResponse,
    SimilarRequest,
    SimilarResponse,
    UpsertPointsRequest,
    UpsertPointsResponse,
)

from negspace_controller.api.deps import ControllerDep

router = APIRouter(prefix="/collections", tags=["collections"])


@router.put("/{name}", response_model=CollectionInfo)
async def create_collection(name: str, controller: ControllerDep, response: Response) -> CollectionInfo:
    info, created = await controller.create(name)
    response.status_code = 201 if created else 200
    return info


@router.get("/{name}", response_model=CollectionInfo)
async def get_collection(name: str, controller: ControllerDep) -> CollectionInfo:
    return await controller.info(name)


@router.delete("/{name}", status_code=204)
async def delete_collection(name: str, controller: ControllerDep) -> Response:
    await controller.delete(name)
    return Response(status_code=204)


@router.post("/{name}/points", response_model=UpsertPointsResponse)
async def upsert_points(name: str, body: UpsertPointsRequest, controller: ControllerDep) -> UpsertPointsResponse:
    return await controller.upsert(name, body.points)


@router.post("/{name}/points/delete", response_model=DeletePointsResponse)
async def delete_points(name: str, body: DeletePointsRequest, controller: ControllerDep) -> DeletePointsResponse:
    return DeletePointsResponse(ids=await controller.delete_points(name, body.ids))


@router.post("/{name}/similar", response_model=SimilarResponse)
async def similar(name: str, body: SimilarRequest, controller: ControllerDep) -> SimilarResponse:
    return await controller.similar(name, body.text, body.k, body.threshold, body.threshold_quantile)


@router.post("/{name}/accept", response_model=AcceptResponse)
async def accept(name: str, body: AcceptRequest, controller: ControllerDep) -> AcceptResponse:
    return await controller.accept(name, body)


@router.post("/{name}/dense", response_model=DenseResponse)
async def dense(name: str, body: DenseRequest, controller: ControllerDep) -> DenseResponse:
    return await controller.dense(name, body.k, body.knn)


@router.post("/{name}/metrics", response_model=MetricsResponse)
async def collection_metrics(name: str, controller: ControllerDep,
                             body: MetricsRequest | None = None) -> MetricsResponse:
    return await controller.metrics(name, body or MetricsRequest())
