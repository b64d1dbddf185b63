from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from negspace_node.serving import NodeService


def get_service(request: Request) -> NodeService:
    return request.app.state.node


Service = Annotated[NodeService, Depends(get_service)]
