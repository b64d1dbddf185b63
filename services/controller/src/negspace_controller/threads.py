"""The controller's BLAS threads: one by default (``--blas-threads``), set once at start-up.

Why. An insert or a check is one small matrix-vector product (n x 384 at n = 10^4: ~0.1 ms on
one core). With OpenBLAS's default of one thread per core, each such product wakes a second
thread that then spins waiting for work; on a 2-core machine that spinning takes the core the
event loop, the embedder and the other services need. ``make bench-scale`` (64 x 60 guided
run, one run each, alternated): 148.5 and 148.8 instructions/s with one BLAS thread against
106.9 and 128.6 with OpenBLAS's default (docs/benchmarks.md has the full run).

The price: bulk work (rebuilding a collection's lists without its log, the diversity metrics'
n x n products) runs on one BLAS thread too. Raising the limit around it was tried and dropped:
numpy's OpenBLAS (0.3.30) ignored changes of its thread count made after the first one from
another thread, and in a long-lived process even from the same one, so a switch could not be
relied on. A dedicated controller machine with cores to spare can set ``--blas-threads`` higher.
``/health`` reports the count OpenBLAS itself gives (``blas_threads``), not the setting.
"""

from __future__ import annotations

import logging

log = logging.getLogger("negspace.controller")


def configure(threads: int) -> int | None:
    """Limit the process's BLAS libraries to ``threads`` (call once, at start-up, before any other
    thread uses BLAS); returns the count they report afterwards."""
    from threadpoolctl import ThreadpoolController

    ThreadpoolController().limit(limits=threads, user_api="blas")
    now = current()
    if now != threads:
        log.warning("BLAS threads: asked for %d, OpenBLAS reports %s", threads, now)
    else:
        log.info("BLAS threads: %d", threads)
    return now


def current() -> int | None:
    """The BLAS thread count the loaded BLAS libraries report (the largest), or None without one."""
    from threadpoolctl import threadpool_info

    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None
