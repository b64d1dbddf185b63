"""Metric values against direct implementations of the definitions, on fixed vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from negspace_controller import diversity as M
from scipy.spatial import ConvexHull


def fixed(n=12, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_semantic_diversity_is_one_minus_mean_offdiagonal_similarity():
    x = fixed()
    n = len(x)
    sims = [x[i] @ x[j] for i in range(n) for j in range(n) if i != j]
    assert M.semantic_diversity(x) == pytest.approx(1 - np.mean(sims), rel=1e-12)


def test_mst_matches_prim_and_handles_duplicates():
    x = fixed(10)
    x[3] = x[4]  # a zero-distance edge must still connect the tree
    x[6] = x[5] + 1e-5  # a tiny (not zero) distance must not vanish either
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def prim(pts):
        n = len(pts)
        dist = lambda i, j: max(0.0, 1 - float(pts[i] @ pts[j]))  # noqa: E731
        inside, total = {0}, 0.0
        while len(inside) < n:
            w, j = min((dist(i, j), j) for i in inside for j in range(n) if j not in inside)
            inside.add(j)
            total += w
        return total

    assert M.mst_diversity(x) == pytest.approx(prim(x), rel=1e-9)
    assert M.mst_diversity(np.stack([x[0], x[0], x[0]])) == 0.0


def test_hull_volume_on_pca_projection_and_fixed_basis():
    x = fixed(20)
    centered = x - x.mean(axis=0)
    cov = centered.T @ centered
    w, v = np.linalg.eigh(cov)
    basis = v[:, np.argsort(w)[::-1][:4]].T
    want = ConvexHull(centered @ basis.T).volume
    assert M.hull_volume(x) == pytest.approx(want, rel=1e-9)
    # a fixed basis projects two datasets alike: scaling the basis scales the volume by s^4
    mean, b = M.fit_pca(x)
    assert M.hull_volume(x, 2 * b, mean) == pytest.approx(16 * want, rel=1e-9)
    with pytest.raises(ValueError, match="at least 6"):
        M.hull_volume(x[:5])
    flat = np.zeros((10, 8))
    flat[:, 0], flat[:, 1] = np.cos(np.arange(10)), np.sin(np.arange(10))  # spans 2 dims only
    with pytest.raises(ValueError, match="degenerate"):
        M.hull_volume(flat)


@pytest.mark.parametrize("n", [5, 30])  # n < d and n > d take different code paths
def test_vendi_is_exp_entropy_of_kernel_eigenvalues(n):
    x = fixed(n, 12)
    lam = np.linalg.eigvalsh((x @ x.T) / n)
    lam = lam[lam > 1e-12]
    assert M.vendi_score(x) == pytest.approx(math.exp(-np.sum(lam * np.log(lam))), rel=1e-9)
    assert M.vendi_score(np.stack([x[0]] * 4)) == pytest.approx(1.0)
    assert M.vendi_score(np.eye(6)) == pytest.approx(6.0)


def test_distinct_n():
    texts = ["the cat sat", "The cat ran!"]
    assert M.distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 4)


def test_compute_explains_missing_values():
    out = M.compute(fixed(3), ["one", "two", "three"])
    assert out.n == 3 and out.hull_volume is None and "at least 6" in out.notes["hull_volume"]
    assert out.distinct_2 is None and "2-grams" in out.notes["distinct_2"]
    assert out.semantic_diversity is not None and out.vendi_score is not None
    empty = M.compute(np.zeros((0, 8)), [])
    assert empty.n == 0 and all(getattr(empty, k) is None for k in ("semantic_diversity", "vendi_score"))
    # MST and hull grow with n: the documented reason to compare equal sizes only
    big = fixed(40)
    assert M.mst_diversity(big) > M.mst_diversity(big[:20])


def test_offline_cli_on_jsonl_with_a_fixed_basis(tmp_path, capsys):
    import json

    rows = [{"text": f"write a problem about topic {i} and colour {c}"} for i, c in
            zip(range(12), ["red", "green", "blue"] * 4, strict=True)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    basis = tmp_path / "basis.json"
    assert M.main([str(data), "--embedder", "fake", "--save-pca", str(basis)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["n"] == 12 and first["hull_volume"] > 0 and 0 < first["distinct_1"] < 1
    assert M.main([str(data), "--embedder", "fake", "--pca", str(basis)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["hull_volume"] == pytest.approx(first["hull_volume"], rel=1e-6)
    with pytest.raises(SystemExit, match="no field 'prompt'"):
        M.main([str(data), "--embedder", "fake", "--field", "prompt"])
