"""The controller's index at 10^5-10^6 points (part of ``make bench-controller``).

Synthetic random unit vectors (d = 384, MiniLM's size; a fixed seed), K = 32, ``dense(k=3, knn=5)``.

1. **Overlap at ``--overlap-size``** (10^5): the same points in the exact index (an O(n^2 d)
   build) and the approximate one (HNSW candidates); the share of the exact ``dense`` selection
   (k = 3, 100, 1,000) the approximate index also selects, and the share of lists that are exact.
2. **Scale at ``--large-size``** (10^6), approximate mode: build (HNSW + every list), durable log
   attached and compacted once (snapshot + graph), then ``--ops`` inserts alternating with ``dense``
   (p50/p99), peak RSS.
3. **Restart after SIGKILL**: a child process recovers the index from the snapshot + log (vectors
   read from a .npy file standing in for Qdrant's copy: reading them from Qdrant is the engine's
   cost, see the engine table), streams inserts into it (each appended to the log), and is
   SIGKILLed mid-stream; a second child recovers and answers ``dense``. Reported: seconds from its
   start to that first answer, and whether it equals the answer of an index that applied the
   same inserts without a crash (the parent's own copy).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from negspace_controller.ann import ApproxDensityIndex
from negspace_controller.index import DensityIndex
from negspace_controller.journal import Journal, covered_seqs, dangling_rows, replay, state_of

DIM, K = 384, 32


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def unit(n: int, seed: int) -> np.ndarray:
    """``n`` unit vectors of a fixed seed, generated in chunks (10^6 fits without a float64 copy)."""
    out = np.empty((n, DIM), np.float32)
    rng = np.random.default_rng(seed)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        out[a:b] = rng.standard_normal((b - a, DIM), dtype=np.float32)
        out[a:b] /= np.linalg.norm(out[a:b], axis=1, keepdims=True)
    return out


def clustered(n: int, seed: int, centres: int = 2000, spread: float = 0.035) -> np.ndarray:
    """Unit vectors around ``centres`` random directions (per-coordinate noise ``spread``): nearest
    neighbours at cosine ~0.6-0.8, like sentence embeddings of one task, unlike isotropic random
    vectors, whose similarities are all ~0 +- 0.05 (HNSW's worst case)."""
    rng = np.random.default_rng(seed)
    c = unit(centres, seed + 1)
    out = np.empty((n, DIM), np.float32)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        out[a:b] = c[rng.integers(0, centres, b - a)] + spread * rng.standard_normal((b - a, DIM), dtype=np.float32)
        out[a:b] /= np.linalg.norm(out[a:b], axis=1, keepdims=True)
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mib() -> dict[str, float]:
    """This process's resident memory now, split: anonymous (heap: what the process needs) and file-backed
    (mapped files' pages in memory, which the kernel can drop or write back under pressure)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            out[key] = int(val.split()[0]) / 1024
    return out


def overlap(n: int, seed: int = 11, data: str = "clustered") -> dict:
    x = clustered(n, seed) if data == "clustered" else unit(n, seed)
    log(f"overlap n={n}: exact index (O(n^2 d) build)...")
    t = time.perf_counter()
    exact = DensityIndex(DIM, K, initial_rows=n)
    exact.load(list(range(n)), x, [""] * n, list(range(n)),
               progress=lambda d, tot: log(f"  exact {d}/{tot}") if d % 16384 < 1024 else None)
    exact_s = time.perf_counter() - t
    log(f"overlap n={n}: approximate index...")
    t = time.perf_counter()
    approx = ApproxDensityIndex(DIM, K, initial_rows=n)
    approx.load(list(range(n)), x, [""] * n, list(range(n)))
    approx_s = time.perf_counter() - t
    out = {"n": n, "data": data, "exact_build_s": exact_s, "approx_build_s": approx_s}
    for k in (3, 100, 1000):
        want = {h.key for h in exact.dense(k, 5)}
        got = {h.key for h in approx.dense(k, 5)}
        out[f"overlap_{k}"] = len(want & got) / k
    same = np.isclose(approx._nsim[:n, K - 1], exact._nsim[:n, K - 1], atol=1e-6)
    out["lists_exact"] = float(same.mean())
    log(f"overlap n={n}: {out}")
    return out


def _recover(folder: Path, vec_file: Path, seed: int) -> tuple[ApproxDensityIndex, Journal]:
    """What Controller._load does for an approximate collection, with vectors from ``vec_file``."""
    j = Journal(folder, "bench")
    snap, records = j.read(K)
    covered = covered_seqs(snap, records)
    vecs = np.load(vec_file, mmap_mode="r")
    n_all = vecs.shape[0]
    seqs = np.array(sorted(s for s in covered if s < n_all), np.int64)
    idx = ApproxDensityIndex(DIM, K, initial_rows=seqs.size + 1024, storage_dir=folder.parent / "arrays-child")
    idx.load(seqs.tolist(), np.asarray(vecs[seqs]), [""] * seqs.size, seqs.tolist(), compute=False,
             graph=j.graph_path())
    replay(idx, snap, records)
    lost = dangling_rows(idx)
    if lost.size:
        idx._recompute(lost)
    idx.journal = j
    j.save_extra = idx.save_graph
    return idx, j


def child(mode: str, folder: str, vec_file: str, start: int, seed: int) -> None:
    t0 = time.perf_counter()
    idx, _ = _recover(Path(folder), Path(vec_file), seed)
    if mode == "answer":
        hits = idx.dense(3, 5)
        print(json.dumps({"first_dense_s": time.perf_counter() - t0, "n": idx.n,
                          "dense": [int(h.key) for h in hits], "density": [h.density for h in hits]}), flush=True)
        return
    vecs = np.load(vec_file, mmap_mode="r")
    print(json.dumps({"recovered_s": time.perf_counter() - t0, "n": idx.n}), flush=True)
    i = start
    while i < vecs.shape[0]:
        idx.add(i, np.asarray(vecs[i]), "", seq=i)
        i += 1
        if i % 50 == 0:
            print(json.dumps({"inserted_through": i}), flush=True)


def scale(n: int, ops: int, seed: int = 13, data: str = "clustered") -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="negspace-bench-large-"))
    stream = 2 * ops + 2000  # points beyond n: the timed inserts, then the crash stream
    log(f"scale n={n}: generating {n + stream:,} {data} unit vectors")
    x = clustered(n + stream, seed) if data == "clustered" else unit(n + stream, seed)
    vec_file = tmp / "vectors.npy"
    np.save(vec_file, x)
    del x
    x = np.load(vec_file, mmap_mode="r")  # the bench's own copy file-backed, out of the anonymous figure
    log(f"scale n={n}: approximate build (HNSW graph + every list; arrays memory-mapped as the service does)...")
    t = time.perf_counter()
    idx = ApproxDensityIndex(DIM, K, initial_rows=n + stream, storage_dir=tmp / "arrays")
    idx.load(list(range(n)), x[:n], [""] * n, list(range(n)),
             progress=lambda d, tot: log(f"  {d}/{tot}"))
    build_s = time.perf_counter() - t
    j = Journal(tmp / "index", "bench")
    idx.journal, j.save_extra = j, idx.save_graph
    t = time.perf_counter()
    j.compact(state_of(idx), background=False)
    compact_s = time.perf_counter() - t
    idx.dense(3, 5)
    ins, den = [], []
    for i in range(n, n + ops):
        t = time.perf_counter()
        idx.add(i, x[i], "", seq=i)
        ins.append(time.perf_counter() - t)
        t = time.perf_counter()
        idx.dense(3, 5)
        den.append(time.perf_counter() - t)
    peak = rss_mib()
    resident = resident_mib()
    mem = {"vectors": idx._vec.nbytes, "lists": idx._nsim.nbytes + idx._nrow.nbytes,
           "hnsw": idx.ann.memory_usage}
    # the crash: a child continues from the log, inserting; killed mid-stream
    start = n + ops
    log(f"scale n={n}: child recovers and streams inserts; SIGKILL after ~500 of them")
    script = ("import sys, negspace_bench.controller.large as b; "
              "b.child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))")
    proc = subprocess.Popen([sys.executable, "-c", script, "stream", str(tmp / "index"), str(vec_file), str(start),
                             str(seed)], stdout=subprocess.PIPE, text=True)
    recovered_s = None
    through = start
    assert proc.stdout is not None
    for line in proc.stdout:
        msg = json.loads(line)
        recovered_s = msg.get("recovered_s", recovered_s)
        through = msg.get("inserted_through", through)
        if through >= start + 500:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script, "answer", str(tmp / "index"), str(vec_file), str(start),
                        str(seed)], stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - t
    ans = json.loads(r.stdout.strip().splitlines()[-1])
    # the parent applies the same inserts without a crash
    for i in range(start, start + (ans["n"] - idx.n)):
        idx.add(i, x[i], "", seq=i)
    want = idx.dense(3, 5)
    same = [int(h.key) for h in want] == ans["dense"] and np.allclose([h.density for h in want], ans["density"],
                                                                       rtol=1e-5)
    j.close()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    out = {"n": n, "data": data, "build_s": build_s, "compact_s": compact_s,
           "ins50": float(np.percentile(ins, 50) * 1e3), "ins99": float(np.percentile(ins, 99) * 1e3),
           "den50": float(np.percentile(den, 50) * 1e3), "den99": float(np.percentile(den, 99) * 1e3),
           "rss_mib": peak, "resident_mib": resident, "mem_mib": {k: v / 2 ** 20 for k, v in mem.items()},
           "child_recovered_s": recovered_s, "restart_first_dense_s": ans["first_dense_s"],
           "restart_wall_s": wall, "killed_after": ans["n"] - (n + ops), "restart_same": bool(same)}
    log(f"scale n={n}: {out}")
    return out


def render(ovs: list[dict], sc: dict | None, ops: int) -> list[str]:
    lines = []
    for ov in ovs:
        what = ("clustered synthetic unit vectors (2,000 centres; neighbours at cosine ~0.6-0.8, like "
                "embeddings)" if ov["data"] == "clustered" else "isotropic random unit vectors (HNSW's worst case)")
        lines += ["", f"Approximate mode (usearch HNSW, C = 4K = 128 candidates per insert) against the exact index at "
                  f"n = {ov['n']:,}, {what}: exact build {ov['exact_build_s']:.0f} s, approximate "
                  f"build {ov['approx_build_s']:.0f} s. Dense-selection overlap with exact: k = 3: "
                  f"**{ov['overlap_3']:.0%}**, k = 100: **{ov['overlap_100']:.0%}**, k = 1,000: "
                  f"**{ov['overlap_1000']:.0%}**; {ov['lists_exact']:.1%} of the neighbour lists are exactly the "
                  "exact index's (their K-th similarity matches)."]
    if sc:
        m = sc["mem_mib"]
        what = ("clustered synthetic unit vectors, as in the overlap rows" if sc.get("data") == "clustered"
                else "isotropic random unit vectors")
        lines += ["", f"Approximate mode at n = {sc['n']:,} ({what}; the index layer with its durable "
                  "log, no Qdrant, no embedder):", "",
                  "| measurement | value | target |", "|---|---:|---|",
                  f"| build: HNSW graph + every list | {sc['build_s']:.0f} s | |",
                  f"| first compaction (snapshot + graph written) | {sc['compact_s']:.1f} s | |",
                  f"| insert p50 / p99 ({ops} inserts) | {sc['ins50']:.2f} / {sc['ins99']:.2f} ms | p50 < 20 ms: "
                  f"{'met' if sc['ins50'] < 20 else 'NOT met'} |",
                  f"| `dense` p50 / p99 | {sc['den50']:.3f} / {sc['den99']:.3f} ms | p50 < 50 ms: "
                  f"{'met' if sc['den50'] < 50 else 'NOT met'} |",
                  f"| restart after SIGKILL to the first `dense` (recover: snapshot + graph + log replay) | "
                  f"{sc['restart_first_dense_s']:.1f} s ({sc['restart_wall_s']:.1f} s with process start) | < 60 s: "
                  f"{'met' if sc['restart_wall_s'] < 60 else 'NOT met'} |",
                  f"| that answer equals the uncrashed index's (killed after {sc['killed_after']} logged inserts) | "
                  f"{'yes' if sc['restart_same'] else 'NO'} | |",
                  f"| peak RSS (the build's temporaries included) | {sc['rss_mib']:,.0f} MiB | |",
                  f"| index: vectors / lists (memory-mapped files) / HNSW (in memory) | {m['vectors']:,.0f} / "
                  f"{m['lists']:,.0f} / {m['hnsw']:,.0f} MiB | |"]
        r = sc.get("resident_mib") or {}
        if r:
            lines.append(f"| resident after the inserts: anonymous / file-backed | {r.get('RssAnon', 0):,.0f} / "
                         f"{r.get('RssFile', 0):,.0f} MiB (file-backed: the mapped arrays and the bench's vector "
                         "file, pages the kernel can evict) | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m negspace_bench.controller.large", description=__doc__)
    p.add_argument("--overlap-size", type=int, default=100_000)
    p.add_argument("--random-overlap-size", type=int, default=20_000, help="the same on isotropic vectors")
    p.add_argument("--large-size", type=int, default=1_000_000)
    p.add_argument("--large-data", choices=("clustered", "random"), default="clustered",
                   help="vectors of the scale run: embedding-like clusters, or isotropic (HNSW's worst case)")
    p.add_argument("--ops", type=int, default=200)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    from negspace_servekit.benchdoc import machine_line, publish

    started = machine_line()
    head = f"{started}; load average {{:.1f}} at the end (the machine is shared with other engineers' jobs: " \
           "absolute times are pessimistic)."
    ovs = [overlap(a.overlap_size)] if a.overlap_size else []
    if a.random_overlap_size:
        ovs.append(overlap(a.random_overlap_size, data="random"))
    if ovs:
        text = "\n".join(["## Controller: approximate mode against exact (`python -m negspace_bench.controller.large`)",
                          "", head.format(os.getloadavg()[0])] + render(ovs, None, a.ops))
        publish("controller-overlap", text, record=not a.no_record)
    if a.large_size:
        sc = scale(a.large_size, a.ops, data=a.large_data)
        text = "\n".join(["## Controller at scale: approximate mode (`python -m negspace_bench.controller.large`)",
                          "", head.format(os.getloadavg()[0])] + render([], sc, a.ops))
        publish("controller-scale", text, record=not a.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
