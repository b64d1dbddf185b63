"""The approximate (HNSW candidate) index: same API and durable log as the exact one, and close to it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("usearch")

from negspace_controller.ann import ApproxDensityIndex  # noqa: E402
from negspace_controller.index import DensityIndex  # noqa: E402
from negspace_controller.journal import Journal, covered_seqs, replay  # noqa: E402


def clustered(rng, n, d=32, centres=40):
    c = rng.normal(size=(centres, d))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_approximate_index_tracks_the_exact_one_through_inserts_and_deletes(tmp_path):
    rng = np.random.default_rng(5)
    x = clustered(rng, 1500)
    exact, approx = DensityIndex(32, capacity=8), ApproxDensityIndex(32, capacity=8, candidates=32)
    approx.journal = Journal(tmp_path, "a")
    for i, v in enumerate(x):
        exact.add(i, v, f"t{i}")
        approx.add(i, v, f"t{i}")
    for k in range(0, 1500, 37):  # deletes go through the HNSW graph too
        exact.remove(k)
        approx.remove(k)
    assert len(approx) == len(exact) and approx.ann.size == len(approx)
    # most lists are exactly right, and the densest selections overlap
    agree = np.mean([np.allclose([s for _, s in approx.neighbours(key)], [s for _, s in exact.neighbours(key)],
                                 atol=1e-6) for key in exact.keys])
    assert agree > 0.9, agree
    want = {h.key for h in exact.dense(50, 5)}
    got = {h.key for h in approx.dense(50, 5)}
    assert len(want & got) / 50 >= 0.8
    # densities are read from real similarities: never above the exact ones (a missed neighbour can
    # only make a kept list worse)
    ex = {h.key: h.density for h in exact.dense(len(exact), 5)}
    for h in approx.dense(len(approx), 5):
        assert h.density <= ex[h.key] * (1 + 1e-5)
    # /similar's top hit through HNSW is the exact one for a stored vector
    key, _, score = approx.similar(x[100], 1)[0]
    assert key == 100 and score == pytest.approx(1.0, abs=1e-5)
    # the durable log replays into the same lists (the graph is rebuilt from the vectors)
    snap, records = approx.journal.read(8)
    covered = covered_seqs(snap, records)
    keys = [k for k in approx.keys if approx.seq_of(k) in covered]
    again = ApproxDensityIndex(32, capacity=8, candidates=32)
    again.load(keys, np.stack([x[k] for k in keys]), [""] * len(keys), [approx.seq_of(k) for k in keys],
               compute=False)
    replay(again, snap, records)
    for key in approx.keys[:200]:
        np.testing.assert_allclose([s for _, s in again.neighbours(key)], [s for _, s in approx.neighbours(key)],
                                   atol=1e-6)


def test_approximate_load_builds_lists_from_the_graph():
    rng = np.random.default_rng(6)
    x = clustered(rng, 800)
    exact, approx = DensityIndex(32, capacity=8), ApproxDensityIndex(32, capacity=8, candidates=32)
    exact.load(list(range(800)), x, [""] * 800, list(range(800)))
    approx.load(list(range(800)), x, [""] * 800, list(range(800)))
    want = {h.key for h in exact.dense(40, 5)}
    assert len(want & {h.key for h in approx.dense(40, 5)}) / 40 >= 0.8


async def test_approximate_mode_through_the_service_survives_a_restart(tmp_path, run_app):
    from negspace_contracts.controller import PointIn
    from negspace_controller.embedder import FakeEmbedder
    from negspace_controller.settings import ControllerSettings

    settings = ControllerSettings(qdrant_path=str(tmp_path / "q"), index_mode="approximate", approx_candidates=16,
                                  knn_capacity=8)
    rng = np.random.default_rng(7)
    words = ["apple", "pear", "sea", "sky", "math", "poem", "red", "blue", "cat", "dog", "river", "code"]
    pts = [PointIn(id=i, text=" ".join(rng.choice(words, size=5)) + f" {i}") for i in range(300)]
    async with run_app(settings, embedder=FakeEmbedder()) as (app, client, _):
        await client.collections.create("run")
        await client.collections.upsert("run", pts)
        await client.collections.delete_points("run", [5, 6])
        index = app.state.controller._cols["run"].index
        assert isinstance(index, ApproxDensityIndex)
        want = await client.collections.dense("run", k=20, knn=5)
    assert list((tmp_path / "q-index").glob("negspace_run.graph-*")), "the HNSW graph is saved at shutdown"
    async with run_app(settings, embedder=FakeEmbedder()) as (app, client, _):
        got = await client.collections.dense("run", k=20, knn=5)
        assert [i.id for i in got.items] == [i.id for i in want.items]
        assert app.state.controller.from_snapshot == {"run"}
        index = app.state.controller._cols["run"].index
        assert index.ann.size == len(index) == 298
