"""Work fanned out over the nodes, shared by the rounds, the method and the Q/A conversion: each unit
of work's reproducible seed (``derive_seed``) and the units run together (``gather``)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable

from negspace_contracts.errors import NegspaceError

from negspace_orchestrator.errors import DependencyDown, RunFailed


def derive_seed(seed: int, *parts: object) -> int:
    """A per-(node, round, attempt) seed: reproducible, so a lost attempt replays identically."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2  # < 2**62, fits every engine's seed range


async def gather(coros: list[Awaitable[None]]) -> None:
    """Run slot coroutines together; the first failure cancels the others and is re-raised
    (a dependency outage first, so the run pauses rather than fails)."""
    first: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            for c in coros:
                tg.create_task(c)
    # Raised after the try, not inside except*: Python < 3.11.4 (Debian bookworm's 3.11.2, the
    # containers' base) wraps an exception raised in an except* clause in an ExceptionGroup
    # (gh-103590), which the scheduler took for a crash and failed the run.
    except* DependencyDown as eg:
        first = eg.exceptions[0]
    except* (RunFailed, NegspaceError) as eg:
        first = first or eg.exceptions[0]
    if first is not None:
        raise first from None
