"""What the routers are given: the ``Trainer`` on ``app.state`` (503 while it starts or stops)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from negspace_contracts.errors import ServiceUnavailableError

from negspace_trainer.serving import Trainer


def current_trainer(request: Request) -> Trainer | None:
    return getattr(request.app.state, "trainer", None)


def get_trainer(request: Request) -> Trainer:
    trainer = current_trainer(request)
    if trainer is None:
        raise ServiceUnavailableError("the trainer is starting or stopping; retry in a moment")
    return trainer


TrainerDep = Annotated[Trainer, Depends(get_trainer)]
