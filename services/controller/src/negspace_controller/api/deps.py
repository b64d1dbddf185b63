"""What the routers are given: the ``Controller`` (``serving.py``) on ``app.state``, or a 503 while it loads."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from negspace_contracts.errors import ServiceUnavailableError

from negspace_controller.serving import Controller


def get_controller(request: Request) -> Controller:
    controller = getattr(request.app.state, "controller", None)
    if controller is None:
        raise ServiceUnavailableError(getattr(request.app.state, "load_error", None)
                                      or "the controller is still loading its embedder and store")
    return controller


ControllerDep = Annotated[Controller, Depends(get_controller)]
