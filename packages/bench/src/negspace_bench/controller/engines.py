"""``python -m negspace_bench.controller.engines``: the two embedded Qdrant engines, side by side.

Through the controller's own store classes, so it measures what ships: ``LocalStore`` on
qdrant-client's local mode (``QdrantClient(path=...)``, pure Python + NumPy + SQLite) against
``EdgeStore`` on ``qdrant-edge-py`` (Qdrant's Rust engine in-process, one shard per collection,
SIGKILL-safe on return, flushed every 5 s). Synthetic random unit vectors (d = 384) with a payload
like the orchestrator's (text, run id, node, round). Per engine, each in a fresh subprocess so
memory is its own: bulk load in batches of 512, single-point upserts (what an accepted instruction
costs; for edge also with a flush after each, the cost of fsync-per-write durability), reading
one point back (what reconciliation reads), a filtered scan (``/metrics`` with a filter: 1/64 of
the points), reopening the folder and reading one collection (what a restart pays), scanning every
point with its vector (what the controller's load reads), and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 384
NAME = "b"


def _points(n: int, start: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed + start)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [{"text": f"instruction {start + i} " * 4, "run_id": "r", "node": (start + i) % 64,
                "round": (start + i) // 64, "_seq": start + i} for i in range(n)]


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _open(engine: str, folder: Path):
    from negspace_controller.store_edge import EdgeStore
    from negspace_controller.store_qdrant import LocalStore

    if engine == "qdrant-client local":
        folder.mkdir(parents=True, exist_ok=True)
        store = LocalStore(str(folder))
    else:
        store = EdgeStore(str(folder))
    if not store.exists(NAME):
        store.create(NAME, DIM, "bench")
    return store


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3)


def one(engine: str, n: int, ops: int, folder: Path) -> dict:
    out: dict = {"engine": engine, "n": n}
    t = time.perf_counter()
    db = _open(engine, folder)
    for s in range(0, n, 512):
        x, p = _points(min(512, n - s), s)
        db.upsert(NAME, list(range(s, s + len(p))), x, p)
        if s and s % 65536 == 0:
            print(f"[bench] {engine}: {s}/{n} loaded", file=sys.stderr, flush=True)
    out["load_per_s"] = n / (time.perf_counter() - t)
    ins, flushed, reads = [], [], []
    for i in range(ops):
        x, p = _points(1, n + i)
        t = time.perf_counter()
        db.upsert(NAME, [n + i], x, p)
        ins.append(time.perf_counter() - t)
    if hasattr(db, "flush"):  # edge: what flushing after every write would cost
        for i in range(ops):
            x, p = _points(1, n + ops + i)
            t = time.perf_counter()
            db.upsert(NAME, [n + ops + i], x, p)
            db.flush()
            flushed.append(time.perf_counter() - t)
    total = n + ops + len(flushed)
    rng = np.random.default_rng(1)
    for key in rng.integers(0, n, ops):
        t = time.perf_counter()
        got = db.retrieve(NAME, [int(key)])
        reads.append(time.perf_counter() - t)
        assert len(got) == 1
    t = time.perf_counter()
    hits = sum(1 for _ in db.scan(NAME, with_vectors=True, where={"node": 3}))
    out["filtered_scan_ms"] = (time.perf_counter() - t) * 1e3
    assert hits == sum(1 for k in range(total) if k % 64 == 3), hits
    out["upsert1_p50_ms"], out["upsert1_p99_ms"] = _ms(ins, 50), _ms(ins, 99)
    out["upsert1_flush_p50_ms"] = _ms(flushed, 50) if flushed else None
    out["retrieve1_p50_ms"] = _ms(reads, 50)
    out["rss_mib"] = _rss()
    db.close()
    t = time.perf_counter()
    db = _open(engine, folder)
    db.count(NAME)  # edge opens a shard on first use: count it in
    out["reopen_s"] = time.perf_counter() - t
    t = time.perf_counter()
    assert sum(1 for _ in db.scan(NAME, with_vectors=True)) == total
    out["scroll_s"] = time.perf_counter() - t
    db.close()
    out["disk_mib"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 20
    return out


def render(rows: list[dict]) -> str:
    from negspace_servekit.benchdoc import machine_line

    lines = ["## Controller: embedded Qdrant engines (`python -m negspace_bench.controller.engines`)", "",
             f"{machine_line()}; shared machine. Through the controller's store classes (`LocalStore` on "
             "local mode, `EdgeStore` on qdrant-edge-py). Synthetic random unit vectors, d = 384, payloads "
             "like the orchestrator's; each engine in its own process on a local folder.", "",
             "| engine | n | bulk load (points/s) | 1-point upsert p50 / p99 (ms) | upsert + flush p50 (ms) "
             "| 1-point read p50 (ms) | filtered scan, 1/64 (ms) | reopen (s) | scan all with vectors (s) "
             "| peak RSS (MiB) | disk (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        flush = f"{r['upsert1_flush_p50_ms']:.1f}" if r.get("upsert1_flush_p50_ms") is not None else "n/a"
        lines.append(f"| {r['engine']} | {r['n']:,} | {r['load_per_s']:,.0f} | {r['upsert1_p50_ms']:.2f} / "
                     f"{r['upsert1_p99_ms']:.2f} | {flush} | {r['retrieve1_p50_ms']:.2f} | "
                     f"{r['filtered_scan_ms']:.0f} | {r['reopen_s']:.1f} | {r['scroll_s']:.1f} | "
                     f"{r['rss_mib']:.0f} | {r['disk_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_bench.controller.engines", description=__doc__)
    p.add_argument("--sizes", default="100000")
    p.add_argument("--ops", type=int, default=200)
    p.add_argument("--engines", default="qdrant-client local,qdrant-edge-py")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one engine in this process
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    if a.one:
        engine, n, folder = json.loads(a.one)
        print(json.dumps(one(engine, n, a.ops, Path(folder))))
        return 0
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        for engine in a.engines.split(","):
            tmp = Path(tempfile.mkdtemp(prefix="negspace-bench-engines-"))
            try:
                r = subprocess.run([sys.executable, "-m", "negspace_bench.controller.engines", "--ops", str(a.ops),
                                    "--one", json.dumps([engine, n, str(tmp / "db")])],
                                   stdout=subprocess.PIPE, text=True, check=True)
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(f"[bench] {rows[-1]}", flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    text = render(rows)
    from negspace_servekit.benchdoc import publish

    publish("controller-engines", text, record=not a.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
