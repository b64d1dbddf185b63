"""--max-active-runs and --max-queued-runs: runs beyond the active cap wait ``queued`` and start
first created first; a paused, cancelled or ended run gives its slot back; a full queue is a 429
with Retry-After; a restart keeps the queue's order."""

from __future__ import annotations

import asyncio

import pytest
from negspace_contracts.errors import RateLimitError
from negspace_contracts.orchestrator import RunConfig


def cfg(**kw) -> RunConfig:
    base = dict(base_instruction="Write a math problem.", nodes=1, rounds=1, seed=0)
    base.update(kw)
    return RunConfig(**base)


def status_seqs(h, run_id: str) -> list[tuple[int, str]]:
    """(event seq, status) of a run's status changes; seqs are global, so they order runs too."""
    return [(e.seq, e.data["status"]) for e in h.orch.store.events_after(run_id, 0, limit=10_000)
            if e.type == "status"]


def first(seqs: list[tuple[int, str]], status: str) -> int:
    return next(seq for seq, s in seqs if s == status)


def assert_one_at_a_time(h, ids: list[str], since: int = 0) -> None:
    """Each run started (after event ``since``) only once the previous one completed, in creation order."""
    for prev, nxt in zip(ids, ids[1:], strict=False):
        started = min(seq for seq, s in status_seqs(h, nxt) if s == "running" and seq > since)
        assert first(status_seqs(h, prev), "completed") < started, (status_seqs(h, prev), status_seqs(h, nxt))


async def test_max_one_active_runs_three_one_at_a_time_in_creation_order(make_harness):
    async with make_harness(max_active_runs=1, node_delay=0.02) as h:
        ids = [(await h.client.runs.create(cfg(seed=i))).id for i in range(3)]
        listed = {r.id: r.status for r in (await h.client.runs.list()).runs}
        assert listed == {ids[0]: "running", ids[1]: "queued", ids[2]: "queued"}
        assert (await h.client.runs.get(ids[1])).progress.eta_seconds is None
        for rid in ids:
            run = await h.wait(rid)
            assert run.status == "completed" and run.progress.accepted == 2, run
        assert_one_at_a_time(h, ids)
        health = await h.client.health()
        assert health.info["max_active_runs"] == 1 and health.info["runs"] == {"completed": 3}


async def test_a_full_queue_is_a_429_with_retry_after_and_a_slot_frees_on_cancel(make_harness):
    async with make_harness(max_active_runs=1, max_queued_runs=2, node_delay=30) as h:
        a = (await h.client.runs.create(cfg())).id
        b = (await h.client.runs.create(cfg())).id
        c = (await h.client.runs.create(cfg())).id
        assert [(await h.client.runs.get(x)).status for x in (a, b, c)] == ["running", "queued", "queued"]
        with pytest.raises(RateLimitError) as ei:
            await h.client.runs.create(cfg())
        assert "--max-queued-runs 2" in ei.value.message and ei.value.retry_after is not None
        raw = await h.client._http.post("/runs", json=cfg().model_dump(mode="json", exclude_none=True))
        assert raw.status_code == 429 and int(raw.headers["Retry-After"]) >= 1
        assert raw.json()["error"]["type"] == "rate_limit_error"
        assert len((await h.client.runs.list()).runs) == 3  # the refused ones were not stored
        # cancelling the running one gives its slot to the oldest queued run
        await h.client.runs.cancel(a)
        assert (await h.wait(b, statuses=("running",), timeout=5)).status == "running"
        assert (await h.client.runs.get(c)).status == "queued"
        d = (await h.client.runs.create(cfg())).id  # the queue has room again
        # cancelling a queued run takes it out of the queue without starting anything
        await h.client.runs.cancel(c)
        assert [(await h.client.runs.get(x)).status for x in (b, c, d)] == ["running", "cancelled", "queued"]


async def paused_and_queued(h) -> tuple[str, str]:
    """With the nodes down and one slot: run ``a`` pauses, run ``b`` waits in the queue."""
    for n in h.nodes:
        n.down = True
    a = (await h.client.runs.create(cfg())).id
    b = (await h.client.runs.create(cfg())).id
    await h.wait(a, statuses=("paused",))
    return a, b


async def test_a_paused_run_gives_its_slot_back_and_requeues_in_creation_order(make_harness):
    async with make_harness(max_active_runs=1, health_interval_s=0.05) as h:
        a, b = await paused_and_queued(h)
        # a's slot is free, but the node is down: b is held in the queue instead of starting only to
        # pause in turn, and /health says why
        await asyncio.sleep(0.3)
        assert (await h.client.runs.get(b)).status == "queued"
        assert "node unavailable" in (await h.client.health()).info["queued_runs_held_because"]
        for n in h.nodes:
            n.down = False  # the health loop resumes a and releases the queue, oldest first
        assert (await h.wait(a)).status == "completed"
        assert (await h.wait(b)).status == "completed"
        a_seqs, b_seqs = status_seqs(h, a), status_seqs(h, b)
        assert [s for _, s in b_seqs] == ["queued", "running", "completed"], b_seqs  # never paused
        a_resumed = [seq for seq, s in a_seqs if s == "running"][-1]
        assert a_resumed < first(a_seqs, "completed") < first(b_seqs, "running")
        assert (await h.client.health()).info["queued_runs_held_because"] is None


async def test_a_resume_by_request_releases_the_held_queue_at_once(make_harness):
    async with make_harness(max_active_runs=1, health_interval_s=60) as h:
        a, b = await paused_and_queued(h)
        for n in h.nodes:
            n.down = False  # back, but the health loop will not look for a minute
        await h.client.runs.resume(a)  # the operator says: try now
        assert (await h.wait(a)).status == "completed"
        assert (await h.wait(b)).status == "completed"


async def test_a_restart_keeps_the_queue_order_and_the_active_cap(make_harness):
    async with make_harness(max_active_runs=2, node_delay=30) as h:
        ids = [(await h.client.runs.create(cfg(seed=i))).id for i in range(4)]
        assert [(await h.client.runs.get(x)).status for x in ids] == ["running", "running", "queued", "queued"]
        await asyncio.sleep(0.05)
        before_restart = h.orch.store.db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    # restarted with one slot: the oldest running run keeps it, the other goes back to the queue
    # ahead of the runs created after it
    async with make_harness(max_active_runs=1, node_delay=0.01) as h:
        for rid in ids:
            assert (await h.wait(rid)).status == "completed"
        requeued = [s for _, s in status_seqs(h, ids[1])]
        assert requeued[-4:] == ["running", "queued", "running", "completed"], requeued
        assert_one_at_a_time(h, ids, since=before_restart)
