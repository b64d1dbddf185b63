"""``POST /compare``: two collections on one PCA basis fitted on their union, checked against the
definitions computed here from the same embeddings (hashing HashingFakeEmbedder, real Qdrant local mode)."""

from __future__ import annotations

import numpy as np
import pytest
from negspace_contracts.controller import PointIn
from negspace_contracts.errors import NotFoundError
from negspace_controller import diversity as M
from negspace_controller.testing import HashingFakeEmbedder
from scipy.spatial import ConvexHull

A = ["Write a math problem about apples.", "Write a math problem about pears.", "Compose a haiku about the sea.",
     "Explain photosynthesis to a child.", "List three prime numbers.", "Translate hello into French.",
     "Describe a sunset over the ocean.", "Name a famous painter."]
B = ["Write a riddle about time.", "Summarise a novel in one line.", "Invent a new board game.",
     "Plan a picnic for six people.", "Give a recipe with two eggs.", "Describe a city at night.",
     "Explain gravity with a ball.", "Suggest a name for a cat."]


def union_axes(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Principal axes of the L2-normalised rows, from the covariance's eigenvectors."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean = x.mean(axis=0)
    w, v = np.linalg.eigh((x - mean).T @ (x - mean))
    return mean, v[:, np.argsort(w)[::-1][:dims]].T


async def fill(client, name, texts, rounds):
    await client.collections.create(name)
    await client.collections.upsert(name, [PointIn(id=i, text=t, payload={"round": r})
                                           for i, (t, r) in enumerate(zip(texts, rounds, strict=True))])


async def test_one_basis_on_both_collections_per_round_metrics_and_the_map(run_app):
    async with run_app(embedder=HashingFakeEmbedder(dimension=32)) as (_app, client, _raw):
        rounds_a, rounds_b = [0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 2, 2]
        await fill(client, "guided", A, rounds_a)
        await fill(client, "baseline", B, rounds_b)
        got = await client.compare("guided", "baseline", group_by="round")

        xa = np.asarray((await client.embed(A)).embeddings)
        xb = np.asarray((await client.embed(B)).embeddings)
        mean, basis = union_axes(np.concatenate([xa, xb]), 4)
        assert got.pca_basis == "shared" and got.notes == {}
        for side, x, texts in ((got.a, xa, A), (got.b, xb, B)):
            y = (x / np.linalg.norm(x, axis=1, keepdims=True) - mean) @ basis.T
            assert side.metrics.n == 8
            assert side.metrics.hull_volume == pytest.approx(ConvexHull(y).volume, rel=1e-6)
            assert side.metrics.semantic_diversity == pytest.approx(M.semantic_diversity(x), rel=1e-6)
            assert side.metrics.distinct_1 == pytest.approx(M.distinct_n(texts, 1))
        # its own basis gives another hull volume: the shared one is what makes the two compare alike
        own = await client.collections.metrics("guided")
        assert own.hull_volume != pytest.approx(got.a.metrics.hull_volume, rel=1e-3)

        assert list(got.a.groups) == ["0", "1", "2"] and [g.n for g in got.a.groups.values()] == [2, 2, 4]
        assert [g.n for g in got.b.groups.values()] == [2, 4, 2]
        assert got.a.groups["2"].semantic_diversity == pytest.approx(M.semantic_diversity(xa[4:]), rel=1e-6)

        # the map: the union's 2 principal axes (compared by pairwise distances: an axis' sign is free)
        mean2, basis2 = union_axes(np.concatenate([xa, xb]), 2)
        want = (np.concatenate([xa, xb]) / np.linalg.norm(np.concatenate([xa, xb]), axis=1, keepdims=True)
                - mean2) @ basis2.T
        pts = got.a.points + got.b.points
        xy = np.asarray([(p.x, p.y) for p in pts])
        dist = lambda z: np.linalg.norm(z[:, None] - z[None], axis=-1)  # noqa: E731
        np.testing.assert_allclose(dist(xy), dist(want), atol=1e-6)
        assert [p.id for p in got.a.points] == list(range(8)) and [p.group for p in got.b.points] == rounds_b


async def test_too_few_points_fall_back_to_each_sets_own_basis_and_say_why(run_app):
    async with run_app(embedder=HashingFakeEmbedder(dimension=32)) as (_app, client, raw):
        await fill(client, "a", A[:1], [0])
        await fill(client, "b", B[:2], [0, 0])
        got = await client.compare("a", "b")
        assert got.pca_basis == "own" and "at least 4" in got.notes["pca_basis"]
        assert got.a.groups == {} and len(got.a.points) == 1 and len(got.b.points) == 2
        assert got.a.metrics.n == 1 and "hull_volume" in got.a.metrics.notes

        await client.collections.create("empty")
        lone = await client.compare("empty", "a")
        assert lone.a.metrics.n == 0 and lone.b.points == [] and "map" in lone.notes

        with pytest.raises(NotFoundError):
            await client.compare("a", "nope")
        for body in ({"a": "a"}, {"a": "a", "b": "b", "group_by": "bad key!"}, {"a": "../x", "b": "b"},
                     {"a": "a", "b": "b", "extra": 1}):
            r = await raw.post("/compare", json=body)
            assert r.status_code == 422, (body, r.text)
