"""Progress of long operations, as tqdm bars: a run's generation (server-sent events), a Q/A
conversion (the run's ``qa`` events, polled while the conversion request is in flight) and a
training job (polled)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from negspace_contracts.errors import NegspaceError, is_retryable
from negspace_contracts.orchestrator import (
    TERMINAL_RUN_STATUSES,
    AttemptEvent,
    OrchestratorClient,
    QAEvent,
    RoundEvent,
    Run,
    RunEvent,
    StatusEvent,
)
from negspace_contracts.trainer import TERMINAL_JOB_STATUSES, Job
from tqdm.auto import tqdm

T = TypeVar("T")


class OutageBudget:
    """How long a caller keeps retrying a service that went away: ``failed(exc)`` re-raises an
    error waiting cannot fix, or one that has lasted more than ``outage_s`` in a row; ``ok()``
    starts the count again."""

    def __init__(self, outage_s: float) -> None:
        self.outage_s = outage_s
        self.down_since: float | None = None

    def failed(self, exc: NegspaceError) -> None:
        if not is_retryable(exc):
            raise exc
        now = asyncio.get_running_loop().time()
        self.down_since = now if self.down_since is None else self.down_since
        if now - self.down_since > self.outage_s:
            raise exc

    def ok(self) -> None:
        self.down_since = None


def make_bar(total: int | None, desc: str, unit: str, position: int | None = None, disable: bool = False):
    return tqdm(total=total, desc=desc, unit=unit, position=position, leave=True, dynamic_ncols=True,
                file=sys.stderr, disable=disable)


async def follow_run(client: OrchestratorClient, run_id: str, *, desc: str | None = None,
                     events: list[RunEvent] | None = None, position: int | None = None,
                     quiet: bool = False, reconnects: int = 20) -> Run:
    """Follow a run's events until it ends; one bar step per accepted instruction.

    ``events`` (when given) collects every event seen. Dropped streams are resumed with
    ``after=<last seq>``, so nothing is missed or counted twice.
    """
    run = await client.runs.get(run_id)
    target = run.progress.target or run.config.nodes * (run.config.rounds + 1)
    bar = make_bar(target, desc or f"{run.mode} {run_id}", "instr", position, quiet)
    accepted: set[tuple[int, int]] = set()
    bar.update(run.progress.accepted)
    last_seq = 0
    tries = 0
    try:
        while True:
            try:
                async for ev in client.runs.events(run_id, after=last_seq):
                    tries = 0
                    last_seq = max(last_seq, ev.seq)
                    if events is not None:
                        events.append(ev)
                    if isinstance(ev, AttemptEvent) and ev.data.accepted:
                        key = (ev.data.node, ev.data.round)
                        if key not in accepted:
                            accepted.add(key)
                            if bar.n < len(accepted):
                                bar.update(len(accepted) - bar.n)
                        bar.set_postfix(round=ev.data.round, scale=ev.data.scale, refresh=False)
                    elif isinstance(ev, RoundEvent):
                        bar.set_postfix(round=f"{ev.data.round}/{ev.data.rounds}", refresh=False)
                        if ev.data.accepted > bar.n:
                            bar.update(ev.data.accepted - bar.n)
                    elif isinstance(ev, StatusEvent):
                        bar.set_postfix(status=ev.data.status, refresh=True)
                        if ev.data.status == "paused":
                            bar.write(f"{run_id}: paused: {ev.data.error or ev.data.reason or ''}")
                break
            except NegspaceError as exc:
                tries += 1
                if not is_retryable(exc) or tries > reconnects:
                    raise
                await asyncio.sleep(min(5.0, 0.5 * tries))
        run = await client.runs.get(run_id)
        if run.status not in TERMINAL_RUN_STATUSES:  # stream ended early: poll until it ends
            while run.status not in TERMINAL_RUN_STATUSES:
                await asyncio.sleep(1.0)
                run = await client.runs.get(run_id)
        if run.progress.accepted > bar.n:
            bar.update(run.progress.accepted - bar.n)
        bar.set_postfix(status=run.status, refresh=True)
        return run
    finally:
        bar.close()


async def with_qa_progress(client: OrchestratorClient, run_id: str, work: Awaitable[T], *, total: int,
                           desc: str, position: int | None = None, quiet: bool = False,
                           poll_s: float = 1.0) -> T:
    """Await ``work`` (the Q/A request) while a bar follows the run's ``qa`` events.

    The event stream of a finished run ends at once, so it is read again every ``poll_s``."""
    bar = make_bar(total, desc, "pair", position, quiet)
    last_seq = 0
    with contextlib.suppress(NegspaceError):  # start after the events that existed before
        async for ev in client.runs.events(run_id):
            last_seq = max(last_seq, ev.seq)
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            with contextlib.suppress(NegspaceError):
                async for ev in client.runs.events(run_id, after=last_seq):
                    last_seq = max(last_seq, ev.seq)
                    if isinstance(ev, QAEvent):
                        if ev.data.total:
                            bar.total = ev.data.total
                        if ev.data.done > bar.n:
                            bar.update(ev.data.done - bar.n)
                        bar.set_postfix(converted=ev.data.converted, rejected=ev.data.rejected, refresh=False)
            if done:
                result = task.result()
                if bar.total and bar.n < bar.total:
                    bar.update(bar.total - bar.n)
                return result
    finally:
        if not task.done():
            task.cancel()
        bar.close()


async def follow_jobs(get_job, keys: list[str], *, desc: dict[str, str] | None = None,
                      quiet: bool = False, poll_s: float = 2.0, timeout_s: float | None = None,
                      outage_s: float = 600.0) -> dict[str, Job]:
    """Poll training jobs (``await get_job(key) -> Job``) until all end; one bar per job (steps).

    A retryable error (the orchestrator or the trainer restarting: connection refused, 503) is
    shown on the bar and polled through for up to ``outage_s`` in a row; then it is raised."""
    bars = {k: make_bar(None, (desc or {}).get(k, k), "step", i, quiet) for i, k in enumerate(keys)}
    jobs: dict[str, Job] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()
    budget = OutageBudget(outage_s)
    try:
        while True:
            for k in keys:
                if k in jobs and jobs[k].status in TERMINAL_JOB_STATUSES:
                    continue
                try:
                    job: Job = await get_job(k)
                except NegspaceError as exc:
                    budget.failed(exc)
                    bars[k].set_postfix(waiting=exc.message[:60], refresh=True)
                    break
                budget.ok()
                jobs[k] = job
                b = bars[k]
                if job.progress.total_steps and b.total != job.progress.total_steps:
                    b.total = job.progress.total_steps
                if job.progress.step > b.n:
                    b.update(job.progress.step - b.n)
                post: dict[str, Any] = {"status": job.status}
                if job.progress.stage:
                    post["stage"] = job.progress.stage
                if job.losses:
                    post["loss"] = f"{job.losses[-1].loss:.3f}"
                b.set_postfix(post, refresh=True)
            if len(jobs) == len(keys) and all(jobs[k].status in TERMINAL_JOB_STATUSES for k in keys):
                return jobs
            if timeout_s is not None and loop.time() - start > timeout_s:
                raise TimeoutError(f"training jobs not finished after {timeout_s:.0f}s: "
                                   + ", ".join(f"{k}={jobs[k].status if k in jobs else '?'}" for k in keys))
            await asyncio.sleep(poll_s)
    finally:
        for b in bars.values():
            b.close()
