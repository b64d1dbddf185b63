"""The controller's BLAS threads: one on the request path, every core for bulk work.

Why. An insert or a check is one small matrix-vector product (n x 384 at n = 10^4: ~0.1 ms on
one core). With OpenBLAS's default of one thread per core, each such product wakes a second
thread that then spins waiting for work; on a 2-core machine that spinning takes the core the
event loop, the embedder and the other services need. ``make bench-scale`` (64 x 60 guided
run, one run each, alternated): 148.5 and 148.8 instructions/s with one BLAS thread against
106.9 and 128.6 with OpenBLAS's default (docs/benchmarks.md has the full run).

Bulk work (loading a collection: replaying or rebuilding its neighbour lists; the diversity
metrics and comparisons: n x n products) gains from every core, so it raises the limit for as
long as it runs (``async with bulk():``). The limit is process-wide (that is how OpenBLAS works): a
request served while bulk work runs may use the extra thread too, which costs it time, never
correctness.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

log = logging.getLogger("negspace.controller")

_depth = 0  # bulk blocks running (changed on the event loop's thread only)
_request_threads: int | None = None  # None: never configured (tests that build a Controller directly)
_controller = None


def _limit(n: int) -> None:
    global _controller
    from threadpoolctl import ThreadpoolController

    if _controller is None:
        _controller = ThreadpoolController()
    _controller.limit(limits=n, user_api="blas")


def bulk_threads() -> int:
    return os.cpu_count() or 1


def configure(request_threads: int) -> None:
    """Set the BLAS threads of the request path (``--blas-threads``) for this process."""
    global _request_threads
    _request_threads = request_threads
    if _depth == 0:
        _limit(request_threads)
    log.info("BLAS threads: %d for requests, %d for bulk work (loading a collection, metrics)",
             request_threads, bulk_threads())


@asynccontextmanager
async def bulk() -> AsyncIterator[None]:
    """Every core's worth of BLAS threads while the block runs (nested and concurrent blocks share it).

    An async context, entered on the event loop's thread around ``await asyncio.to_thread(...)``:
    numpy's OpenBLAS (0.3.30) was seen to ignore a change of its thread count made from a worker
    thread after the main thread had set one, so the limit is changed on the thread that set it.
    """
    global _depth
    _depth += 1
    if _depth == 1 and _request_threads is not None:
        _limit(bulk_threads())
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _request_threads is not None:
            _limit(_request_threads)
