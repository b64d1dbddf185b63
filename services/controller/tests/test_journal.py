"""The index log: replaying snapshot + log gives the live index's lists; compaction; a torn tail."""

from __future__ import annotations

import numpy as np
from negspace_controller.index import DensityIndex
from negspace_controller.journal import Journal, covered_seqs, dangling_rows, replay


def unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recover(folder, stem, live: DensityIndex, vectors: dict) -> tuple[DensityIndex, int]:
    """What Controller._load does, without Qdrant: load the covered points, replay, fix dangling."""
    j = Journal(folder, stem)
    snap, records = j.read(live.capacity)
    covered = covered_seqs(snap, records)
    keys = [k for k in vectors if live.seq_of(k) in covered]
    idx = DensityIndex(live.dim, live.capacity)
    idx.load(keys, np.stack([vectors[k] for k in keys]), [""] * len(keys), [live.seq_of(k) for k in keys],
             compute=False)
    replay(idx, snap, records)
    lost = dangling_rows(idx)
    if lost.size:
        idx._recompute(lost)
    return idx, len(records)


def same_lists(a: DensityIndex, b: DensityIndex) -> None:
    assert sorted(a.keys) == sorted(b.keys)
    for k in a.keys:
        np.testing.assert_allclose([s for _, s in a.neighbours(k)], [s for _, s in b.neighbours(k)], atol=1e-6)
    for knn in sorted({1, 4, a.capacity}):
        np.testing.assert_allclose([h.density for h in a.dense(20, knn)], [h.density for h in b.dense(20, knn)],
                                   rtol=1e-6)


def test_replay_with_compactions_equals_live_index(tmp_path):
    rng = np.random.default_rng(3)
    live = DensityIndex(16, capacity=8)
    live.journal = Journal(tmp_path, "c", min_compact_bytes=20_000)  # compacts every ~40 records here
    vectors = {}
    x = unit(rng, 400)
    for i in range(400):
        live.add(i, x[i], "")
        vectors[i] = x[i]
        if i % 7 == 3:  # deletes and replacements (a replacement is a delete + an insert with a new seq)
            k = int(rng.choice(list(vectors)))
            live.remove(k)
            del vectors[k]
        if i % 11 == 5:
            k = int(rng.choice(list(vectors)))
            live.remove(k)
            vectors[k] = unit(rng, 1)[0]
            live.add(k, vectors[k], "")
    live.journal.wait()
    assert live.journal.compactions >= 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len([f for f in files if ".snap-" in f]) == 1, files  # older generations deleted
    got, replayed = recover(tmp_path, "c", live, vectors)
    assert 0 < replayed < 200  # only the records since the last compaction
    same_lists(got, live)
    want = live.dense_bruteforce(20, 5)
    assert [round(h.density, 3) for h in got.dense(20, 5)] == [round(h.density, 3) for h in want]


def test_torn_tail_and_points_the_log_lost(tmp_path):
    rng = np.random.default_rng(4)
    live = DensityIndex(16, capacity=4)
    live.journal = Journal(tmp_path, "c")
    x = unit(rng, 60)
    vectors = {i: x[i] for i in range(60)}
    for i in range(60):
        live.add(i, x[i], "")
    # a kill mid-append leaves half a record: replay stops before it
    log_file = next(tmp_path.glob("c.log-*"))
    with open(log_file, "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")
    got, replayed = recover(tmp_path, "c", live, vectors)
    assert replayed == 60
    same_lists(got, live)
    # the log saw a point that Qdrant no longer holds (deleted there, killed before the log append):
    # its references are recomputed and the answer is the one of an index without it
    del vectors[17]
    got, _ = recover(tmp_path, "c", live, vectors)
    ref = DensityIndex(16, capacity=4)
    for k, v in vectors.items():
        ref.add(k, v, "")
    same_lists(got, ref)
