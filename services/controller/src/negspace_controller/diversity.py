"""Diversity metrics of a set of texts and their embeddings: a pure module, usable offline.

    python -m negspace_controller.diversity data.jsonl [--field text] [--embedder MODEL]
        [--save-pca basis.json | --pca basis.json]

Definitions (embeddings are L2-normalised first; cosine similarity = dot product):
- semantic_diversity = 1 - mean pairwise cosine similarity over ordered pairs i != j.
- mst_diversity      = total weight of the minimum spanning tree of the complete graph whose
                       edge weights are cosine distances 1 - sim. GROWS WITH n.
- hull_volume        = volume of the convex hull of the embeddings projected onto 4 principal
                       axes (PCA of the data itself, or a fixed basis so two datasets are
                       projected alike). GROWS WITH n. Compare MST and hull only at equal n.
- vendi_score        = exp(-sum_i l_i log l_i), l_i the eigenvalues of K / n, K the cosine kernel.
- distinct_1/2       = distinct word uni/bigrams / all uni/bigrams (lower-cased \\w+ tokens).
A metric that cannot be computed is None and ``notes`` says why.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

HULL_DIMS = 4
MAX_MST_POINTS = 20_000  # the MST needs the n x n distance matrix (8 n^2 bytes)


@dataclass
class DiversityMetrics:
    n: int
    semantic_diversity: float | None = None
    mst_diversity: float | None = None
    hull_volume: float | None = None
    vendi_score: float | None = None
    distinct_1: float | None = None
    distinct_2: float | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def semantic_diversity(x: np.ndarray) -> float:
    """1 - mean_{i != j} x_i . x_j, in O(n d) via |sum x|^2 = sum_ij x_i . x_j."""
    x = normalize(x)
    n = len(x)
    if n < 2:
        raise ValueError("needs at least 2 points")
    total = float(np.sum(x.sum(axis=0) ** 2))
    diag = float(np.sum(x * x))
    return 1.0 - (total - diag) / (n * (n - 1))


def mst_diversity(x: np.ndarray) -> float:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    x = normalize(x)
    n = len(x)
    if n < 2:
        raise ValueError("needs at least 2 points")
    if n > MAX_MST_POINTS:
        raise ValueError(f"n = {n} exceeds {MAX_MST_POINTS} points (the MST needs an n x n matrix)")
    d = np.clip(1.0 - x @ x.T, 0.0, None)
    # csgraph reads 0 as "no edge": duplicates (distance 0) get the smallest positive weight,
    # which adds at most (n - 1) * 2.2e-308 to the total. The matrix goes in as CSR because a
    # dense input is masked with a tolerance (np.ma.masked_values): weights below ~1e-8 would
    # silently vanish and the tree would route around them.
    d[d <= 0] = np.finfo(np.float64).tiny
    np.fill_diagonal(d, 0.0)
    mst = minimum_spanning_tree(csr_matrix(d))
    total = float(mst.sum())
    return total if total > 1e-300 else 0.0


def fit_pca(x: np.ndarray, dims: int = HULL_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """(mean, basis dims x d) of the data's principal axes."""
    x = normalize(x)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    if vt.shape[0] < dims:
        raise ValueError(f"needs at least {dims} points to fit {dims} principal axes")
    return mean, vt[:dims]


def hull_volume(x: np.ndarray, basis: np.ndarray | None = None, mean: np.ndarray | None = None) -> float:
    from scipy.spatial import ConvexHull, QhullError

    x = normalize(x)
    n = len(x)
    if n < HULL_DIMS + 2:
        raise ValueError(f"needs at least {HULL_DIMS + 2} points for a {HULL_DIMS}-D hull")
    if basis is None:
        mean, basis = fit_pca(x)
    basis = np.asarray(basis, np.float64)
    if basis.shape != (HULL_DIMS, x.shape[1]):
        raise ValueError(f"pca basis must be {HULL_DIMS} x {x.shape[1]}, got {basis.shape[0]} x "
                         f"{basis.shape[1] if basis.ndim == 2 else '?'}")
    mean = np.zeros(x.shape[1]) if mean is None else np.asarray(mean, np.float64)
    if mean.shape != (x.shape[1],):
        raise ValueError(f"pca mean must have {x.shape[1]} values")
    y = (x - mean) @ basis.T
    try:
        return float(ConvexHull(y).volume)
    except QhullError as exc:
        raise ValueError(f"degenerate points (they span fewer than {HULL_DIMS} dimensions): "
                         f"{str(exc).splitlines()[0]}") from exc


def vendi_score(x: np.ndarray) -> float:
    """exp(entropy of the eigenvalues of K/n); K = X X^T shares its non-zero spectrum with X^T X."""
    x = normalize(x)
    n, d = x.shape
    if n < 1:
        raise ValueError("needs at least 1 point")
    gram = (x.T @ x) / n if n > d else (x @ x.T) / n
    lam = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    lam = lam[lam > 1e-12]
    return float(np.exp(-np.sum(lam * np.log(lam))))


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    grams: list[tuple[str, ...]] = []
    for t in texts:
        tok = _tokens(t)
        grams.extend(tuple(tok[i:i + n]) for i in range(len(tok) - n + 1))
    if not grams:
        raise ValueError(f"no {n}-grams in the texts")
    return len(set(grams)) / len(grams)


def compute(embeddings: np.ndarray | None, texts: Sequence[str] | None = None, *,
            pca_basis: np.ndarray | None = None, pca_mean: np.ndarray | None = None) -> DiversityMetrics:
    """All metrics; each one that cannot be computed is None with its reason in ``notes``."""
    x = None if embeddings is None else np.asarray(embeddings, np.float64)
    n = len(x) if x is not None else len(texts or [])
    out = DiversityMetrics(n=n)
    jobs = {
        "semantic_diversity": lambda: semantic_diversity(x),
        "mst_diversity": lambda: mst_diversity(x),
        "hull_volume": lambda: hull_volume(x, pca_basis, pca_mean),
        "vendi_score": lambda: vendi_score(x),
    } if x is not None and n else {}
    if texts is not None:
        jobs["distinct_1"] = lambda: distinct_n(texts, 1)
        jobs["distinct_2"] = lambda: distinct_n(texts, 2)
    for name, fn in jobs.items():
        try:
            setattr(out, name, fn())
        except ValueError as exc:
            out.notes[name] = str(exc)
    for name in ("semantic_diversity", "mst_diversity", "hull_volume", "vendi_score", "distinct_1", "distinct_2"):
        if getattr(out, name) is None and name not in out.notes:
            out.notes[name] = "no points" if n == 0 else "no embeddings given"
    return out


@dataclass
class PointSet:
    """One collection's points: embeddings (n x d), texts and, per point, its group (or None)."""

    vectors: np.ndarray
    texts: list[str]
    groups: list | None = None


@dataclass
class SetReport:
    metrics: DiversityMetrics
    groups: dict[str, DiversityMetrics]
    xy: np.ndarray | None  # n x 2 on the shared map, None without one


@dataclass
class Comparison:
    a: SetReport
    b: SetReport
    shared_basis: bool
    notes: dict[str, str] = field(default_factory=dict)


def compare(a: PointSet, b: PointSet) -> Comparison:
    """Both sets on one footing: one 4-D PCA basis fitted on their union for every hull volume (each
    set's, each group's), and the union's 2 principal axes as the map. Too few points for the basis:
    each set fits its own (``shared_basis`` False, ``notes`` says why)."""
    both = np.concatenate([np.asarray(a.vectors, np.float64), np.asarray(b.vectors, np.float64)])
    notes: dict[str, str] = {}
    mean = basis = None
    if len(both) >= HULL_DIMS:
        mean, basis = fit_pca(both, HULL_DIMS)
    else:
        notes["pca_basis"] = (f"{len(both)} points in all: a shared {HULL_DIMS}-D basis needs at least "
                              f"{HULL_DIMS}; each set fits its own")
    xy = None
    if len(both) >= 2:
        mean2, basis2 = fit_pca(both, 2)
        xy = (normalize(both) - mean2) @ basis2.T
    else:
        notes["map"] = f"{len(both)} point(s) in all: a 2-D map needs at least 2"

    def report(s: PointSet, xy: np.ndarray | None) -> SetReport:
        x = np.asarray(s.vectors, np.float64)
        groups: dict[str, DiversityMetrics] = {}
        if s.groups is not None:
            keyed = [None if v is None else (type(v).__name__, v) for v in s.groups]
            for key in sorted({k for k in keyed if k is not None}):
                rows = [i for i, k in enumerate(keyed) if k == key]
                groups[str(key[1])] = compute(x[rows], [s.texts[i] for i in rows], pca_basis=basis, pca_mean=mean)
        return SetReport(compute(x, s.texts, pca_basis=basis, pca_mean=mean), groups, xy)

    na = len(a.vectors)
    return Comparison(report(a, None if xy is None else xy[:na]), report(b, None if xy is None else xy[na:]),
                      shared_basis=basis is not None, notes=notes)


def _read_jsonl(path: str, fld: str) -> list[str]:
    texts = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if fld not in row:
                raise SystemExit(f"{path}:{i}: no field {fld!r} (choose one with --field)")
            texts.append(str(row[fld]))
    return texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_controller.diversity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl")
    p.add_argument("--field", default="text")
    p.add_argument("--embedder", default="", help="sentence-transformers id or folder (default: bundled MiniLM)")
    p.add_argument("--pca", help="JSON file with a fixed basis ({'mean': [...], 'basis': [[...]x4]})")
    p.add_argument("--save-pca", help="write this dataset's PCA basis here, to project another alike")
    args = p.parse_args(argv)
    from negspace_controller.embedder import build_embedder

    texts = _read_jsonl(args.jsonl, args.field)
    print(f"embedding {len(texts)} texts...", file=sys.stderr)
    x, _ = build_embedder(args.embedder).encode(texts) if texts else (None, [])
    basis = mean = None
    if args.pca:
        spec = json.load(open(args.pca))
        basis, mean = np.asarray(spec["basis"]), np.asarray(spec["mean"])
    if args.save_pca and x is not None:
        m, b = fit_pca(x)
        json.dump({"mean": m.tolist(), "basis": b.tolist()}, open(args.save_pca, "w"))
    print(json.dumps(compute(x, texts, pca_basis=basis, pca_mean=mean).as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
