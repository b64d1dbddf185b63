"""``/tasks``: the lm-eval tasks shipped with the trainer and the include_path that loads them."""

from __future__ import annotations

from fastapi import APIRouter
from negspace_contracts.trainer import TaskList

from negspace_trainer.api.deps import TrainerDep

router = APIRouter(tags=["meta"])


@router.get("/tasks", response_model=TaskList)
async def list_tasks(trainer: TrainerDep) -> TaskList:
    return trainer.tasks()
