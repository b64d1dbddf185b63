"""The incremental index against a brute-force O(n^2) computation of the same definition."""

from __future__ import annotations

import numpy as np
import pytest
from negspace_controller.index import DISTANCE_FLOOR, DensityIndex


def unit(rng, n, d=24):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(vectors: dict, k: int, knn: int) -> list[tuple[object, float]]:
    """Independent implementation: float64 similarity matrix, sort each row."""
    keys = list(vectors)
    n = len(keys)
    if n == 0:
        return []
    x = np.stack([vectors[key] for key in keys]).astype(np.float64)
    m = min(knn, n - 1)
    out = []
    for i in range(n):
        if m == 0:
            out.append((keys[i], 0.0))
            continue
        sims = sorted((float(x[i] @ x[j]) for j in range(n) if j != i), reverse=True)[:m]
        mean_dist = sum(max(0.0, 1.0 - s) for s in sims) / m
        out.append((keys[i], 1.0 / max(mean_dist, DISTANCE_FLOOR)))
    out.sort(key=lambda t: -t[1])
    return out[:k] if k < n else out


def assert_same(got, want, rtol=2e-4):
    """Same densities in the same order; ids equal except inside groups of (near-)equal density."""
    assert len(got) == len(want)
    gd = np.array([h.density for h in got])
    wd = np.array([d for _, d in want])
    np.testing.assert_allclose(gd, wd, rtol=rtol)
    for i, (h, (key, d)) in enumerate(zip(got, want, strict=True)):
        if h.key != key:  # only allowed where the brute-force order has a tie at this density
            tied = [kk for kk, dd in want if abs(dd - d) <= rtol * d]
            assert h.key in tied, (i, h.key, key)


@pytest.mark.parametrize("capacity,knns", [(8, (1, 3, 8)), (4, (1, 4))])
def test_inserts_match_bruteforce(capacity, knns):
    rng = np.random.default_rng(1)
    idx = DensityIndex(24, capacity=capacity, initial_rows=2)
    vectors = {}
    for i, v in enumerate(unit(rng, 160)):
        idx.add(i, v, f"t{i}")
        vectors[i] = v
        if i in (0, 1, 2, 3, 5, 9, 40, 159):
            for knn in knns:
                for k in (1, 3, 500):
                    assert_same(idx.dense(k, knn), brute(vectors, k, knn))
        if i % 13 == 0:
            idx.dense(5, knns[-1])  # heaps exist while later inserts arrive (incremental path)


def test_deletes_and_replacements_match_bruteforce():
    rng = np.random.default_rng(2)
    idx = DensityIndex(24, capacity=6)
    vectors = {}
    for i, v in enumerate(unit(rng, 120)):
        idx.add(i, v, f"t{i}")
        vectors[i] = v
    idx.dense(10, 5)
    for step, key in enumerate(rng.permutation(120)[:100].tolist()):
        idx.remove(key)
        del vectors[key]
        if step % 10 == 0:  # replacement: same id, new vector
            victim = next(iter(vectors))
            idx.remove(victim)
            vectors[victim] = unit(rng, 1)[0]
            idx.add(victim, vectors[victim], "new")
        if step % 7 == 0 or len(vectors) < 8:
            for knn in (1, 5, 6):
                assert_same(idx.dense(1000, knn), brute(vectors, 1000, knn))
    # every kept neighbour list is the exact top of the remaining points
    for key in vectors:
        sims = [s for _, s in idx.neighbours(key)]
        want = sorted((float(vectors[key] @ vectors[o]) for o in vectors if o != key), reverse=True)[:6]
        np.testing.assert_allclose(sims, want, rtol=1e-5, atol=1e-6)


def test_bulk_load_equals_incremental_and_duplicates_are_capped():
    rng = np.random.default_rng(3)
    x = unit(rng, 200)
    x[10] = x[11] = x[12]  # exact duplicates: distance 0, density capped at 1/DISTANCE_FLOOR
    inc = DensityIndex(24, capacity=8)
    for i, v in enumerate(x):
        inc.add(i, v, str(i))
    bulk = DensityIndex(24, capacity=8)
    bulk.load(list(range(200))[::-1], x[::-1], [str(i) for i in range(200)][::-1], list(range(200))[::-1])
    for knn in (1, 2, 8):
        # the same order up to (near-)ties: the bulk path's matrix products round differently from
        # the inserts' matrix-vector products (and by BLAS thread count), so equal densities may swap
        a, b = inc.dense(20, knn), bulk.dense(20, knn)
        assert_same(a, [(h.key, h.density) for h in b], rtol=1e-5)
    top = inc.dense(3, 2)
    assert {h.key for h in top} == {10, 11, 12}
    assert top[0].density == pytest.approx(1 / DISTANCE_FLOOR)
    assert [h.key for h in top] == [10, 11, 12]  # ties: earlier insert first


def test_small_n_rules():
    idx = DensityIndex(3, capacity=4)
    assert idx.dense(3, 2) == []
    idx.add("a", np.array([1, 0, 0], np.float32), "a")
    [only] = idx.dense(3, 2)
    assert (only.key, only.density) == ("a", 0.0)  # a lone point has no neighbours
    idx.add("b", np.array([0, 1, 0], np.float32), "b")
    hits = idx.dense(3, 4)  # n = 2 <= k: all points; knn capped at n - 1 = 1
    assert len(hits) == 2 and all(h.density == pytest.approx(1.0) for h in hits)
    with pytest.raises(ValueError, match="capacity"):
        idx.dense(1, 5)


def test_similar_is_exact_topk():
    rng = np.random.default_rng(4)
    x = unit(rng, 50)
    idx = DensityIndex(24, capacity=4)
    for i, v in enumerate(x):
        idx.add(i, v, str(i))
    q = unit(rng, 1)[0]
    hits = idx.similar(q, 5)
    want = np.argsort(-(x @ q))[:5]
    assert [h[0] for h in hits] == want.tolist()
    assert idx.similar(q, 500)[-1][0] == int(np.argmin(x @ q))


def test_nn_similarity_quantile_matches_brute_force_and_follows_removals():
    rng = np.random.default_rng(7)
    idx = DensityIndex(dim=24, capacity=4)
    assert idx.nn_similarity_quantile(0.5) is None
    vecs = {f"p{i}": v for i, v in enumerate(unit(rng, 40))}
    for key, v in vecs.items():
        idx.add(key, v, key)
        if len(idx) == 1:
            assert idx.nn_similarity_quantile(0.5) is None  # one point has no neighbour

    def want(q):
        x = np.stack(list(vecs.values())).astype(np.float64)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return float(np.quantile(s.max(axis=1), q))

    for q in (0.1, 0.5, 0.9):
        assert idx.nn_similarity_quantile(q) == pytest.approx(want(q), abs=1e-5)
    for key in ("p3", "p17"):
        idx.remove(key)
        del vecs[key]
    assert idx.nn_similarity_quantile(0.5) == pytest.approx(want(0.5), abs=1e-5)
