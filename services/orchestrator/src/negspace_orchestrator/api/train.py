"""``/runs/{id}/train``: hand a run's Q/A records to the trainer and read its job back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from negspace_contracts.orchestrator import TrainRequest
from negspace_contracts.trainer import Job

from negspace_orchestrator.api.deps import Orch

router = APIRouter(prefix="/runs", tags=["train"])

SeedParam = Annotated[int | None, Query(ge=0, description="A training seed: one job per (run, seed), "
                                                          "beside the run's own job; the request's "
                                                          "training.seed is set to it.")]


@router.post("/{run_id}/train", status_code=201, response_model=Job)
async def train(run_id: str, orch: Orch, request: TrainRequest | None = None, seed: SeedParam = None) -> Job:
    return await orch.train(run_id, request, seed)


@router.get("/{run_id}/train", response_model=Job)
async def train_status(run_id: str, orch: Orch, seed: SeedParam = None) -> Job:
    return await orch.train_status(run_id, seed)
