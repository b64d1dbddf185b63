"""Several controller replicas (issue 15, "beyond one machine"): each run's collection lives on one
replica, chosen by rendezvous hashing when the run is created and recorded in its row. A baseline
lives with its guided run, a restart or a new replica moves no run, a removed replica's runs stop
with its URL instead of going elsewhere, and a comparison across replicas is a clear 409.

Run ids are planned (``plan``) so that which replica the hash picks is known, not left to chance:
each test states the routing it needs (e.g. "on A among [A, B], on C among [A, B, C]")."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from negspace_contracts.controller import controller_for
from negspace_contracts.errors import BadRequestError, ConflictError, ServiceUnavailableError
from negspace_contracts.orchestrator import ExportRequest, RunConfig
from negspace_orchestrator import scheduler
from negspace_orchestrator.scheduler import collection_name

from .conftest import CONTROLLER_URLS, CallLog, MockController  # noqa: TID252

A, B, C = CONTROLLER_URLS
AB, ABC = [A, B], [A, B, C]


def guided(**kw) -> RunConfig:
    base = dict(base_instruction="Write a math problem.", nodes=2, rounds=1, seed=0)
    base.update(kw)
    return RunConfig(**base)


def baseline(**kw) -> RunConfig:
    return RunConfig(base_instruction="Write a math problem.", mode="baseline", nodes=2, seed=7, **kw)


@pytest.fixture
def plan(monkeypatch):
    """``plan((urls, owner), ...)``: the id the next created run gets, one whose collection the
    hash routes to ``owner`` among each ``urls``; a run created without a plan fails the test."""
    queue: list[str] = []
    used: set[str] = set()

    def next_id() -> str:
        assert queue, "a run was created that the test did not plan"
        return queue.pop(0)

    monkeypatch.setattr(scheduler, "new_run_id", next_id)

    def pick(*rules: tuple[list[str], str]) -> str:
        for i in range(100_000):
            rid = f"r{i:06d}"
            if rid not in used and all(controller_for(collection_name(rid), urls) == owner for urls, owner in rules):
                used.add(rid)
                queue.append(rid)
                return rid
        raise AssertionError(f"no id routes as {rules}")

    return pick


def replicas(*urls: str) -> dict[str, MockController]:
    log = CallLog()
    return {u: MockController(log) for u in urls}


async def wait_accepted(h, run_id: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await h.client.runs.get(run_id)).progress.accepted < n:
        assert time.monotonic() < deadline, f"run {run_id} did not reach {n} accepted"
        await asyncio.sleep(0.02)


async def test_runs_land_on_both_replicas_and_each_replica_sees_only_its_own_runs(make_harness, plan):
    planned = {plan((AB, A)): A, plan((AB, B)): B, plan((AB, A)): A, plan((AB, B)): B}
    async with make_harness(n_controllers=2) as h:
        ids = [(await h.client.runs.create(guided(seed=i))).id for i in range(4)]
        assert ids == list(planned)
        for rid in ids:
            run = await h.wait(rid)
            assert run.status == "completed", run.error
            assert run.controller == planned[rid]
            # the mock answers metrics of a collection it lacks with n=0: 4 says the owner answered
            assert (await h.client.runs.metrics(rid)).n == 4
        for url, ctl in h.controllers.items():
            assert set(ctl.collections) == {collection_name(r) for r, u in planned.items() if u == url}
            assert all(len(points) == 4 for points in ctl.collections.values())
        info = (await h.client.health()).info
        assert info["dependencies"]["controllers"] == {A: "ok", B: "ok"}
        assert info["dependencies"]["controller"] == "ok"
        assert info["runs_per_controller"] == {A: 2, B: 2} and info["runs_on_unconfigured_controllers"] == {}


async def test_a_baseline_lives_on_its_guided_runs_replica_and_compare_across_replicas_is_a_409(make_harness, plan):
    gid_, bid_, xid_, cid_ = plan((AB, A)), plan((AB, B)), plan((AB, B)), plan((AB, B))  # b, x, c hash to B
    async with make_harness(n_controllers=2) as h:
        gid = (await h.client.runs.create(guided())).id
        await h.wait(gid)
        bid = (await h.client.runs.create(baseline(match_run=gid))).id
        xid = (await h.client.runs.create(baseline(size=3))).id
        cid = (await h.client.runs.create(guided(seed=3, colocate_with=gid))).id
        assert (gid, bid, xid, cid) == (gid_, bid_, xid_, cid_)
        runs = {r: await h.wait(r) for r in (bid, xid, cid)}
        assert all(r.status == "completed" for r in runs.values())
        assert runs[bid].controller == A  # its parent's, not its own hash's (B)
        assert runs[cid].controller == A and runs[xid].controller == B
        assert set(h.controllers[A].collections) == {collection_name(r) for r in (gid, bid, cid)}

        got = await h.client.runs.compare(gid, bid)
        assert (got.run.metrics.n, got.other.metrics.n) == (4, 4)
        assert (await h.client.runs.compare(cid, gid)).other.metrics.n == 4

        n_compares = h.log.kinds().count("compare")
        with pytest.raises(ConflictError) as e:
            await h.client.runs.compare(gid, xid)
        msg = e.value.message
        assert e.value.status_code == 409 and e.value.param == "with"
        assert A in msg and B in msg and f"match_run={gid}" in msg and f"colocate_with={gid}" in msg
        assert h.log.kinds().count("compare") == n_compares  # no controller was asked

        with pytest.raises(BadRequestError) as e:
            await h.client.runs.create(guided(colocate_with="nope"))
        assert e.value.param == "colocate_with"
        with pytest.raises(BadRequestError, match="give only one"):  # its two family members disagree
            await h.client.runs.create(baseline(match_run=gid, colocate_with=xid))


async def test_a_restart_keeps_every_runs_controller_and_a_third_url_moves_none(make_harness, plan):
    # under [A, B, C] each of these hashes to C: a router without the recorded controller would move them
    r1, r2, live = plan((AB, A), (ABC, C)), plan((AB, B), (ABC, C)), plan((AB, B), (ABC, C))
    ctls = replicas(A, B, C)
    async with make_harness(controllers={A: ctls[A], B: ctls[B]}) as h:
        for rid in (r1, r2):
            assert (await h.client.runs.create(guided())).id == rid
            assert (await h.wait(rid)).status == "completed"
        h.nodes[0].delay = 0.1
        assert (await h.client.runs.create(guided(nodes=1, rounds=6))).id == live
        await wait_accepted(h, live, 1)  # the orchestrator stops with this run half done
    new = plan((ABC, C))
    async with make_harness(controllers=ctls) as h:
        assert h.settings.controller_url == ABC
        assert {r: (await h.client.runs.get(r)).controller for r in (r1, r2, live)} == {r1: A, r2: B, live: B}
        run = await h.wait(live)
        assert run.status == "completed" and run.controller == B
        assert len(ctls[B].collections[collection_name(live)]) == 7
        assert (await h.client.runs.metrics(r1)).n == 4 and (await h.client.runs.metrics(r2)).n == 4
        assert (await h.client.runs.compare(r2, live)).run.metrics.n == 4  # both still on B
        assert (await h.client.runs.create(guided())).id == new
        assert (await h.wait(new)).controller == C
        assert set(ctls[C].collections) == {collection_name(new)}  # nothing old reached the new replica


async def test_a_removed_controller_url_stops_its_runs_with_the_url_and_adding_it_back_resumes(make_harness, plan):
    a_done, b_done, b_live = plan((AB, A)), plan((AB, B)), plan((AB, B))
    ctls = replicas(A, B)
    async with make_harness(controllers=ctls) as h:
        for rid in (a_done, b_done):
            assert (await h.client.runs.create(guided())).id == rid
            await h.wait(rid)
        h.nodes[0].delay = 0.1
        assert (await h.client.runs.create(guided(nodes=1, rounds=6))).id == b_live
        await wait_accepted(h, b_live, 1)
    async with make_harness(controllers={A: ctls[A]}) as h:  # B is gone from the list
        run = await h.client.runs.get(b_live)
        assert run.status == "paused" and run.controller == B
        assert run.error.startswith(f"controller {B} unavailable: its collection lives on controller {B}")
        assert "not among the configured --controller-url" in run.error
        with pytest.raises(ConflictError) as e:
            await h.client.runs.resume(b_live)
        assert B in e.value.message and "add the URL back" in e.value.message
        with pytest.raises(ServiceUnavailableError, match=B):
            await h.client.runs.metrics(b_done)
        with pytest.raises(ConflictError, match="different controller replicas"):
            await h.client.runs.compare(a_done, b_done)
        with pytest.raises(ConflictError) as e:
            await h.client.runs.create(baseline(match_run=b_done))
        assert B in e.value.message and e.value.param == "match_run"
        exported = await h.client.runs.export(b_done, ExportRequest(format="jsonl", export_dir="b"))
        assert exported.instructions == 4  # the rows are the orchestrator's; the card says what is missing
        assert B in (h.settings.exports_dir / "b" / "README.md").read_text()
        assert (await h.client.runs.metrics(a_done)).n == 4
        info = (await h.client.health()).info
        assert info["runs_on_unconfigured_controllers"] == {B: 2}
        assert info["dependencies"]["controllers"] == {A: "ok"}
        await asyncio.sleep(0.3)  # three health-loop ticks: never resumed elsewhere
        assert (await h.client.runs.get(b_live)).status == "paused"
        assert set(ctls[A].collections) == {collection_name(a_done)}
    async with make_harness(controllers=ctls) as h:  # B is back: the health loop resumes its run there
        run = await h.wait(b_live)
        assert run.status == "completed" and len(ctls[B].collections[collection_name(b_live)]) == 7


async def test_one_replica_down_holds_only_its_own_runs(make_harness, plan):
    b1, b2, a1 = plan((AB, B)), plan((AB, B)), plan((AB, A))
    async with make_harness(n_controllers=2) as h:
        h.controllers[B].down = True
        assert (await h.client.runs.create(guided())).id == b1
        assert (await h.wait(b1, statuses=("paused",))).controller == B
        assert (await h.client.runs.create(guided())).id == b2
        assert (await h.client.runs.create(guided())).id == a1
        assert (await h.wait(a1)).status == "completed"  # A's run goes on while B is down
        assert (await h.client.runs.get(b2)).status == "queued"  # held: it would only pause
        info = (await h.client.health()).info
        assert info["dependencies"]["controllers"][A] == "ok"
        assert info["dependencies"]["controllers"][B] != "ok" and B in info["dependencies"]["controller"]
        assert B in info["queued_runs_held_because"]
        h.controllers[B].down = False
        for rid in (b1, b2):
            assert (await h.wait(rid)).status == "completed"
        assert (await h.client.health()).info["queued_runs_held_because"] is None


async def test_runs_from_before_routing_get_the_one_controller_and_several_urls_refuse_to_guess(make_harness, plan,
                                                                                                 tmp_path):
    from negspace_orchestrator.store import Store

    old, fresh, fresh_b = plan(), plan((AB, B)), plan((AB, A))
    ctls = replicas(A, B)
    async with make_harness(controllers={A: ctls[A]}) as h:
        assert (await h.client.runs.create(guided())).id == old
        await h.wait(old)
    db = sqlite3.connect(tmp_path / "orch.db")  # the database as an orchestrator before routing left it
    db.execute("ALTER TABLE runs DROP COLUMN controller")
    db.commit()
    db.close()
    store = Store(tmp_path / "orch.db")  # opening it adds the column back, empty
    store.create_run(fresh, guided(), 4, collection_name(fresh))  # queued, never started
    store.create_run(fresh_b, baseline(match_run=fresh), 4, collection_name(fresh_b))  # its baseline
    assert {r.id for r in store.unrouted_runs()} == {old, fresh, fresh_b}
    store.close()

    with pytest.raises(RuntimeError, match=f"{old}.*Start once with only the controller"):
        async with make_harness(controllers=ctls):
            pass
    store = Store(tmp_path / "orch.db")
    assert store.get_run(old).controller is None  # not guessed
    assert store.get_run(fresh).controller == B  # it never generated: routed like a new run
    assert store.get_run(fresh_b).controller == B  # beside its guided run, not where its own hash says
    store.close()

    async with make_harness(controllers={A: ctls[A]}) as h:  # one URL: the controller there always was
        assert (await h.client.runs.get(old)).controller == A
        assert (await h.client.runs.get(fresh)).status == "paused"  # B is not configured here
        assert (await h.client.runs.get(fresh_b)).status == "paused"
    async with make_harness(controllers=ctls) as h:
        assert (await h.client.runs.metrics(old)).n == 4
        for rid in (fresh, fresh_b):
            run = await h.wait(rid)
            assert run.status == "completed" and run.controller == B
        assert (await h.client.runs.compare(fresh, fresh_b)).other.metrics.n == 4
