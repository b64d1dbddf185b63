"""The real bundled embedder (all-MiniLM-L6-v2): loaded once for the module."""

from __future__ import annotations

import numpy as np
import pytest
from negspace_contracts.controller import PointIn
from negspace_controller.index import DensityIndex
from negspace_controller.settings import ControllerSettings
from negspace_controller.st_embed import SentenceTransformerEmbedder

pytestmark = pytest.mark.slow

TOPICS = ["apples", "trains", "the moon", "taxes", "a lost dog", "prime numbers", "rainy days", "jazz"]
TEXTS = [f"{verb} about {topic}." for verb in ("Write a math problem", "Write a short poem",
                                               "Ask a question", "Tell a story")
         for topic in TOPICS]


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformerEmbedder("", batch_size=16)


def test_embeddings_are_normalised_batched_and_flag_truncation(minilm):
    assert (minilm.name, minilm.dimension, minilm.max_tokens) == ("all-MiniLM-L6-v2", 384, 256)
    vecs, truncated = minilm.encode(["short text", "word " * 400, "another short one"])
    assert vecs.shape == (3, 384) and truncated == [False, True, False]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    single, _ = minilm.encode(["another short one"])
    np.testing.assert_allclose(single[0], vecs[2], atol=1e-5)  # batching does not change results
    paraphrase = minilm.encode(["Write a math problem about apples.",
                                "Compose a maths exercise involving apples.", "The stock market fell."])[0]
    assert paraphrase[0] @ paraphrase[1] > paraphrase[0] @ paraphrase[2] + 0.2


def test_dense_on_real_embeddings_equals_bruteforce(minilm):
    vecs, _ = minilm.encode(TEXTS)
    idx = DensityIndex(384, capacity=8)
    for i, (t, v) in enumerate(zip(TEXTS, vecs, strict=True)):
        idx.add(i, v, t)
    for knn in (1, 4, 8):
        got, want = idx.dense(10, knn), idx.dense_bruteforce(10, knn)
        np.testing.assert_allclose([h.density for h in got], [h.density for h in want], rtol=1e-5)
    for i in (0, 5, 17):
        idx.remove(i)
    got, want = idx.dense(30, 4), idx.dense_bruteforce(30, 4)
    np.testing.assert_allclose([h.density for h in got], [h.density for h in want], rtol=1e-5)
    # an independent float64 brute force of the definition
    keep = [i for i in range(len(TEXTS)) if i not in (0, 5, 17)]
    x = vecs[keep].astype(np.float64)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    top = -np.sort(-s, axis=1)[:, :4]
    dens = 1 / np.maximum((1 - top).mean(axis=1), 1e-6)
    np.testing.assert_allclose(sorted((h.density for h in got), reverse=True), np.sort(dens)[::-1], rtol=1e-4)


async def test_service_with_minilm_restarts_on_disk(minilm, tmp_path, run_app):
    settings = ControllerSettings(qdrant_path=str(tmp_path / "qdrant"))
    async with run_app(settings, embedder=minilm) as (_, client, _raw):
        info = await client.collections.create("real")
        assert (info.dimension, info.embedder) == (384, "all-MiniLM-L6-v2")
        up = await client.collections.upsert("real", [PointIn(id=i, text=t, payload={"round": i % 2})
                                                      for i, t in enumerate(TEXTS)]
                                             + [PointIn(id=99, text="word " * 400)])
        assert up.truncated == [False] * len(TEXTS) + [True]
        sim = await client.collections.similar("real", "Write a maths problem about apples!", k=3,
                                               threshold=0.8)
        assert sim.neighbors[0].id == 0 and sim.is_similar
        dense = await client.collections.dense("real", k=5, knn=5)
        metrics = await client.collections.metrics("real")
    async with run_app(settings, embedder=minilm) as (_, client, _raw):
        assert (await client.collections.get("real")).count == len(TEXTS) + 1
        again = await client.collections.dense("real", k=5, knn=5)
        assert [i.id for i in again.items] == [i.id for i in dense.items]
        np.testing.assert_allclose([i.density for i in again.items], [i.density for i in dense.items], rtol=1e-5)
        m2 = await client.collections.metrics("real")
        assert m2.n == metrics.n and m2.vendi_score == pytest.approx(metrics.vendi_score, rel=1e-6)
