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
    from negspace_controller.settings import ControllerSettings
    from negspace_controller.testing import HashingFakeEmbedder

    settings = ControllerSettings(qdrant_path=str(tmp_path / "q"), index_mode="approximate", approx_candidates=16,
                                  knn_capacity=8)
    rng = np.random.default_rng(7)
    words = ["apple", "pear", "sea", "sky", "math", "poem", "red", "blue", "cat", "dog", "river", "code"]
    pts = [PointIn(id=i, text=" ".join(rng.choice(words, size=5)) + f" {i}") for i in range(300)]
    async with run_app(settings, embedder=HashingFakeEmbedder()) as (app, client, _):
        await client.collections.create("run")
        await client.collections.upsert("run", pts)
        await client.collections.delete_points("run", [5, 6])
        index = app.state.controller.collections.loaded["run"].index
        assert isinstance(index, ApproxDensityIndex)
        want = await client.collections.dense("run", k=20, knn=5)
    assert list((tmp_path / "q-index").glob("negspace_run.graph-*")), "the HNSW graph is saved at shutdown"
    async with run_app(settings, embedder=HashingFakeEmbedder()) as (app, client, _):
        got = await client.collections.dense("run", k=20, knn=5)
        assert [i.id for i in got.items] == [i.id for i in want.items]
        assert app.state.controller.collections.from_snapshot == {"run"}
        index = app.state.controller.collections.loaded["run"].index
        assert index.ann.size == len(index) == 298


@pytest.mark.parametrize("cls", [DensityIndex, ApproxDensityIndex])
def test_memory_mapped_arrays_give_the_same_index_and_grow_in_place(tmp_path, cls):
    rng = np.random.default_rng(8)
    x = clustered(rng, 900)
    kw = {"candidates": 32} if cls is ApproxDensityIndex else {}
    ram = cls(32, capacity=8, initial_rows=2, **kw)
    mapped = cls(32, capacity=8, initial_rows=2, storage_dir=tmp_path / "arrays", **kw)
    files = {name: tmp_path / "arrays" / f"{name}.bin" for name in ("vectors", "nsim", "nrow")}
    for i, v in enumerate(x):  # from 2 rows: grown ten times
        ram.add(i, v, f"t{i}")
        mapped.add(i, v, f"t{i}")
        if i % 9 == 0 and i > 40:
            ram.remove(i - 40)
            mapped.remove(i - 40)
    for arr, name in ((mapped._vec, "vectors"), (mapped._nsim, "nsim"), (mapped._nrow, "nrow")):
        assert isinstance(arr, np.memmap) and str(arr.filename) == str(files[name].resolve())
        assert files[name].stat().st_size == arr.nbytes and arr.shape[0] >= len(mapped)
    for knn in (1, 5, 8):
        assert [(h.key, h.density) for h in mapped.dense(60, knn)] == [(h.key, h.density) for h in ram.dense(60, knn)]
    for key in ram.keys[::25]:
        assert mapped.neighbours(key) == ram.neighbours(key)
    assert mapped.similar(x[500], 3) == ram.similar(x[500], 3)
    np.testing.assert_array_equal(mapped.vectors, ram.vectors)
    # a new index on the folder starts empty (the files are a cache, never read back)
    again = cls(32, capacity=8, storage_dir=tmp_path / "arrays", **kw)
    assert len(again) == 0 and not again._vec.any() and (again._nrow == -1).all()


async def test_the_service_maps_approximate_indexes_and_removes_their_files(tmp_path, run_app):
    from negspace_contracts.controller import PointIn
    from negspace_controller.settings import ControllerSettings
    from negspace_controller.testing import HashingFakeEmbedder

    settings = ControllerSettings(qdrant_path=str(tmp_path / "q"), index_mode="approximate", approx_candidates=16,
                                  knn_capacity=8)
    arrays = tmp_path / "q-index" / "arrays"
    pts = [PointIn(id=i, text=f"point number {i} about {i % 7}") for i in range(200)]
    async with run_app(settings, embedder=HashingFakeEmbedder()) as (app, client, _):
        await client.collections.create("run")
        await client.collections.create("other")
        await client.collections.upsert("run", pts)
        index = app.state.controller.collections.loaded["run"].index
        assert isinstance(index._vec, np.memmap)
        assert index.storage_dir.parent == arrays and index.storage_dir.name.startswith("negspace_run.")
        want = await client.collections.dense("run", k=10, knn=5)
        await client.collections.delete("other")
        assert sorted(p.name.split(".")[0] for p in arrays.iterdir()) == ["negspace_run"]
    async with run_app(settings, embedder=HashingFakeEmbedder()) as (app, client, _):
        got = await client.collections.dense("run", k=10, knn=5)  # reloaded into a fresh folder
        assert [i.id for i in got.items] == [i.id for i in want.items]
        folders = list(arrays.iterdir())
        assert len(folders) == 1 and folders[0] == app.state.controller.collections.loaded["run"].index.storage_dir
    # exact mode keeps its arrays in memory unless asked
    exact = ControllerSettings(qdrant_path=str(tmp_path / "e"), knn_capacity=8)
    async with run_app(exact, embedder=HashingFakeEmbedder()) as (app, client, _):
        await client.collections.create("run")
        await client.collections.upsert("run", pts[:20])
        assert not isinstance(app.state.controller.collections.loaded["run"].index._vec, np.memmap)
    async with run_app(exact.model_copy(update={"index_mmap": True}), embedder=HashingFakeEmbedder()) as (app, client, _):
        await client.collections.upsert("run", pts[:30])
        assert isinstance(app.state.controller.collections.loaded["run"].index._vec, np.memmap)
