"""Fault tests: a node dying mid-run, every node or the controller down (paused, then resumed),
and the orchestrator SIGKILLed mid-run and started again on the same database."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter

from negspace_contracts.orchestrator import OrchestratorClient, RunConfig
from negspace_servekit.testing import free_port, wait_healthy

from .conftest import CallLog, MockController, MockNode, ThreadServer  # noqa: TID252


def cfg(**kw) -> RunConfig:
    base = dict(base_instruction="Write a math problem.", nodes=2, rounds=2, max_tokens=32, seed=3)
    base.update(kw)
    return RunConfig(**base)


async def assert_complete_and_unique(h, rid: str, target: int) -> None:
    insts = await h.client.runs.instructions(rid)
    assert len(insts) == target
    assert len({(i.node, i.round) for i in insts}) == target
    col = h.controller.collections[f"negspace-{rid}"]
    assert sorted(col) == sorted(i.id for i in insts)  # every instruction in the controller, once


async def test_node_dying_mid_run_fails_over_to_the_next_url(make_harness):
    async with make_harness(n_urls=2, node_delay=0.02) as h:
        rid = (await h.client.runs.create(cfg(nodes=2, rounds=3))).id
        while (await h.client.runs.get(rid)).progress.accepted < 2:
            await asyncio.sleep(0.01)
        h.nodes[0].down = True
        served_by_0 = len(h.nodes[0].requests)
        run = await h.wait(rid)
        assert run.status == "completed", run.error
        assert len(h.nodes[0].requests) == served_by_0  # nothing more reached the dead node
        assert len(h.nodes[1].requests) > 0
        await assert_complete_and_unique(h, rid, 8)


async def test_transient_node_errors_are_retried(make_harness):
    async with make_harness(n_urls=1) as h:
        h.nodes[0].fail_next = 2  # two 503s, then fine (retry_attempts=3)
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=1))).id
        assert (await h.wait(rid)).status == "completed"


async def test_all_nodes_down_pauses_then_resumes_by_request(make_harness):
    async with make_harness(n_urls=2, health_interval_s=3600) as h:
        rid = (await h.client.runs.create(cfg())).id
        while (await h.client.runs.get(rid)).progress.accepted < 1:
            await asyncio.sleep(0.005)
        for n in h.nodes:
            n.down = True
        run = await h.wait(rid, statuses=("paused",))
        assert "node unavailable" in run.error and "down" in run.error
        for n in h.nodes:
            n.down = False
        run = await h.client.runs.resume(rid)
        assert run.status in ("queued", "running", "completed")
        run = await h.wait(rid)
        assert run.status == "completed" and run.error is None
        await assert_complete_and_unique(h, rid, 6)


async def test_controller_down_pauses_with_the_reason_and_resumes_when_back(make_harness):
    async with make_harness(health_interval_s=0.05) as h:
        rid = (await h.client.runs.create(cfg())).id
        while (await h.client.runs.get(rid)).progress.accepted < 2:
            await asyncio.sleep(0.005)
        h.controller.down = True
        run = await h.wait(rid, statuses=("paused",))
        assert "controller" in run.error and "controller is down" in run.error
        await asyncio.sleep(0.2)
        assert (await h.client.runs.get(rid)).status == "paused"  # stays paused while it is down
        h.controller.down = False
        run = await h.wait(rid)  # the health loop resumes it
        assert run.status == "completed"
        await assert_complete_and_unique(h, rid, 6)
        statuses = [e.data["status"] async for e in h.client.runs.events(rid) if e.type == "status"]
        assert "paused" in statuses and statuses[-1] == "completed"


async def test_a_slot_accepted_but_not_inserted_is_reinserted_with_the_same_id(make_harness):
    """Round 0 stores, then inserts: the process "dies" between the two (guided rounds judge and
    insert in one controller call, the next test)."""
    async with make_harness() as h:
        orch = h.orch
        real_insert = orch.rounds._insert
        calls = {"n": 0}

        async def flaky_insert(run, a, pid):
            calls["n"] += 1
            if calls["n"] == 1:  # the process "dies" after accepting, before the controller insert
                await asyncio.Event().wait()
            await real_insert(run, a, pid)

        orch.rounds._insert = flaky_insert
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=3))).id
        while calls["n"] < 1:
            await asyncio.sleep(0.01)
        await orch.stop()  # what a kill does to the driver task; the status stays "running"
        orch.rounds._insert = real_insert
        assert (await h.client.runs.get(rid)).status == "running"
        insts = await h.client.runs.instructions(rid)
        assert len(insts) == 1 and len(h.controller.collections[f"negspace-{rid}"]) == 0
        await orch.start()  # what a restart does: resume every running run
        run = await h.wait(rid)
        assert run.status == "completed"
        await assert_complete_and_unique(h, rid, 4)
        assert h.controller.upserts == 4  # the replayed round-0 insert + three guided ones


async def test_a_slot_the_controller_accepted_but_the_orchestrator_did_not_record_is_replayed_once(make_harness):
    """A guided slot's ``/accept`` inserted the point, then the process "died" before recording
    the verdict: the restart replays the attempt under the same point id (the controller leaves
    that id out of its own check), so the collection ends with one point per slot."""
    async with make_harness() as h:
        orch = h.orch
        real_judge = orch.rounds._judge
        calls = {"n": 0}

        async def flaky_judge(run, a, **kw):
            if kw.get("inserted"):
                calls["n"] += 1
                if calls["n"] == 2:  # round 2: in the controller, not yet in the store
                    await asyncio.Event().wait()
            await real_judge(run, a, **kw)

        orch.rounds._judge = flaky_judge
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=3))).id
        while calls["n"] < 2:
            await asyncio.sleep(0.01)
        await orch.stop()
        orch.rounds._judge = real_judge
        insts = await h.client.runs.instructions(rid)
        assert len(insts) == 2 and len(h.controller.collections[f"negspace-{rid}"]) == 3
        await orch.start()
        run = await h.wait(rid)
        assert run.status == "completed"
        await assert_complete_and_unique(h, rid, 4)
        assert len(h.controller.collections[f"negspace-{rid}"]) == 4
        assert h.controller.upserts == 5  # four slots + the replayed one, under the same id


def _start_orchestrator(port: int, db, node_url: str, controller_url: str, home) -> subprocess.Popen:
    env = {**os.environ, "NEGSPACE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("NEGSPACE_API_TOKEN", None)
    return subprocess.Popen(
        [sys.executable, "-m", "negspace_orchestrator", "--port", str(port), "--db", str(db),
         "--node-url", node_url, "--controller-url", controller_url, "--retry-backoff-s", "0.05",
         "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_orchestrator_killed_mid_run_resumes_without_loss_or_duplicates(tmp_path):
    log = CallLog()
    node, controller = MockNode(log, delay=0.15), MockController(log)
    db = tmp_path / "orch.db"
    with ThreadServer(node.app) as ns, ThreadServer(controller.app) as cs:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start_orchestrator(port, db, ns.url, cs.url, tmp_path)
        try:
            await wait_healthy(url, proc, describe=lambda: proc.stderr.read().decode()[-2000:], poll_s=0.1)
            async with OrchestratorClient(url) as client:
                rid = (await client.runs.create(cfg(nodes=3, rounds=4))).id
                while (await client.runs.get(rid)).progress.accepted < 5:
                    await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            gens_before = len(node.requests)
            await asyncio.sleep(0.3)  # in-flight generations finish on the node, unseen

            proc = _start_orchestrator(port, db, ns.url, cs.url, tmp_path)
            await wait_healthy(url, proc, describe=lambda: proc.stderr.read().decode()[-2000:], poll_s=0.1)
            async with OrchestratorClient(url) as client:
                deadline = time.monotonic() + 60
                while (run := await client.runs.get(rid)).status != "completed":
                    assert run.status in ("queued", "running"), run
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                insts = await client.runs.instructions(rid)
                # the persisted event log spans both processes; over real HTTP the stream ends at the end
                events = [e async for e in client.runs.events(rid)]
        finally:
            proc.kill()
            proc.wait(timeout=10)

    assert run.progress.accepted == 15 and len(insts) == 15
    assert len({(i.node, i.round) for i in insts}) == 15
    points = controller.collections[f"negspace-{rid}"]
    assert sorted(points) == sorted(i.id for i in insts)
    assert sorted(t for t, _, _ in points.values()) == sorted(i.text for i in insts)
    # nothing generated was lost: every generation whose answer was stored was never asked again;
    # only the (at most 3) generations in flight at the kill were repeated, with the same seed
    seeds = Counter(r.seed for r in node.requests)
    repeated = [s for s, c in seeds.items() if c > 1]
    assert len(repeated) <= 3
    assert len(node.requests) - gens_before <= 15 - 5 + 3
    statuses = [e.data["status"] for e in events if e.type == "status"]
    assert statuses[:2] == ["queued", "running"] and statuses[-2:] == ["running", "completed"]
    assert sum(e.type == "round" for e in events) == 5
    assert len({(e.data["node"], e.data["round"]) for e in events
                if e.type == "attempt" and e.data["accepted"]}) == 15


async def test_a_dependency_refusing_the_request_fails_the_run_with_its_message(make_harness):
    async with make_harness() as h:
        h.nodes[0].reject_with = "max_tokens + prompt exceed the context (1024)"
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=1))).id
        run = await h.wait(rid)
        assert run.status == "failed"
        assert run.error == "node refused the request (400): max_tokens + prompt exceed the context (1024)"
        assert h.nodes[0].rejected == 1  # a 4xx is not retried


async def test_baseline_paused_by_a_node_outage_resumes_without_duplicates(make_harness):
    async with make_harness(node_delay=0.01, health_interval_s=0.05) as h:
        rid = (await h.client.runs.create(RunConfig(base_instruction="x", mode="baseline", size=12, nodes=3))).id
        while (await h.client.runs.get(rid)).progress.accepted < 3:
            await asyncio.sleep(0.005)
        h.nodes[0].down = True
        run = await h.wait(rid, statuses=("paused",))
        assert "node" in run.error
        h.nodes[0].down = False
        assert (await h.wait(rid)).status == "completed"
        await assert_complete_and_unique(h, rid, 12)


async def test_qa_with_the_nodes_down_is_a_503_and_continues_later(make_harness):
    from negspace_contracts.errors import ServiceUnavailableError

    async with make_harness() as h:
        rid = (await h.client.runs.create(cfg(nodes=1, rounds=1))).id
        await h.wait(rid)
        h.nodes[0].down = True
        try:
            await h.client.runs.qa(rid)
            raise AssertionError("expected a 503")
        except ServiceUnavailableError as exc:
            assert "node unavailable" in exc.message and "POST /qa again" in exc.message
        h.nodes[0].down = False
        result = await h.client.runs.qa(rid)
        assert result.total == 2 and result.converted + result.rejected == 2


def _never_awaited(records) -> list[str]:
    return [str(w.message) for w in records
            if issubclass(w.category, RuntimeWarning) and "never awaited" in str(w.message)]


async def test_sequential_rounds_leave_no_coroutine_unawaited_on_failure_or_cancel(make_harness):
    """A sequential round used to create every slot's coroutine up front and await them in turn:
    a failure or a cancel left the rest never awaited (RuntimeWarning at garbage collection)."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        async with make_harness(round_mode="sequential", node_delay=0.05) as h:
            h.nodes[0].reject_with = "prompt too long"  # a 4xx: the run fails in slot (0, 0)
            failed = (await h.client.runs.create(cfg(nodes=4, rounds=1))).id
            assert (await h.wait(failed)).status == "failed"
            h.nodes[0].reject_with = None
            cancelled = (await h.client.runs.create(cfg(nodes=4, rounds=1))).id
            await h.wait(cancelled, statuses=("running",))
            await asyncio.sleep(0.02)  # inside the first slot's generation
            await h.client.runs.cancel(cancelled)
        gc.collect()
    assert _never_awaited(records) == []
