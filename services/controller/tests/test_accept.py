"""``POST /collections/{name}/accept`` (check + insert as one call) and the shared embedding batcher."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from negspace_contracts.controller import PointIn
from negspace_contracts.errors import BadRequestError
from negspace_controller.batching import BatchingEncoder
from negspace_controller.testing import HashingFakeEmbedder


class CountingEmbedder(HashingFakeEmbedder):
    def __init__(self) -> None:
        super().__init__(dimension=32, max_tokens=12)
        self.calls: list[list[str]] = []

    def _encode(self, texts):
        self.calls.append(list(texts))
        return super()._encode(texts)


async def test_accept_checks_then_inserts_atomically_and_matches_similar(run_app):
    emb = CountingEmbedder()
    async with run_app(embedder=emb) as (_app, client, raw):
        await client.collections.create("run")
        first = await client.collections.accept("run", PointIn(id=1, text="Write a math problem about apples."))
        assert first.accepted and first.max_similarity is None and not first.is_similar
        dup = await client.collections.accept("run", PointIn(id=2, text="Write a math problem about apples."),
                                              threshold=0.9)
        assert not dup.accepted and dup.is_similar and dup.neighbors[0].id == 1
        assert (await client.collections.get("run")).count == 1
        forced = await client.collections.accept("run", PointIn(id=2, text="Write a math problem about apples."),
                                                 threshold=0.9, force=True)
        assert forced.accepted and forced.is_similar and (await client.collections.get("run")).count == 2
        # a replayed slot (same id, new text) is not judged against its own older version
        again = await client.collections.accept("run", PointIn(id=2, text="Compose a haiku about the sea."))
        assert again.accepted and all(n.id != 2 for n in again.neighbors)
        # the same judgement /similar gives, and the inserted text is embedded once (cache)
        sim = await client.collections.similar("run", "Compose a haiku about the sea.", k=1, threshold=0.9)
        assert sim.max_similarity == pytest.approx(1.0, abs=1e-5)
        embedded = [t for call in emb.calls for t in call]
        assert embedded.count("Compose a haiku about the sea.") == 1
        r = await raw.post("/collections/run/accept", json={"point": {"id": 3, "text": "x", "payload": {"text": 1}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "point.payload"
        with pytest.raises(BadRequestError):
            await client.collections.accept("run", PointIn(id=4, text="y", payload={"_seq": 1}))


@pytest.mark.parametrize("engine", ["edge", "local"])
async def test_concurrent_accepts_see_each_other(engine):
    """64 concurrent identical texts through one collection: exactly one is accepted (the check and
    the insert are one critical section), and the model ran in a few batches, not 64 calls."""
    from negspace_controller.serving import Controller
    from negspace_controller.store_edge import EdgeStore
    from negspace_controller.store_qdrant import LocalStore

    emb = CountingEmbedder()
    store = LocalStore(":memory:") if engine == "local" else EdgeStore(":memory:")
    ctl = Controller(emb, store)
    await ctl.create("run")
    from negspace_contracts.controller import AcceptRequest

    distinct = ["apple pie recipe", "quantum field theory", "medieval castle siege", "jazz piano chords",
                "volcano eruption safety", "chess opening traps", "desert cactus care", "rocket engine design"]
    texts = [distinct[i % 8] for i in range(64)]
    got = await asyncio.gather(*(ctl.accept("run", AcceptRequest(point=PointIn(id=i, text=t), threshold=0.99))
                                 for i, t in enumerate(texts)))
    assert sum(r.accepted for r in got) == 8  # one per distinct text
    assert len(emb.calls) <= 3 and sum(len(c) for c in emb.calls) == 8
    store.close()


async def test_batching_encoder_equals_direct_encode():
    emb = HashingFakeEmbedder(dimension=16, query_instruction="Find similar")
    enc = BatchingEncoder(emb, max_batch=4)
    texts = [f"text number {i}" for i in range(10)]
    (a, ta), (b, tb) = await asyncio.gather(enc.encode(texts[:3]), enc.encode(texts, query=True))
    np.testing.assert_allclose(a, emb.encode(texts[:3])[0], atol=1e-6)
    np.testing.assert_allclose(b, emb.encode(texts, query=True)[0], atol=1e-6)
    assert not np.allclose(a[0], b[0])  # a query and a document differ when a query instruction is set
    assert ta == [False] * 3 and len(tb) == 10


def test_controller_for_routes_collections_stably_and_moves_few_when_a_replica_joins():
    from negspace_contracts.controller import controller_for

    three = [f"http://controller-{i}.controller:8002" for i in range(3)]
    names = [f"run-{i}" for i in range(3000)]
    owner = {n: controller_for(n, three) for n in names}
    assert owner == {n: controller_for(n, list(reversed(three))) for n in names}  # order-independent
    counts = [sum(o == u for o in owner.values()) for u in three]
    assert min(counts) > 800  # roughly even
    four = three + ["http://controller-3.controller:8002"]
    moved = [n for n in names if controller_for(n, four) != owner[n]]
    assert all(controller_for(n, four) == four[3] for n in moved)  # only to the new replica
    assert 500 < len(moved) < 1000  # ~1/4
    with pytest.raises(ValueError):
        controller_for("run", [])
