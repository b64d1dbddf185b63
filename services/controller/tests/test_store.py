"""The store layer against both embedded engines: qdrant-client local mode (``LocalStore``) and
qdrant-edge-py (``EdgeStore``), the same expectations for both; then what only edge has to prove:
a SIGKILL right after an upsert returns loses nothing, restarts keep points and metadata, one
process per folder, engine/disk faults are 503s naming the folder, a local-mode folder is detected
(and migrated by ``migrate_store``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest
from negspace_contracts.controller import MetricsRequest, PointIn
from negspace_contracts.errors import ConflictError, NotFoundError, ServiceUnavailableError
from negspace_controller import store_edge
from negspace_controller.migrate_store import migrate
from negspace_controller.settings import ControllerSettings
from negspace_controller.store import Store
from negspace_controller.store_edge import EdgeStore
from negspace_controller.store_qdrant import LocalStore
from negspace_controller.stores import build_store, choose_engine
from negspace_controller.testing import HashingFakeEmbedder

ENGINES = ["local", "edge"]
DIM = 8


def open_store(engine: str, path, **kw):
    if engine == "local":
        return LocalStore(str(path), **kw)
    return EdgeStore(str(path), **kw)


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture
def store(engine, tmp_path):
    s = open_store(engine, tmp_path / "q")
    yield s
    s.close()


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


KEYS = [0, 7, 2**63, 2**64 - 1, uuid.UUID("0b7c2f3e-1d2a-4c3b-9e8f-112233445566"), uuid.uuid4()]


def payloads(n: int, **extra) -> list[dict]:
    return [{"text": f"text {i}", "_seq": i, "run": "r", "nested": {"a": [1, 2.5, None]}, **extra}
            for i in range(n)]


def test_both_classes_have_the_whole_interface(tmp_path):
    members = [m for m in dir(Store) if not m.startswith("_")] + list(Store.__annotations__)
    for s in (LocalStore(":memory:"), EdgeStore(":memory:")):
        try:
            missing = [m for m in members if not hasattr(s, m)]
            assert not missing, (type(s).__name__, missing)
            assert s.engine in ("local", "edge") and s.remote is False and s.down is None
        finally:
            s.close()


def test_collections_create_list_describe_drop(store):
    assert store.names() == [] and not store.exists("a")
    store.create("a", DIM, "fake-8")
    store.create("b", 4, "other")
    assert store.exists("a") and store.names() == ["a", "b"]
    assert store.dimension("a") == (DIM, "fake-8") and store.dimension("b") == (4, "other")
    assert store.count("a") == 0 and store.qname("a") == "negspace_a"
    with pytest.raises(ConflictError):
        store.create("a", DIM, "fake-8")
    store.drop("a")
    assert store.names() == ["b"] and not store.exists("a")
    store.drop("a")  # dropping what is gone is a no-op (a retried DELETE)
    for call in (lambda: store.count("a"), lambda: store.dimension("a"), lambda: store.retrieve("a", [1]),
                 lambda: list(store.scan("a")), lambda: store.delete_points("a", [1]),
                 lambda: store.upsert("a", [1], unit(1), payloads(1))):
        with pytest.raises(NotFoundError, match="negspace_a"):
            call()
    store.create("a", DIM, "fake-8")  # re-created after a drop: empty
    assert store.count("a") == 0


def test_points_round_trip_with_int_and_uuid_ids(store):
    store.create("c", DIM, "fake-8")
    x = unit(len(KEYS))
    store.upsert("c", KEYS, x, payloads(len(KEYS)))
    assert store.count("c") == len(KEYS)
    got = store.retrieve("c", KEYS + [12345, uuid.uuid4()])  # unknown ids are simply absent
    assert set(got) == set(KEYS)
    for i, k in enumerate(KEYS):
        assert type(next(g for g in got if g == k)) is type(k)  # ints stay ints, UUIDs UUIDs
        vec, payload = got[k]
        assert vec.dtype == np.float32
        np.testing.assert_allclose(vec, x[i], atol=1e-6)
        assert payload == payloads(len(KEYS))[i]
    rows = {k: (v, p) for k, v, p in store.scan("c")}
    assert rows.keys() == set(KEYS) and all(p["_seq"] == KEYS.index(k) for k, (_v, p) in rows.items())
    assert all(v is None for _k, v, _p in store.scan("c", with_vectors=False))
    # an upsert replaces (vector and payload); a delete of known and unknown ids removes the known
    store.upsert("c", [7, KEYS[4]], x[:2], [{"text": "new", "_seq": 99}, {"text": "new2", "_seq": 98}])
    assert store.count("c") == len(KEYS)
    again = store.retrieve("c", [7, KEYS[4]])
    assert again[7][1] == {"text": "new", "_seq": 99} and again[KEYS[4]][1]["_seq"] == 98
    np.testing.assert_allclose(again[7][0], x[0], atol=1e-6)
    store.delete_points("c", [0, KEYS[5], 424242])
    assert store.count("c") == len(KEYS) - 2
    assert set(store.retrieve("c", KEYS)) == set(KEYS) - {0, KEYS[5]}


def test_large_upsert_goes_in_chunks(store):
    store.create("c", DIM, "fake-8")
    n = 1100  # three chunks of <= 512
    store.upsert("c", list(range(n)), unit(n), payloads(n))
    assert store.count("c") == n
    assert {k for k, _v, _p in store.scan("c", with_vectors=False, batch=300)} == set(range(n))


FILTER_POINTS = [
    {"i": 3, "f": 2.0, "b": True, "s": "x", "tags": ["a", "b"]},
    {"i": 3.0, "f": 2, "b": False, "x": None, "flags": [False, True]},
    {"i": 4, "f": 2.5, "b": 1, "s": "y", "big": 2**63},
]


@pytest.mark.parametrize("where,want", [
    ({"i": 3}, {0}), ({"i": 3.0}, {0}),  # an integral float matches integers (JSON turns 3 into 3.0)
    ({"f": 2}, {1}), ({"f": 2.0}, {1}), ({"f": 2.5}, {2}),
    ({"b": True}, {0}), ({"b": False}, {1}), ({"b": 1}, {2}),  # True is not 1 (edge's MatchValue mixes them)
    ({"flags": True}, {1}), ({"flags": False}, {1}), ({"tags": "a"}, {0}),  # a list holding the value
    ({"x": None}, {1}), ({"s": None}, set()), ({"missing": None}, set()), ({"s": "x"}, {0}),
    ({"i": 3, "s": "x"}, {0}), ({"i": 3, "s": "y"}, set()), ({"i": 4, "b": True}, set()),
    ({"s": "y", "b": 1}, {2}), ({"big": 2**63}, {2}),  # unsigned 64-bit: beyond MatchValue's i64
])
def test_scan_filters_mean_the_same_on_both_engines(store, where, want):
    store.create("c", DIM, "fake-8")
    store.upsert("c", [0, 1, 2], unit(3), [dict(p, text=f"t{i}", _seq=i) for i, p in enumerate(FILTER_POINTS)])
    assert {k for k, _v, _p in store.scan("c", where=where)} == want
    assert all(v is not None for _k, v, _p in store.scan("c", where=where))


def test_restart_keeps_points_and_metadata(engine, tmp_path):
    path = tmp_path / "q"
    s = open_store(engine, path)
    s.create("c", DIM, "fake-8")
    x = unit(len(KEYS))
    s.upsert("c", KEYS, x, payloads(len(KEYS)))
    s.delete_points("c", [7])
    s.close()
    s = open_store(engine, path)
    try:
        assert s.names() == ["c"] and s.dimension("c") == (DIM, "fake-8") and s.count("c") == len(KEYS) - 1
        got = s.retrieve("c", KEYS)
        assert set(got) == set(KEYS) - {7}
        for i, k in enumerate(KEYS):
            if k != 7:
                np.testing.assert_allclose(got[k][0], x[i], atol=1e-6)
                assert got[k][1] == payloads(len(KEYS))[i]
    finally:
        s.close()


def test_concurrent_writers_and_readers(store):
    store.create("c", DIM, "fake-8")
    errors: list[BaseException] = []

    def write(t: int) -> None:
        try:
            for b in range(10):
                keys = list(range(t * 1000 + b * 20, t * 1000 + b * 20 + 20))
                store.upsert("c", keys, unit(20, seed=t * 100 + b), payloads(20))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def read() -> None:
        try:
            for _ in range(10):
                list(store.scan("c", batch=64))
                store.count("c")
                store.retrieve("c", [1, 2, 3])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(3)] + \
        [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert store.count("c") == 3 * 10 * 20


# ---------------------------------------------------------------------------------------------- edge only

CHILD = textwrap.dedent("""
    import json, sys, uuid
    import numpy as np
    from negspace_controller.store_edge import EdgeStore
    path, dim = sys.argv[1], int(sys.argv[2])
    s = EdgeStore(path, flush_interval_s=None)  # no flush at all: only what update() itself does
    s.create("c", dim, "fake-8")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1400, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = list(range(300)) + [str(uuid.UUID(int=i + 1)) for i in range(1100)]
    for i in range(300):  # one point per call, like /accept
        s.upsert("c", [i], x[i:i + 1], [{"text": f"t{i}", "_seq": i}])
    s.upsert("c", [uuid.UUID(int=i + 1) for i in range(1100)], x[300:],  # three chunks in one call
             [{"text": f"t{i}", "_seq": i} for i in range(300, 1400)])
    s.delete_points("c", [5, 6])
    s.upsert("c", [7], x[:1], [{"text": "replaced", "_seq": 7}])
    print("done", flush=True)  # everything above has returned
    import time; time.sleep(120)
""")


def test_edge_upserts_survive_a_sigkill_right_after_they_return(tmp_path):
    path = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(DIM)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "done"
        proc.send_signal(signal.SIGKILL)  # no flush, no close: what an OOM kill leaves
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    s = EdgeStore(str(path))  # the folder lock died with the process
    try:
        assert s.dimension("c") == (DIM, "fake-8") and s.count("c") == 1400 - 2
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1400, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        rows = {k: (v, p) for k, v, p in s.scan("c")}
        want = {i: i for i in range(300) if i not in (5, 6)} | {uuid.UUID(int=i + 1): 300 + i for i in range(1100)}
        assert rows.keys() == want.keys()
        for k, i in want.items():
            vec, payload = rows[k]
            if k == 7:
                assert payload == {"text": "replaced", "_seq": 7}
                np.testing.assert_allclose(vec, x[0], atol=1e-6)
            else:
                assert payload == {"text": f"t{i}", "_seq": i}
                np.testing.assert_allclose(vec, x[i], atol=1e-6)
    finally:
        s.close()


def test_edge_folder_is_one_process_only(tmp_path):
    s = EdgeStore(str(tmp_path / "q"))
    try:
        with pytest.raises(RuntimeError, match="in use by another process"):
            EdgeStore(str(tmp_path / "q"))
        code = ("import sys\nfrom negspace_controller.store_edge import EdgeStore\n"
                "try:\n    EdgeStore(sys.argv[1])\nexcept RuntimeError as e:\n    print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 3 and "one controller per --qdrant-path" in r.stdout, r
    finally:
        s.close()
    EdgeStore(str(tmp_path / "q")).close()  # free again once closed


def test_edge_memory_mode_is_a_temporary_folder_removed_at_close():
    s = EdgeStore(":memory:")
    folder = s.path
    s.create("c", DIM, "fake-8")
    s.upsert("c", [1], unit(1), payloads(1))
    assert s.where == ":memory:" and folder.is_dir() and s.count("c") == 1
    s.close()
    assert not folder.exists()


def test_edge_interrupted_create_and_drop_leave_no_collection(tmp_path):
    path = tmp_path / "q"
    s = EdgeStore(str(path))
    s.create("c", DIM, "fake-8")
    s.close()
    # a create killed before collection.json, and a drop killed after its rename
    os.remove(path / "negspace_c" / "collection.json")
    (path / ".negspace_d.dropped-123").mkdir()
    (path / ".negspace_d.dropped-123" / "x").write_text("x")
    s = EdgeStore(str(path))
    try:
        assert s.names() == [] and not s.exists("c")
        assert not (path / ".negspace_d.dropped-123").exists()
        s.create("c", DIM, "fake-8")  # clears the half-made folder
        s.upsert("c", [1], unit(1), payloads(1))
        assert s.count("c") == 1
    finally:
        s.close()


def test_edge_flushes_in_the_background(tmp_path):
    s = EdgeStore(str(tmp_path / "q"), flush_interval_s=0.1)
    try:
        s.create("c", DIM, "fake-8")
        s.upsert("c", [1], unit(1), payloads(1))
        assert s._shards["c"].dirty
        deadline = time.monotonic() + 10
        while s._shards["c"].dirty:
            assert time.monotonic() < deadline, "never flushed"
            time.sleep(0.05)
    finally:
        s.close()


def test_edge_flush_after_every_write_when_asked(tmp_path, monkeypatch):
    s = EdgeStore(str(tmp_path / "q"), flush_interval_s=0)
    try:
        s.create("c", DIM, "fake-8")
        flushes = []
        shard = s._shards["c"].shard

        class Counting:
            def __getattr__(self, name):
                attr = getattr(shard, name)
                if name == "flush":
                    return lambda: (flushes.append(1), attr())[1]
                return attr

        s._shards["c"].shard = Counting()
        s.upsert("c", list(range(600)), unit(600), payloads(600))  # two chunks, one flush
        s.delete_points("c", [1])
        assert len(flushes) == 2 and not s._shards["c"].dirty and s.count("c") == 599
        s._shards["c"].shard = shard
    finally:
        s.close()


def test_edge_disk_nearly_full_is_a_503_before_any_write(tmp_path):
    s = EdgeStore(str(tmp_path / "q"), min_free_bytes=2**62)
    try:
        for call in (lambda: s.create("c", DIM, "fake-8"), s.ping):
            with pytest.raises(ServiceUnavailableError) as info:
                call()
            assert str(tmp_path / "q") in info.value.message and "MiB free" in info.value.message
            assert info.value.headers.get("Retry-After")
        assert s.down is not None and not s.exists("c")
        s.min_free_bytes = 0
        s.create("c", DIM, "fake-8")
        s.min_free_bytes = 2**62
        with pytest.raises(ServiceUnavailableError, match="full disk would kill"):
            s.upsert("c", [1], unit(1), payloads(1))
        with pytest.raises(ServiceUnavailableError):
            s.delete_points("c", [1])
        assert s.count("c") == 0 and s.down is None  # a read succeeded: up again; nothing was written
    finally:
        s.close()


FSIZE_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    import numpy as np
    from negspace_contracts.errors import ServiceUnavailableError
    from negspace_controller.store_edge import EdgeStore
    s = EdgeStore(sys.argv[1], flush_interval_s=None)
    s.create("c", 8, "fake-8")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, a write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        s.upsert("c", [1], np.ones((1, 8), np.float32), [{"text": "x", "_seq": 0}])
        print(json.dumps({"ok": True}))
    except ServiceUnavailableError as e:
        print(json.dumps({"status": e.status_code, "message": e.message, "down": s.down}))
""")


def test_edge_engine_io_error_is_a_503_naming_the_folder(tmp_path):
    """A real engine IO error: the file size limit makes edge fail to grow its vector file."""
    r = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path / "q")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.get("status") == 503, out
    assert f"embedded Qdrant (edge) storage {tmp_path / 'q'}" in out["message"]
    assert "File too large" in out["message"] and "writing 1 points" in out["message"] and out["down"]


def test_edge_engine_and_os_errors_are_mapped_in_one_place(tmp_path):
    path = tmp_path / "q"
    s = EdgeStore(str(path))
    try:
        s.create("c", DIM, "fake-8")

        class Broken:
            def __init__(self, inner, exc):
                self.inner, self.exc = inner, exc

            def __getattr__(self, name):
                def call(*a, **kw):
                    raise self.exc
                return call

        real = s._shards["c"].shard
        s._shards["c"].shard = Broken(real, Exception("Service runtime error: boom"))
        with pytest.raises(ServiceUnavailableError, match="boom") as info:
            s.count("c")
        assert f"storage {path} failed during counting 'negspace_c'" in info.value.message
        s._shards["c"].shard = Broken(real, TypeError("a bug"))
        with pytest.raises(TypeError):  # not a store fault: stays what it is (a 500)
            list(s.scan("c"))
        s._shards["c"].shard = real
        assert s.count("c") == 0 and s.down is None
        # a file where a collection folder goes (an OSError from the filesystem)
        (path / "negspace_d").write_text("not a folder")
        with pytest.raises(ServiceUnavailableError, match="NotADirectoryError"):
            s.create("d", DIM, "fake-8")
        # a collection.json that is not JSON
        (path / "negspace_c" / "collection.json").write_text("{")
        with pytest.raises(ServiceUnavailableError, match="unreadable collection.json"):
            s.dimension("c")
    finally:
        if "c" in s._shards:
            s._shards["c"].shard = real
        s.close()


# ---------------------------------------------------------------------------------------------- engine choice

def local_folder(path, n: int = 5):
    s = LocalStore(str(path))
    s.create("run", DIM, "fake-8")
    s.upsert("run", list(range(n)), unit(n), payloads(n))
    s.close()


def test_engine_choice_follows_the_folder(tmp_path, caplog):
    assert choose_engine(str(tmp_path / "new"), None) == "edge"
    assert choose_engine(":memory:", None) == "edge" and choose_engine(":memory:", "local") == "local"
    local_folder(tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="negspace.controller"):
        assert choose_engine(str(tmp_path / "old"), None) == "local"
    lines = [r.getMessage() for r in caplog.records if "local-mode store" in r.getMessage()]
    assert len(lines) == 1 and f"python -m negspace_controller.migrate_store {tmp_path / 'old'}" in lines[0]
    assert choose_engine(str(tmp_path / "old"), "local") == "local"
    with pytest.raises(ValueError, match="migrate_store"):
        choose_engine(str(tmp_path / "old"), "edge")
    with pytest.raises(ValueError, match="local-mode store"):
        EdgeStore(str(tmp_path / "old"))  # never writes beside a local-mode store
    s = EdgeStore(str(tmp_path / "edge"))
    s.close()
    assert choose_engine(str(tmp_path / "edge"), "local") == "local"  # nothing in it to hide
    s = EdgeStore(str(tmp_path / "edge"))
    s.create("run", DIM, "fake-8")
    s.close()
    with pytest.raises(ValueError, match="holds edge collections"):
        choose_engine(str(tmp_path / "edge"), "local")
    assert choose_engine(str(tmp_path / "edge"), None) == "edge"


@pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning")
async def test_build_store_and_health_name_the_engine(tmp_path, run_app):
    local_folder(tmp_path / "old")
    for path, engine, count in ((tmp_path / "old", "local", 5), (tmp_path / "new", "edge", 0)):
        settings = ControllerSettings(qdrant_path=str(path), index_snapshots="off")
        st = build_store(settings)
        assert st.engine == engine and type(st) is (LocalStore if engine == "local" else EdgeStore)
        st.close()
        async with run_app(settings, embedder=HashingFakeEmbedder(dimension=DIM)) as (_app, client, raw):
            if count:
                assert (await client.collections.get("run")).count == count
            h = (await raw.get("/health")).json()
            assert h["status"] == "ok" and h["info"]["qdrant_engine"] == engine, h
    # an explicit engine that contradicts the folder: start-up fails, /health says why
    async with run_app(ControllerSettings(qdrant_path=str(tmp_path / "old"), qdrant_engine="edge"),
                       embedder=HashingFakeEmbedder(dimension=DIM)) as (_app, _client, raw):
        h = await raw.get("/health")
        assert h.status_code == 503 and "migrate_store" in h.json()["detail"], h.text
    settings = ControllerSettings(qdrant_url="http://127.0.0.1:1", qdrant_engine="edge")
    st = build_store(settings)
    assert st.engine == "server"
    st.close()
    for interval, every in ((0, True), (5, False)):
        st = build_store(ControllerSettings(qdrant_path=str(tmp_path / "new"), qdrant_flush_interval_s=interval))
        assert st.flush_every_write is every and (st._flusher is None) is every
        st.close()


async def test_migrate_local_mode_folder_to_edge(tmp_path, run_app):
    """The controller's own local-mode folder, migrated in place: same points, same answers, and
    the neighbour-list snapshot is still used (no rebuild)."""
    path = tmp_path / "qdrant"
    settings = ControllerSettings(qdrant_path=str(path))
    texts = [f"write a {w} problem about {x}" for w in ("math", "logic", "poem") for x in ("apples", "sea", "cats")]
    async with run_app(ControllerSettings(qdrant_path=str(path), qdrant_engine="local"),
                       embedder=HashingFakeEmbedder(dimension=DIM)) as (app, client, _raw):
        await client.collections.create("run")
        await client.collections.upsert("run", [PointIn(id=i, text=t, payload={"round": i % 2})
                                                for i, t in enumerate(texts)])
        await client.collections.upsert("run", [PointIn(id=uuid.UUID(int=5), text="a uuid point")])
        dense = await client.collections.dense("run", k=5, knn=3)
    assert app.state.controller.store.engine == "local"

    # a failure half-way puts the local-mode store back as it was
    real_upsert = EdgeStore.upsert
    try:
        EdgeStore.upsert = lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        with pytest.raises(OSError):
            migrate(path, say=lambda m: None)
    finally:
        EdgeStore.upsert = real_upsert
    assert store_edge.is_local_mode_folder(path) and not (tmp_path / "qdrant.local-mode").exists()

    said: list[str] = []
    assert migrate(path, say=said.append) == {"negspace_run": len(texts) + 1}
    assert "delete it once" in said[-1] and store_edge.is_local_mode_folder(tmp_path / "qdrant.local-mode")
    with pytest.raises(ValueError, match="does not hold"):
        migrate(path)
    async with run_app(settings, embedder=HashingFakeEmbedder(dimension=DIM)) as (app, client, raw):
        assert (await client.collections.get("run")).count == len(texts) + 1
        assert app.state.controller.store.engine == "edge"
        assert app.state.controller.collections.from_snapshot == {"run"}  # the lists were not rebuilt
        again = await client.collections.dense("run", k=5, knn=3)
        assert [i.id for i in again.items] == [i.id for i in dense.items]
        np.testing.assert_allclose([i.density for i in again.items], [i.density for i in dense.items], rtol=1e-5)
        assert (await client.collections.metrics("run", MetricsRequest(filter={"round": 1}))).n == 4
