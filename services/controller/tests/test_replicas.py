"""Controller replicas over one Qdrant: each loads and serves only the collections it owns (the
owner recorded at creation, else the orchestrator's rendezvous rule), drops its copy of the
others, and refuses their calls rather than answer from a copy that misses the owner's writes.
Then the Qdrant server's collection settings (shards, replication, write consistency)."""

from __future__ import annotations

import pytest
from negspace_contracts.controller import PointIn, controller_for
from negspace_contracts.errors import ConflictError
from negspace_controller.serving import Controller
from negspace_controller.settings import ControllerSettings
from negspace_controller.store_edge import EdgeStore
from negspace_controller.store_qdrant import LocalStore
from negspace_controller.stores import build_store
from negspace_controller.testing import HashingFakeEmbedder

A, B = "http://controller-0.controller-headless:8002", "http://controller-1.controller-headless:8002"
REPLICAS = [A, B]


def names_owned_by(url: str, urls: list[str], n: int = 1) -> list[str]:
    """Collection names the orchestrator's rule routes to ``url``."""
    out = [f"run{i}" for i in range(200) if controller_for(f"run{i}", urls) == url]
    return out[:n]


@pytest.fixture(params=["local", "edge"])
def store(request, tmp_path):
    s = LocalStore(":memory:") if request.param == "local" else EdgeStore(str(tmp_path / "q"))
    yield s
    s.close()


def replica(store, me: str | None, tmp_path, replicas=REPLICAS) -> Controller:
    return Controller(HashingFakeEmbedder(dimension=16), store, knn_capacity=4,
                      snapshot_dir=tmp_path / {A: "index-a", B: "index-b", None: "index-single"}[me],
                      replica=me, replicas=replicas if me else ())


async def write(ctl: Controller, name: str, start: int, n: int) -> None:
    await ctl.upsert(name, [PointIn(id=i, text=f"text number {i} about {name}") for i in range(start, start + n)])


async def test_two_replicas_over_one_store_each_serve_only_their_own(store, tmp_path):
    a, b = replica(store, A, tmp_path), replica(store, B, tmp_path)
    # the orchestrator sends each PUT to the replica it chose (rendezvous, or a run's family):
    # the creator is recorded as the owner even where the rule would pick the other replica
    (on_b,) = names_owned_by(B, REPLICAS)
    await a.create("mine")
    await a.create(on_b)  # a family member placed beside its run on A
    await write(a, "mine", 0, 5)
    await write(a, on_b, 0, 3)
    assert store.owner("mine") == A and store.owner(on_b) == A
    for name in ("mine", on_b):
        with pytest.raises(ConflictError, match=f"belongs to controller replica {A}") as err:
            await b.info(name)
        assert B in err.value.message and err.value.param == "name"
        with pytest.raises(ConflictError):
            await b.similar(name, "text number 1", k=2, threshold=0.9)
        with pytest.raises(ConflictError):
            await b.create(name)  # 'exists' is not an answer B may give either
        with pytest.raises(ConflictError):
            await b.delete(name)
    assert b.health_info()["collections"] == {}

    # both restart over the same store: each loads only what it owns
    a2, b2 = replica(store, A, tmp_path), replica(store, B, tmp_path)
    await a2.warm_up()
    await b2.warm_up()
    assert a2.health_info()["collections"] == {"mine": 5, on_b: 3}
    assert b2.health_info()["collections"] == {}
    await write(a2, "mine", 5, 2)
    assert (await a2.info("mine")).count == 7
    with pytest.raises(ConflictError):
        await b2.dense("mine", k=2, knn=2)


async def test_collections_without_a_recorded_owner_follow_the_orchestrators_rule(store, tmp_path):
    """Collections made before owners were recorded: the orchestrator's rendezvous pick owns them."""
    (for_a,), (for_b,) = names_owned_by(A, REPLICAS), names_owned_by(B, REPLICAS)
    single = replica(store, None, tmp_path)  # a lone controller: owns everything, records no owner
    for name in (for_a, for_b):
        await single.create(name)
        await write(single, name, 0, 4)
        assert store.owner(name) is None
    a, b = replica(store, A, tmp_path), replica(store, B, tmp_path)
    await a.warm_up()
    await b.warm_up()
    assert set(a.health_info()["collections"]) == {for_a}
    assert set(b.health_info()["collections"]) == {for_b}
    with pytest.raises(ConflictError, match=B):
        await a.info(for_b)
    # a replica set of one: that replica owns them all again
    solo = replica(store, A, tmp_path, replicas=[A])
    await solo.warm_up()
    assert set(solo.health_info()["collections"]) == {for_a, for_b}


async def test_a_replica_drops_its_copy_of_what_it_no_longer_owns(store, tmp_path):
    """Before routing, every replica loaded every collection and kept an index log of each: B's
    log of A's collection stops receiving writes the moment A takes them. At start-up B drops it."""
    (name,) = names_owned_by(A, REPLICAS)
    old_b = Controller(HashingFakeEmbedder(dimension=16), store, knn_capacity=4, snapshot_dir=tmp_path / "index-b")
    await old_b.create(name)
    await write(old_b, name, 0, 4)
    old_b.save_snapshots()
    journal = old_b.collections._journal(name)
    assert journal.has_files()

    b = replica(store, B, tmp_path)
    assert b.collections.snapshot_dir == tmp_path / "index-b"
    await b.warm_up()
    assert b.health_info()["collections"] == {} and not journal.has_files()
    a = replica(store, A, tmp_path)
    await a.warm_up()
    assert a.health_info()["collections"] == {name: 4}


def test_replica_settings_are_checked():
    s = ControllerSettings(qdrant_path=":memory:", replica_url=A + "/", replica_urls=f"{A}/, {B}")
    assert s.replica_url == A and s.replica_urls == [A, B]
    with pytest.raises(ValueError, match="must be one of --replica-urls"):
        ControllerSettings(qdrant_path=":memory:", replica_url="http://elsewhere:8002", replica_urls=[A, B])
    with pytest.raises(ValueError, match="must be one of --replica-urls"):
        ControllerSettings(qdrant_path=":memory:", replica_urls=[A, B])
    with pytest.raises(ValueError, match="more than once"):
        ControllerSettings(qdrant_path=":memory:", replica_url=A, replica_urls=[A, A + "/"])


# ---------------------------------------------------------------------- Qdrant server collections
class RecordingClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_collection(self, name, **kw):
        self.calls.append((name, kw))
        return True

    def close(self) -> None:
        pass


def test_server_collections_are_created_with_the_cluster_settings(monkeypatch):
    monkeypatch.setenv("CONTROLLER_QDRANT_SHARD_NUMBER", "3")
    settings = ControllerSettings(qdrant_url="http://127.0.0.1:9")
    assert settings.collection_params() == {"replication_factor": 2, "write_consistency_factor": 1,
                                            "shard_number": 3}
    store = build_store(settings)
    store.client = RecordingClient()
    store.create("run", 16, "fake-16", "http://controller-0:8002")
    ((name, kw),) = store.client.calls
    assert name == "negspace_run"
    assert kw["replication_factor"] == 2 and kw["write_consistency_factor"] == 1 and kw["shard_number"] == 3
    assert kw["metadata"] == {"embedder": "fake-16", "owner": "http://controller-0:8002"}
    store.close()


def test_defaults_survive_one_lost_peer_and_are_server_only(monkeypatch):
    default = ControllerSettings(qdrant_url="http://q:6333")
    # two copies of every shard, a write confirmed by one: any one peer can be lost
    assert default.collection_params() == {"replication_factor": 2, "write_consistency_factor": 1}
    assert default.qdrant_write_consistency_factor < default.qdrant_replication_factor
    with pytest.raises(ValueError, match="exceeds --qdrant-replication-factor"):
        ControllerSettings(qdrant_url="http://q:6333", qdrant_replication_factor=1,
                           qdrant_write_consistency_factor=2)
    # embedded engines: the defaults are not theirs to apply; more than one shard or copy is
    # refused by name, 1 (what they do anyway, and what compose's one-peer server sets) is not
    assert ControllerSettings(qdrant_path=":memory:").collection_params() == {}
    for field, flag in (("qdrant_replication_factor", "--qdrant-replication-factor 2"),
                        ("qdrant_shard_number", "--qdrant-shard-number 2"),
                        ("qdrant_write_consistency_factor", "--qdrant-write-consistency-factor 2")):
        with pytest.raises(ValueError, match=flag):
            ControllerSettings(qdrant_path=":memory:", **{"qdrant_replication_factor": 2, field: 2})
    one = ControllerSettings(qdrant_path=":memory:", qdrant_replication_factor=1, qdrant_shard_number=1)
    assert one.collection_params() == {}
    monkeypatch.setenv("CONTROLLER_QDRANT_REPLICATION_FACTOR", "3")
    with pytest.raises(ValueError, match="--qdrant-replication-factor 3 configure a Qdrant server"):
        ControllerSettings(qdrant_path=":memory:")
    with pytest.raises(ValueError, match="local mode keeps one shard"):
        LocalStore(":memory:", collection_params={"replication_factor": 2})
