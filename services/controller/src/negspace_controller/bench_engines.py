"""``python -m negspace_controller.bench_engines``: the two embedded Qdrant engines, side by side.

qdrant-client's local mode (``QdrantClient(path=...)``, pure Python + NumPy + SQLite: what the
controller uses without ``--qdrant-url``) against ``qdrant-edge-py`` (Qdrant's Rust engine
in-process, one shard per folder). Synthetic random unit vectors (d = 384) with a payload like the
orchestrator's (text, run id, node, round). Per engine, each in a fresh subprocess so memory is its
own: bulk load in batches of 512, single-point upserts (what an accepted instruction costs),
top-1 query latency, reopening the folder (what a restart pays) and scrolling every point with
its vector (what the controller's load reads), and peak RSS.
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


def _points(n: int, start: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed + start)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [{"text": f"instruction {start + i} " * 4, "run_id": "r", "node": i % 64, "round": i // 64,
                "_seq": start + i} for i in range(n)]


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ClientLocal:
    def __init__(self, path: Path) -> None:
        from qdrant_client import QdrantClient, models

        self.models = models
        self.path = path
        self.c = QdrantClient(path=str(path))
        if not self.c.collection_exists("b"):
            self.c.create_collection("b", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE))

    def upsert(self, ids, x, payloads):
        self.c.upsert("b", points=[self.models.PointStruct(id=i, vector=v.tolist(), payload=p)
                                   for i, v, p in zip(ids, x, payloads, strict=True)], wait=True)

    def query(self, v):
        return self.c.query_points("b", query=v.tolist(), limit=1).points

    def scroll_all(self) -> int:
        n, off = 0, None
        while True:
            recs, off = self.c.scroll("b", limit=2048, offset=off, with_payload=True, with_vectors=True)
            n += len(recs)
            if off is None:
                return n

    def close(self):
        self.c.close()


class Edge:
    def __init__(self, path: Path) -> None:
        import qdrant_edge as q

        self.q = q
        if path.exists() and any(path.iterdir()):
            self.s = q.EdgeShard.load(str(path))
        else:
            path.mkdir(parents=True, exist_ok=True)
            self.s = q.EdgeShard.create(str(path), q.EdgeConfig(
                vectors=q.EdgeVectorParams(size=DIM, distance=q.Distance.Cosine)))

    def upsert(self, ids, x, payloads):
        q = self.q
        self.s.update(q.UpdateOperation.upsert_points([q.Point(id=int(i), vector=v.tolist(), payload=p)
                                                        for i, v, p in zip(ids, x, payloads, strict=True)]))

    def query(self, v):
        return self.s.query(self.q.QueryRequest(limit=1, query=self.q.Query.Nearest(v.tolist())))

    def scroll_all(self) -> int:
        n, off = 0, None
        while True:
            recs, off = self.s.scroll(self.q.ScrollRequest(offset=off, limit=2048, with_payload=True,
                                                           with_vector=True))
            n += len(recs)
            if off is None:
                return n

    def close(self):
        self.s.flush()
        self.s.close()


def one(engine: str, n: int, ops: int, folder: Path) -> dict:
    cls = {"qdrant-client local": ClientLocal, "qdrant-edge-py": Edge}[engine]
    out: dict = {"engine": engine, "n": n}
    t = time.perf_counter()
    db = cls(folder)
    for s in range(0, n, 512):
        x, p = _points(min(512, n - s), s)
        db.upsert(range(s, s + len(p)), x, p)
        if s and s % 65536 == 0:
            print(f"[bench] {engine}: {s}/{n} loaded", file=sys.stderr, flush=True)
    out["load_per_s"] = n / (time.perf_counter() - t)
    ins = []
    for i in range(ops):
        x, p = _points(1, n + i)
        t = time.perf_counter()
        db.upsert([n + i], x, p)
        ins.append(time.perf_counter() - t)
    qs = []
    x, _ = _points(ops, 10 ** 9)
    for v in x:
        t = time.perf_counter()
        db.query(v)
        qs.append(time.perf_counter() - t)
    out["upsert1_p50_ms"] = float(np.percentile(ins, 50) * 1e3)
    out["query_p50_ms"] = float(np.percentile(qs, 50) * 1e3)
    out["rss_mib"] = _rss()
    db.close()
    t = time.perf_counter()
    db = cls(folder)
    out["reopen_s"] = time.perf_counter() - t
    t = time.perf_counter()
    assert db.scroll_all() == n + ops
    out["scroll_s"] = time.perf_counter() - t
    db.close()
    out["disk_mib"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 20
    return out


def render(rows: list[dict]) -> str:
    from negspace_servekit.benchdoc import machine_line

    lines = ["## Controller: embedded Qdrant engines (`python -m negspace_controller.bench_engines`)", "",
             f"{machine_line()}; shared machine. Synthetic random unit vectors, d = 384, payloads like the "
             "orchestrator's; each engine in its own process on a local folder.", "",
             "| engine | n | bulk load (points/s) | 1-point upsert p50 (ms) | top-1 query p50 (ms) | reopen (s) "
             "| scroll all with vectors (s) | peak RSS (MiB) | disk (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['n']:,} | {r['load_per_s']:,.0f} | {r['upsert1_p50_ms']:.2f} | "
                     f"{r['query_p50_ms']:.2f} | {r['reopen_s']:.1f} | {r['scroll_s']:.1f} | {r['rss_mib']:.0f} "
                     f"| {r['disk_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_controller.bench_engines", description=__doc__)
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
                r = subprocess.run([sys.executable, "-m", "negspace_controller.bench_engines", "--ops", str(a.ops),
                                    "--one", json.dumps([engine, n, str(tmp / "db")])],
                                   stdout=subprocess.PIPE, text=True, check=True)
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(f"[bench] {rows[-1]}", flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    text = render(rows)
    print(text)
    if not a.no_record:
        from negspace_servekit.benchdoc import record_section

        print(f"[bench] recorded in {record_section('controller-engines', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
