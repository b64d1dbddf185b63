"""Acceptance 1: one real tiny job on the bundled model (LoRA, the records pushed inline as the
orchestrator sends them, eval tuned + base);
and a real job that survives a trainer crash."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from negspace_contracts.trainer import JobRequest
from negspace_trainer.local_tasks import TASKS_DIR

pytestmark = pytest.mark.slow


def _records() -> list[dict]:
    rows = [json.loads(line) for line in (TASKS_DIR / "negspace_arith" / "test.jsonl").read_text().splitlines()]
    return [{"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": f"The answer is {r['answer']}."}]} for r in rows[:24]]


async def test_real_tiny_job(service, wait_job):
    svc = await service()
    created = await svc.client.jobs.create(JobRequest.model_validate({
        "dataset": {"records": _records()},  # pushed inline, as POST /runs/{id}/train does
        "training": {"max_steps": 3, "batch_size": 4, "max_length": 128},
        "eval": {"tasks": ["negspace_arith"], "limit": 4, "batch_size": 4},
        "compare_base": True}))
    job = await wait_job(svc.client, created.id, {"succeeded", "failed", "cancelled"}, timeout=900)
    assert job.status == "succeeded", (job.error, await svc.client.jobs.logs(created.id))
    assert job.progress.step == 3 and job.progress.total_steps == 3
    assert len(job.losses) == 3 and all(p.loss > 0 for p in job.losses)
    for which in ("tuned", "base"):
        scores = getattr(job.eval, which)["negspace_arith"]
        value = scores["exact_match,first-number"]
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    arts = await svc.client.jobs.artifacts(created.id)
    names = {a.name for a in arts.artifacts}
    assert "metrics.json" in names and "adapter/adapter_model.safetensors" in names
    # LoRA's B matrices start at zero (PEFT's init): training must have moved them.
    from safetensors.torch import load_file

    weights = load_file(str(Path(arts.root) / "adapter" / "adapter_model.safetensors"))
    b = [t for k, t in weights.items() if "lora_B" in k]
    assert b and any(t.abs().sum() > 0 for t in b)
    metrics = json.loads((Path(arts.root) / "metrics.json").read_text())
    assert metrics["train_tokens"] > 0 and metrics["peak_rss_mb"] > 0
    assert "step 3/3" in await svc.client.jobs.logs(created.id)


def _stat(path: Path) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first), or None once it is gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


async def test_real_job_survives_a_trainer_crash(service, wait_job, wait_training):
    """The trainer dies mid-training (its job loop gone without a shutdown, its real worker left
    running): a new trainer on the same workdir ends that worker and runs the job again, to
    success, as attempt 2, with one job in its list."""
    first = await service()
    created = await first.client.jobs.create(JobRequest.model_validate({
        "dataset": {"records": _records()[:8]},
        "training": {"max_steps": 3, "batch_size": 2, "max_length": 64}}))
    await wait_training(first.client, created.id)
    pid = first.runner.store.row(created.id)["pid"]
    state = Path(f"/proc/{pid}/stat")
    started = _stat(state)[19]  # the process's start time: tells it from a later process given its pid
    first.runner._task.cancel()  # the "crash": nothing records the job's outcome, the worker lives on
    await asyncio.sleep(0.1)
    os.killpg(pid, 0)  # still training
    second = await service()
    # the orphaned worker was ended before the job ran again (here it is this process's child,
    # so it may linger as a zombie until asyncio reaps it; a real orphan is reaped by init)
    # (pids wrap at 32768 here, so a new process may have its pid by now: compare start times)
    now = _stat(state)
    assert now is None or now[19] != started or now[0] == "Z", now
    job = await wait_job(second.client, created.id, {"succeeded", "failed", "cancelled"}, timeout=600)
    assert (job.status, job.attempt, job.progress.step) == ("succeeded", 2, 3), job.error
    assert [p.step for p in job.losses] == [1, 2, 3]  # the second attempt's, from scratch
    assert [j.id for j in (await second.client.jobs.list()).jobs] == [created.id]
    log = await second.client.jobs.logs(created.id)
    assert "attempt 1 of 3 interrupted" in log and "attempt 2 of 3 starting" in log
