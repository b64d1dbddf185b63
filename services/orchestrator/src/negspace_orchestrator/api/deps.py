"""What the routers are given: the ``Orchestrator`` on ``app.state`` and the NDJSON streaming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import StreamingResponse

from negspace_orchestrator.serving import Batches, Orchestrator

NDJSON_BATCH = 500  # rows per store query while streaming instructions or Q/A records
NDJSON = {200: {"content": {"application/x-ndjson": {}}}}


def get_orch(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


Orch = Annotated[Orchestrator, Depends(get_orch)]


def ndjson(batches: Batches) -> StreamingResponse:
    """Stream ``batches(NDJSON_BATCH)`` one JSON object a line, letting the drivers run between batches."""

    async def lines() -> AsyncIterator[str]:
        for batch in batches(NDJSON_BATCH):
            yield "".join(m.model_dump_json() + "\n" for m in batch)
            await asyncio.sleep(0)

    return StreamingResponse(lines(), media_type="application/x-ndjson")
