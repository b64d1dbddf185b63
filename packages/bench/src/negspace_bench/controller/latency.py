"""``python -m negspace_bench.controller.latency`` (``make bench-controller``): index and service latency.

Precomputed random unit embeddings (d = 384, MiniLM's size) so the embedder does not dominate.
At each n: build the index (an O(n^2 d) rebuild: every neighbour list from scratch), then
alternate ``--ops`` inserts of new points with ``dense(k=3, knn=5)`` calls and time each; time
the brute-force recomputation of the same answer (the reference's n x n similarity matrix,
computed in row blocks so 100k fits in memory); record peak memory. Service rows time the
whole write path (Controller.upsert: Qdrant local ``:memory:`` + index) and ``dense``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

import numpy as np
from negspace_contracts.controller import PointIn
from negspace_controller.index import DensityIndex
from negspace_controller.serving import Controller
from negspace_controller.store_qdrant import LocalStore

DIM = 384


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def bench_index(n: int, ops: int, brute_reps: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = unit(rng, n + ops)
    idx = DensityIndex(DIM, capacity=32, initial_rows=n + ops)
    log(f"n={n}: building the index (every neighbour list from scratch)...")
    t = time.perf_counter()
    idx.load(list(range(n)), x[:n], [""] * n, list(range(n)),
             progress=lambda d, tot: log(f"  {d}/{tot}") if d % 20480 < 512 and d < tot else None)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    idx.dense(3, 5)
    heap_s = time.perf_counter() - t
    ins, den = [], []
    for i in range(ops):
        t = time.perf_counter()
        idx.add(n + i, x[n + i], "")
        ins.append(time.perf_counter() - t)
        t = time.perf_counter()
        idx.dense(3, 5)
        den.append(time.perf_counter() - t)
    got = [h.key for h in idx.dense(3, 5)]
    brute = []
    for r in range(brute_reps):
        log(f"n={n}: brute-force recomputation {r + 1}/{brute_reps}...")
        t = time.perf_counter()
        want = [h.key for h in idx.dense_bruteforce(3, 5)]
        brute.append(time.perf_counter() - t)
    if brute_reps:
        assert got == want, f"index and brute force disagree at n={n}: {got} vs {want}"
    index_mib = sum(a.nbytes for a in (idx._vec, idx._nsim, idx._nrow, idx._ncount, idx._seq,
                                       idx._version)) / 2**20
    out = dict(n=n, build_s=build_s, heap_ms=heap_s * 1e3, ins50=pct(ins, 50), ins99=pct(ins, 99),
               den50=pct(den, 50), den99=pct(den, 99),
               brute50=pct(brute, 50) if brute else build_s * 1e3, brute_measured=bool(brute),
               index_mib=index_mib, rss_mib=peak_rss_mib())
    out["speedup"] = out["brute50"] / out["den50"]
    log(f"n={n}: insert p50 {out['ins50']:.2f} ms p99 {out['ins99']:.2f} ms | dense p50 {out['den50']:.3f} ms "
        f"p99 {out['den99']:.3f} ms | brute force {out['brute50']:.0f} ms | x{out['speedup']:.0f} | "
        f"peak RSS {out['rss_mib']:.0f} MiB")
    return out


class _Precomputed:
    """An Embedder stand-in that returns stored vectors for texts 'p<i>' (embedding excluded)."""

    name = "precomputed-random"
    dimension = DIM
    max_tokens = 512
    query_instruction = None

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def prepare(self, texts, query=False):
        return list(texts)

    def encode_prepared(self, texts):
        return self.x[[int(t[1:]) for t in texts]], [False] * len(texts)

    def encode(self, texts, *, query=False):
        return self.encode_prepared(texts)


async def _bench_service(n: int, ops: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    x = unit(rng, n + ops)
    store = LocalStore(":memory:")
    ctl = Controller(_Precomputed(x), store, knn_capacity=32)  # type: ignore[arg-type]
    await ctl.create("bench")
    log(f"service n={n}: loading points through Controller.upsert (batches of 512)...")
    for s in range(0, n, 512):
        await ctl.upsert("bench", [PointIn(id=i, text=f"p{i}") for i in range(s, min(n, s + 512))])
    await ctl.dense("bench", 3, 5)
    ins, den = [], []
    for i in range(n, n + ops):
        t = time.perf_counter()
        await ctl.upsert("bench", [PointIn(id=i, text=f"p{i}", payload={"run": "bench", "round": 1})])
        ins.append(time.perf_counter() - t)
        t = time.perf_counter()
        await ctl.dense("bench", 3, 5)
        den.append(time.perf_counter() - t)
    store.close()
    out = dict(n=n, ins50=pct(ins, 50), ins99=pct(ins, 99), den50=pct(den, 50), den99=pct(den, 99))
    log(f"service n={n}: upsert p50 {out['ins50']:.2f} ms p99 {out['ins99']:.2f} ms | dense p50 "
        f"{out['den50']:.2f} ms p99 {out['den99']:.2f} ms")
    return out


def render(rows: list[dict], svc: list[dict], ops: int) -> str:
    from negspace_servekit.benchdoc import machine_line

    lines = [
        "## Controller: exact incremental density index",
        "",
        f"{machine_line()}. d = 384 random unit vectors, neighbour capacity K = 32, "
        f"`dense(k=3, knn=5)`; {ops} inserts alternating with {ops} `dense` calls per n. "
        "Brute force = the reference's recomputation (n x n cosine matrix, top-knn per row, "
        "densest k), in row blocks; at 100k (40 GB as one matrix) its time is the one full rebuild.",
        "",
        "| n | index insert p50 / p99 (ms) | `dense` p50 / p99 (ms) | brute force (ms) | dense speed-up "
        "| rebuild from vectors (s) | index memory (MiB) | peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        brute = f"{r['brute50']:.0f}" + ("" if r["brute_measured"] else " (rebuild)")
        lines.append(f"| {r['n']:,} | {r['ins50']:.2f} / {r['ins99']:.2f} | {r['den50']:.3f} / {r['den99']:.3f} "
                     f"| {brute} | {r['speedup']:,.0f}x | {r['build_s']:.1f} | {r['index_mib']:.0f} "
                     f"| {r['rss_mib']:.0f} |")
    if svc:
        lines += ["", "Whole write path (`Controller.upsert` of one point: Qdrant local mode `:memory:` "
                  "+ index; embedder excluded) and `dense` through the service layer:", "",
                  "| n | upsert p50 / p99 (ms) | `dense` p50 / p99 (ms) |", "|---:|---:|---:|"]
        for s in svc:
            lines.append(f"| {s['n']:,} | {s['ins50']:.2f} / {s['ins99']:.2f} | {s['den50']:.2f} / {s['den99']:.2f} |")
    by_n = {r["n"]: r for r in rows}
    checks = []
    if 100_000 in by_n:
        checks.append(f"`dense` p50 at 100k = {by_n[100_000]['den50']:.3f} ms (target < 50 ms): "
                      f"{'met' if by_n[100_000]['den50'] < 50 else 'NOT met'}")
    if 10_000 in by_n:
        checks.append(f"speed-up over brute force at 10k = {by_n[10_000]['speedup']:,.0f}x (target >= 100x): "
                      f"{'met' if by_n[10_000]['speedup'] >= 100 else 'NOT met'}")
    if checks:
        lines += ["", "Targets: " + "; ".join(checks) + "."]
    lines += ["", "Insert cost is one matrix-vector product over all stored vectors (O(n d), memory-bound) "
              "plus O(affected x K) list merges; `dense` pops k entries of a max-heap (O(k log n)). "
              "The machine is shared: absolute figures are noisy, the ratios within a row are not."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_bench.controller.latency", description=__doc__)
    p.add_argument("--sizes", default="1000,10000", help="exact-index rows (the 10^5 exact build is the "
                   "overlap row's reference)")
    p.add_argument("--large", action="store_true", help="then run negspace_bench.controller.large (approximate "
                   "mode: overlap with exact at 10^5, 10^6 points, restart after SIGKILL; its own section)")
    p.add_argument("--large-args", default="", help="arguments for negspace_bench.controller.large, e.g. '--large-size 200000'")
    p.add_argument("--service-sizes", default="1000,10000")
    p.add_argument("--ops", type=int, default=200)
    p.add_argument("--brute-reps", type=int, default=3, help="brute-force runs at n < 100k (1 run at 100k "
                   "is the rebuild itself)")
    p.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        rows.append(bench_index(n, args.ops, args.brute_reps if n < 100_000 else 0))
    svc = [asyncio.run(_bench_service(int(n), args.ops)) for n in args.service_sizes.split(",") if n]
    text = render(rows, svc, args.ops)
    from negspace_servekit.benchdoc import publish

    publish("controller", text, record=not args.no_record)
    if args.large:
        from negspace_bench.controller import large

        return large.main(args.large_args.split() + (["--no-record"] if args.no_record else []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
