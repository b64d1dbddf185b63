"""The HTTP API through the typed client and raw requests, with the hashing HashingFakeEmbedder.

The index logic is checked against brute force in test_index.py; here: wiring, idempotence,
restarts on disk, and every bad input answered with a clear 4xx.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from negspace_contracts.controller import MetricsRequest, PointIn
from negspace_contracts.errors import BadRequestError, ConflictError, NotFoundError
from negspace_controller.settings import ControllerSettings
from negspace_controller.testing import HashingFakeEmbedder

TEXTS = [
    "Write a math problem about apples.", "Write a math problem about pears.",
    "Write a math problem about apples and pears.", "Compose a haiku about the sea.",
    "Explain photosynthesis to a child.", "List three prime numbers.", "Translate hello into French.",
    "Write a math problem about oranges.", "Describe a sunset over the ocean.", "Name a famous painter.",
]


def fake(**kw):
    return HashingFakeEmbedder(dimension=32, max_tokens=12, **kw)


def points(texts, start=0, **payload):
    return [PointIn(id=start + i, text=t, payload=dict(payload)) for i, t in enumerate(texts)]


async def test_lifecycle_similar_dense_metrics_and_embed(run_app):
    async with run_app(embedder=fake()) as (app, client, raw):
        r = await raw.put("/collections/run-1")
        assert r.status_code == 201 and r.json() == {"name": "run-1", "count": 0, "dimension": 32,
                                                     "embedder": "fake-32"}
        assert (await raw.put("/collections/run-1")).status_code == 200  # idempotent create
        up = await client.collections.upsert("run-1", points(TEXTS, run="r1", node=0, round=1))
        assert up.ids == list(range(10)) and up.truncated == [False] * 10
        assert (await client.collections.get("run-1")).count == 10

        sim = await client.collections.similar("run-1", TEXTS[3], k=3, threshold=0.99)
        assert sim.neighbors[0].id == 3 and sim.neighbors[0].score == pytest.approx(1.0, abs=1e-5)
        assert sim.is_similar and sim.max_similarity == pytest.approx(1.0, abs=1e-5)
        assert [n.score for n in sim.neighbors] == sorted((n.score for n in sim.neighbors), reverse=True)
        far = await client.collections.similar("run-1", "zebra quantum violin", k=2, threshold=0.99)
        assert not far.is_similar and far.max_similarity < 0.99 and far.threshold == 0.99
        # a calibrated bar: the quantile of the collection's own nearest-neighbour similarities
        index = app.state.controller.collections.loaded["run-1"].index
        bar = index.nn_similarity_quantile(0.5)
        cal = await client.collections.similar("run-1", "zebra quantum violin", k=1, threshold=0.01,
                                               threshold_quantile=0.5)
        assert cal.threshold == pytest.approx(bar) and cal.is_similar == (cal.max_similarity >= bar)
        assert (await client.collections.similar("run-1", TEXTS[3], k=1, threshold_quantile=0.5)).is_similar

        dense = await client.collections.dense("run-1", k=3, knn=2)
        index = app.state.controller.collections.loaded["run-1"].index
        want = index.dense_bruteforce(3, 2)
        assert [i.id for i in dense.items] == [h.key for h in want]
        np.testing.assert_allclose([i.density for i in dense.items], [h.density for h in want], rtol=1e-5)
        assert dense.items[0].text == TEXTS[dense.items[0].id]
        assert len((await client.collections.dense("run-1", k=50, knn=3)).items) == 10  # n <= k: all

        m = await client.collections.metrics("run-1")
        assert m.n == 10 and 0 < m.semantic_diversity <= 2 and m.vendi_score > 1
        assert m.mst_diversity > 0 and m.hull_volume > 0 and 0 < m.distinct_2 <= 1
        mf = await client.collections.metrics("run-1", MetricsRequest(filter={"round": 1, "run": "r1"}))
        assert mf.n == 10
        assert (await client.collections.metrics("run-1", MetricsRequest(filter={"round": 2}))).n == 0

        emb = await client.embed(["a b c", " ".join(["w"] * 20)])
        assert emb.truncated == [False, True] and len(emb.embeddings[0]) == 32
        assert np.linalg.norm(emb.embeddings[0]) == pytest.approx(1.0, abs=1e-5)

        health = (await raw.get("/health")).json()
        assert health["status"] == "ok" and health["info"]["collections"] == {"run-1": 10}
        assert health["info"]["qdrant_engine"] == "edge" and health["info"]["qdrant"] == ":memory:"
        assert "negspace_http_requests" in (await raw.get("/metrics")).text

        await client.collections.delete("run-1")
        with pytest.raises(NotFoundError):
            await client.collections.get("run-1")


async def test_idempotent_upserts_replacements_and_deletes(run_app):
    async with run_app(embedder=fake()) as (app, client, raw):
        await client.collections.create("c")
        uid = uuid.uuid4()
        batch = points(TEXTS) + [PointIn(id=uid, text="a uuid point", payload={"node": 2})]
        await client.collections.upsert("c", batch)
        index = app.state.controller.collections.loaded["c"].index
        before = {k: index.neighbours(k) for k in index.keys}
        dense_before = await client.collections.dense("c", k=5, knn=3)
        await client.collections.upsert("c", batch)  # re-sent: nothing changes
        await client.collections.upsert("c", [PointIn(id=str(uid), text="a uuid point")])  # str uuid
        assert (await client.collections.get("c")).count == 11
        assert {k: index.neighbours(k) for k in index.keys} == before
        assert await client.collections.dense("c", k=5, knn=3) == dense_before
        # the same id twice in one request: the last one wins
        r = await client.collections.upsert("c", [PointIn(id=0, text="first"), PointIn(id=0, text="second")])
        assert r.ids == [0, 0]
        sim = await client.collections.similar("c", "second", k=1)
        assert sim.neighbors[0].id == 0 and sim.neighbors[0].text == "second"
        assert (await client.collections.get("c")).count == 11
        # payload-only update keeps the vector and neighbours; the new payload is filterable
        await client.collections.upsert("c", [PointIn(id=5, text=TEXTS[5], payload={"round": 7})])
        assert (await client.collections.metrics("c", MetricsRequest(filter={"round": 7}))).n == 1
        await client.collections.delete_points("c", [1, 2, uid, 999])
        assert (await client.collections.get("c")).count == 8
        got = await client.collections.dense("c", k=100, knn=3)
        assert [i.id for i in got.items] == [h.key for h in index.dense_bruteforce(100, 3)]


@pytest.mark.parametrize("engine", ["edge", "local"])
async def test_on_disk_store_survives_restart(tmp_path, run_app, engine):
    settings = ControllerSettings(qdrant_path=str(tmp_path / "qdrant"), qdrant_engine=engine)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["apple", "pear", "sea", "sky", "math", "poem", "red", "blue", "one",
                                  "two", "cat"], size=4)) + f" {i}" for i in range(60)]
    async with run_app(settings, embedder=fake()) as (app, client, _):
        await client.collections.create("run")
        await client.collections.upsert("run", points(texts, run="x"))
        await client.collections.delete_points("run", [3, 4])
        await client.collections.upsert("run", [PointIn(id=10, text="replaced text")])
        idx = app.state.controller.collections.loaded["run"].index
        nb = {k: idx.neighbours(k) for k in idx.keys}
        seqs = {k: idx.seq_of(k) for k in idx.keys}
        dense = {knn: await client.collections.dense("run", k=10, knn=knn) for knn in (1, 5, 32)}
        info = await client.collections.get("run")
    async with run_app(settings, embedder=fake()) as (app, client, raw):
        assert await client.collections.get("run") == info
        idx = app.state.controller.collections.loaded["run"].index
        assert {k: idx.seq_of(k) for k in idx.keys} == seqs  # insertion sequence kept in payloads
        for k, lst in nb.items():
            got = idx.neighbours(k)
            assert [a for a, _ in got] == [a for a, _ in lst] or \
                np.allclose([s for _, s in got], [s for _, s in lst], rtol=1e-6)
            np.testing.assert_allclose([s for _, s in got], [s for _, s in lst], rtol=1e-5, atol=1e-6)
        for knn, want in dense.items():
            got = await client.collections.dense("run", k=10, knn=knn)
            assert [i.id for i in got.items] == [i.id for i in want.items]
            np.testing.assert_allclose([i.density for i in got.items], [i.density for i in want.items],
                                       rtol=1e-5)
        assert app.state.controller.collections.from_snapshot == {"run"}  # no O(n^2) rebuild needed
    # without the snapshot (crash, or 'off'), and with a corrupt one: rebuilt from Qdrant, same answers
    snaps = sorted((tmp_path / "qdrant-index").glob("negspace_run.snap-*.npz"))
    assert snaps, "no snapshot written at shutdown"
    snaps[-1].write_bytes(b"not a snapshot")
    for variant in (settings, ControllerSettings(qdrant_path=str(tmp_path / "qdrant"), qdrant_engine=engine,
                                                 index_snapshots="off")):
        async with run_app(variant, embedder=fake()) as (app, client, raw):
            for knn, want in dense.items():
                got = await client.collections.dense("run", k=10, knn=knn)
                assert [i.id for i in got.items] == [i.id for i in want.items]
                np.testing.assert_allclose([i.density for i in got.items],
                                           [i.density for i in want.items], rtol=1e-5)
            assert app.state.controller.collections.from_snapshot == set()
    async with run_app(settings, embedder=fake()) as (app, client, raw):
        await client.collections.get("run")  # waits for the collection to load
        assert app.state.controller.collections.from_snapshot == {"run"}  # rewritten at the last shutdown
        await client.collections.upsert("run", [PointIn(id=1000, text="after restart")])
        assert (await client.collections.get("run")).count == info.count + 1
    async with run_app(settings, embedder=fake()) as (app, client, raw):
        assert (await client.collections.get("run")).count == info.count + 1
        idx = app.state.controller.collections.loaded["run"].index
        got = await client.collections.dense("run", k=10, knn=5)
        assert [i.id for i in got.items] == [h.key for h in idx.dense_bruteforce(10, 5)]
        await client.collections.delete("run")
    assert not list((tmp_path / "qdrant-index").glob("negspace_run.*"))


async def test_bad_input_is_a_clear_4xx(run_app):
    async with run_app(ControllerSettings(qdrant_path=":memory:", knn_capacity=8),
                       embedder=fake()) as (_, client, raw):
        await client.collections.create("c")
        await client.collections.upsert("c", points(TEXTS[:3]))

        async def expect(method, path, status, fragment, json=None):
            r = await raw.request(method, path, json=json)
            assert r.status_code == status, (path, r.status_code, r.text)
            assert fragment in r.json()["error"]["message"], r.json()

        await expect("POST", "/embed", 422, "at least 1", {"texts": []})
        await expect("POST", "/embed", 422, "texts[0] is empty", {"texts": ["  "]})
        await expect("POST", "/collections/c/points", 422, "at least 1", {"points": []})
        await expect("POST", "/collections/c/points", 422, "empty", {"points": [{"id": 1, "text": ""}]})
        await expect("POST", "/collections/c/points", 422, "unsigned", {"points": [{"id": -1, "text": "x"}]})
        await expect("POST", "/collections/c/points", 400, "reserved",
                     {"points": [{"id": 1, "text": "x", "payload": {"text": "y"}}]})
        for bad in (float("nan"), float("inf"), [1.0, {"deep": float("-inf")}]):  # JSON allows none of them
            r = await raw.post("/collections/c/points", content=json.dumps(
                {"points": [{"id": 1, "text": "x", "payload": {"v": bad}}]}), headers={"content-type": "application/json"})
            assert r.status_code == 400 and "NaN or Infinity" in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"] == "points.0.payload"
        await expect("POST", "/collections/c/points", 400, "beyond 64 bits",
                     {"points": [{"id": 1, "text": "x", "payload": {"v": [1, 2**64]}}]})
        await expect("POST", "/collections/c/points", 400, "0 .. 2**64 - 1",
                     {"points": [{"id": 2**64, "text": "x"}]})
        await expect("POST", "/collections/c/points/delete", 400, "ids[1] = 18446744073709551616",
                     {"ids": [1, 2**64]})
        await expect("POST", "/collections/c/accept", 400, "point.id", {"point": {"id": 2**64, "text": "x"}})
        r = await raw.post("/collections/c/metrics", json={"filter": {"round": 2**70}})  # no 64-bit int: no match
        assert r.status_code == 200 and r.json()["n"] == 0, r.text
        await client.collections.upsert("c", [PointIn(id=2**64 - 1, text="the largest id")])
        await expect("POST", "/collections/c/similar", 422, "empty", {"text": ""})
        await expect("POST", "/collections/c/dense", 422, "greater than or equal to 1", {"k": 0})
        await expect("POST", "/collections/c/dense", 422, "greater than or equal to 1", {"knn": 0})
        await expect("POST", "/collections/c/dense", 400, "--knn-capacity", {"k": 1, "knn": 9})
        await expect("POST", "/collections/c/dense", 422, "Extra inputs", {"k": 1, "nn": 2})
        await expect("POST", "/collections/c/metrics", 400, "pca_basis", {"pca_basis": [[1.0, 2.0]]})
        for path in ("/collections/nope", "/collections/nope/dense"):
            await expect("POST" if "dense" in path else "GET", path, 404, "does not exist",
                         {} if "dense" in path else None)
        await expect("POST", "/collections/nope/points", 404, "PUT /collections/nope",
                     {"points": [{"id": 1, "text": "x"}]})
        await expect("DELETE", "/collections/nope", 404, "does not exist")
        await expect("PUT", "/collections/bad.name!", 400, "invalid collection name")
        await expect("PUT", "/collections/" + "x" * 200, 400, "invalid collection name")
        with pytest.raises(BadRequestError):
            await client.collections.dense("c", k=1, knn=9)
        # text longer than the embedder takes: stored truncated, and the response says so
        r = await client.collections.upsert("c", [PointIn(id=9, text=" ".join(["long"] * 40))])
        assert r.truncated == [True]


@pytest.mark.parametrize("engine", ["edge", "local"])
async def test_collection_from_another_embedder_conflicts(tmp_path, run_app, engine):
    settings = ControllerSettings(qdrant_path=str(tmp_path / "q"), qdrant_engine=engine)
    async with run_app(settings, embedder=fake()) as (_, client, _raw):
        await client.collections.create("c")
    async with run_app(settings, embedder=HashingFakeEmbedder(dimension=16)) as (_, client, _raw):
        with pytest.raises(ConflictError, match="32-dimensional"):
            await client.collections.get("c")


async def test_query_instruction_applies_to_similar_only(run_app):
    emb = fake(query_instruction="Find similar instructions")
    assert emb.prepare(["x"], query=True) == ["Instruct: Find similar instructions\nQuery: x"]
    assert emb.prepare(["x"], query=False) == ["x"]
    async with run_app(embedder=emb) as (_, client, _raw):
        plain = await client.embed(["hello world"])
        query = await client.embed(["hello world"], query=True)
        assert plain.embeddings != query.embeddings
