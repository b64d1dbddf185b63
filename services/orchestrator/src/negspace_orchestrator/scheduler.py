"""The run scheduler: driver slots, the queue, each run's lifecycle (status, pause, resume) and its ETA."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from negspace_contracts.errors import NegspaceError, RateLimitError
from negspace_contracts.orchestrator import Run, RunConfig, RunProgress

from negspace_orchestrator.dependencies import Dependencies, DependencyDown
from negspace_orchestrator.events import EventLog, Room
from negspace_orchestrator.rounds import Rounds, RunFailed
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.store import RunRow, Store

log = logging.getLogger("negspace.orchestrator")

DEFAULT_RETRY_AFTER_S = 30.0  # the 429's Retry-After when no active run has an ETA yet


def collection_name(run_id: str) -> str:
    return f"negspace-{run_id}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class Scheduler(Room):
    """Owns the driver tasks and the queue.

    At most ``--max-active-runs`` drivers are live. A run is ``running`` from the moment its driver
    gets a slot, so ``queued`` always means waiting for one; queued runs start in creation order
    whenever a driver ends (completed, failed, cancelled or paused: a paused run gives its slot
    back, and comes back through the queue when it is resumed).

    While a dependency is down (a run paused on ``DependencyDown``) no queued run is started: it
    would only pause in turn. The health loop lifts that once the node and the controller answer
    (and resumes the paused runs); a resume by request lifts it at once.
    """

    def __init__(self, settings: OrchestratorSettings, store: Store, deps: Dependencies, events: EventLog,
                 rounds: Rounds) -> None:
        super().__init__(settings, store, deps, events)
        self.rounds = rounds
        self.tasks: dict[str, asyncio.Task] = {}
        self._health_task: asyncio.Task | None = None
        self._stopping = False
        self.waiting_for: str | None = None  # why queued runs are held back (a dependency is down)
        # per live driver: (monotonic start, instructions accepted then), for the ETA's observed pace
        self._pace: dict[str, tuple[float, int]] = {}

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume the runs that were running when the service stopped (they keep their slots, up to
        ``--max-active-runs``; any beyond go back to the queue) and start queued runs in creation order."""
        self._stopping = False
        for i, run in enumerate(self.store.list_runs("running")):
            if i < self.settings.max_active_runs:
                log.info("resuming run %s", run.id)
                self._start_driver(run.id)
            else:
                log.info("run %s waits for a slot (--max-active-runs %d)", run.id, self.settings.max_active_runs)
                self.events.set_status(run.id, "queued", reason="restarted with all --max-active-runs slots taken")
        self._schedule()
        self._health_task = asyncio.create_task(self._health_loop(), name="health-loop")

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self.tasks.values())
        if self._health_task:
            tasks.append(self._health_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    # ---- runs --------------------------------------------------------------------------------
    def create(self, config: RunConfig, target: int) -> RunRow:
        """Store a new run (``queued``) and start it if a slot is free; 429 when the queue is full."""
        queued = self.store.count_status("queued")
        if queued >= self.settings.max_queued_runs:
            raise RateLimitError(
                f"{queued} runs are already waiting for a slot (--max-queued-runs "
                f"{self.settings.max_queued_runs}, --max-active-runs {self.settings.max_active_runs}); "
                "retry after the Retry-After seconds, or cancel queued runs", retry_after=self.retry_after_s())
        run_id = new_run_id()
        self.store.create_run(run_id, config, target, collection_name(run_id))
        self._schedule()
        return self.store.get_run(run_id)  # type: ignore[return-value]

    def retry_after_s(self) -> float:
        """When a slot is likely to free: the smallest ETA of the running runs (1 s .. 10 min)."""
        etas = [e for r in self.store.list_runs("running")
                if (e := self.progress(r).eta_seconds) is not None]
        return min(600.0, max(1.0, min(etas))) if etas else DEFAULT_RETRY_AFTER_S

    def live(self, run_id: str) -> bool:
        task = self.tasks.get(run_id)
        return task is not None and not task.done()

    def _schedule(self) -> None:
        """Give free slots to queued runs, first created first (a queued run whose previous driver is
        still ending waits for it)."""
        if self._stopping or self.waiting_for is not None:
            return
        free = self.settings.max_active_runs - sum(1 for t in self.tasks.values() if not t.done())
        if free <= 0:
            return
        for run in self.store.list_runs("queued", limit=free + len(self.tasks)):
            if free <= 0:
                break
            if self.live(run.id):
                continue
            self._start_driver(run.id)
            free -= 1

    def _start_driver(self, run_id: str) -> None:
        self.events.set_status(run_id, "running")
        self._pace[run_id] = (time.monotonic(), self.store.counts(run_id)[0])
        task = asyncio.create_task(self._drive(run_id), name=f"run-{run_id}")
        self.tasks[run_id] = task
        task.add_done_callback(lambda t, rid=run_id: self._driver_done(rid, t))

    def _driver_done(self, run_id: str, task: asyncio.Task) -> None:
        if self.tasks.get(run_id) is task:
            del self.tasks[run_id]
            self._pace.pop(run_id, None)
        self._schedule()  # the slot is free: the next queued run starts

    async def cancel(self, run_id: str) -> None:
        self.events.set_status(run_id, "cancelled", error="cancelled by request")
        task = self.tasks.get(run_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def resume(self, run_id: str, reason: str = "resumed by request", *, by_request: bool = True) -> None:
        """Back to the queue; it starts when it is the oldest queued run and a slot is free. A
        resume by request also lifts the hold on queued runs (the operator says: try now)."""
        if by_request:
            self.waiting_for = None
        self.events.set_status(run_id, "queued", reason=reason)
        self._schedule()

    def progress(self, run: RunRow) -> RunProgress:
        accepted, attempts, latency, slots = self.store.counts(run.id)
        eta: float | None = None
        if run.status == "completed":
            eta = 0.0
        elif run.status in ("queued", "running") and slots > 0:
            remaining = max(0, run.target - accepted)
            nodes = max(1, run.config.nodes)
            started = self._pace.get(run.id) if run.status == "running" else None
            pace = None
            if started is not None and accepted - started[1] >= min(run.target, nodes):
                # The pace the run keeps now: seconds per accepted instruction over its last few
                # rounds' worth of slots. It counts everything a slot waits on (node, controller,
                # retries), where the node's latency alone misses the controller's share (at scale
                # an ETA 50x short), and follows a run that slows as its collection grows.
                pace = self.store.recent_pace(run.id, min(accepted - started[1], 4 * nodes))
            if pace is not None:
                eta = round(remaining * pace, 1)
            else:  # before a round's worth of progress: the node's latency per slot
                per_slot = latency / slots
                sequential = (run.config.round_mode or self.settings.round_mode) == "sequential"
                parallel = 1 if (sequential and run.mode == "guided") else max(1, run.config.nodes)
                eta = round(remaining * per_slot / parallel, 1)
        rounds = run.config.rounds if run.mode == "guided" else -(-run.target // max(1, run.config.nodes)) - 1
        return RunProgress(round=run.round, rounds=rounds, accepted=accepted, attempts=attempts,
                           target=run.target, eta_seconds=eta)

    def to_wire(self, run: RunRow) -> Run:
        return Run(id=run.id, status=run.status, mode=run.mode, config=run.config,  # type: ignore[arg-type]
                   progress=self.progress(run), error=run.error, created_at=run.created,
                   updated_at=run.updated, collection=run.collection, train_job_id=run.train_job_id)

    # ---- the driver --------------------------------------------------------------------------
    async def _drive(self, run_id: str) -> None:
        run = self.store.get_run(run_id)
        if run is None or run.status != "running":  # cancelled between getting its slot and here
            return
        try:
            await self.rounds.run(run)
        except asyncio.CancelledError:
            raise  # cancel() already wrote "cancelled"; a shutdown leaves "running" to resume on start
        except DependencyDown as exc:
            if self._still_running(run_id):
                log.warning("run %s paused: %s", run_id, exc)
                if self.waiting_for is None:
                    log.warning("queued runs wait until the dependencies answer again")
                self.waiting_for = str(exc)
                self.events.set_status(run_id, "paused", error=str(exc), paused_reason=str(exc))
            return
        except (RunFailed, NegspaceError) as exc:
            if self._still_running(run_id):
                msg = getattr(exc, "message", None) or str(exc)
                log.warning("run %s failed: %s", run_id, msg)
                self.events.set_status(run_id, "failed", error=msg)
            return
        except Exception as exc:  # a bug: say so in the run instead of leaving it "running"
            log.exception("run %s crashed", run_id)
            if self._still_running(run_id):
                self.events.set_status(run_id, "failed", error=f"internal error: {exc!r}")
            return
        if self._still_running(run_id):
            accepted, attempts, _, _ = self.store.counts(run_id)
            self.events.set_status(run_id, "completed", accepted=accepted, attempts=attempts)

    def _still_running(self, run_id: str) -> bool:
        run = self.store.get_run(run_id)
        return run is not None and run.status == "running"

    # ---- dependencies coming back ------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.resume_paused_if_healthy()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health loop")

    async def resume_paused_if_healthy(self) -> bool:
        paused = self.store.list_runs("paused")
        if not paused and self.waiting_for is None:
            return False
        health = await self.deps.check()
        if health.get("node") != "ok" or health.get("controller") != "ok":
            return False
        if self.waiting_for is not None:
            log.info("dependencies are back: queued runs start again")
            self.waiting_for = None
        for run in paused:
            log.info("dependencies are back: resuming run %s", run.id)
            self.resume(run.id, reason="dependencies are back", by_request=False)
        self._schedule()
        return True
