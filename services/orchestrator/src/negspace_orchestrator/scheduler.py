"""The run scheduler: driver slots, the queue, each run's lifecycle (status, pause, resume), its ETA,
and where each run's collection lives (its controller replica, chosen once at creation)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from negspace_contracts.errors import BadRequestError, ConflictError, NegspaceError, RateLimitError
from negspace_contracts.orchestrator import Run, RunConfig, RunProgress

from negspace_orchestrator.dependencies import Dependencies, not_configured
from negspace_orchestrator.errors import DependencyDown, RunFailed
from negspace_orchestrator.events import EventLog
from negspace_orchestrator.rounds import Rounds
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.shared import SharedState
from negspace_orchestrator.store import RunRow, Store

log = logging.getLogger("negspace.orchestrator")

DEFAULT_RETRY_AFTER_S = 30.0  # the 429's Retry-After when no active run has an ETA yet


def collection_name(run_id: str) -> str:
    return f"negspace-{run_id}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class Scheduler(SharedState):
    """Owns the driver tasks and the queue.

    At most ``--max-active-runs`` drivers are live. A run is ``running`` from the moment its driver
    gets a slot, so ``queued`` always means waiting for one; queued runs start in creation order
    whenever a driver ends (completed, failed, cancelled or paused: a paused run gives its slot
    back, and comes back through the queue when it is resumed).

    While a dependency is down (a run paused on ``DependencyDown``) no queued run that needs it is
    started: it would only pause in turn. A node outage holds every queued run; a controller
    replica's outage only the runs that live on it. The health loop lifts a hold once that
    dependency answers (and resumes the paused runs whose node and controller answer); a resume by
    request lifts every hold at once.

    Each run lives on one controller replica, chosen when it is created (``route``) and recorded
    in its row: adding a --controller-url never moves a run, and a run whose controller is no
    longer configured is paused with that reason instead of being sent to another replica.
    """

    def __init__(self, settings: OrchestratorSettings, store: Store, deps: Dependencies, events: EventLog,
                 rounds: Rounds) -> None:
        super().__init__(settings, store, deps, events)
        self.rounds = rounds
        self.tasks: dict[str, asyncio.Task] = {}
        self._health_task: asyncio.Task | None = None
        self._stopping = False
        # why queued runs are held back: "node" (every run), a controller URL (the runs on it), or
        # "controller" (none configured: every run)
        self.held: dict[str, str] = {}
        # per live driver: (monotonic start, instructions accepted then), for the ETA's observed pace
        self._pace: dict[str, tuple[float, int]] = {}

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def waiting_for(self) -> str | None:
        """Why queued runs are held back (None: they are not)."""
        return "; ".join(self.held.values()) or None

    async def start(self) -> None:
        """Resume the runs that were running when the service stopped (they keep their slots, up to
        ``--max-active-runs``; any beyond go back to the queue) and start queued runs in creation order.
        Runs whose controller is no longer configured are paused with the reason instead."""
        self._stopping = False
        self._route_unrouted()
        for run in [*self.store.list_runs("running"), *self.store.list_runs("queued")]:
            if run.controller is not None and run.controller not in self.deps.controllers:
                reason = str(DependencyDown(f"controller {run.controller}",
                                            not_configured(run.controller, self.deps.controller_urls)))
                log.warning("run %s paused: %s", run.id, reason)
                self.events.set_status(run.id, "paused", error=reason, paused_reason=reason)
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

    # ---- where runs live ---------------------------------------------------------------------
    def _route_unrouted(self) -> None:
        """Record a controller for the runs that have none: made before runs were routed (when the
        orchestrator had one controller) or while none was configured. With one --controller-url
        they all go to it. With several, a run that never generated anything is placed like a new
        one (beside its family's run when that one has a controller); any other would be a guess
        about where its collection is, so start-up stops and says what to do rather than send its
        calls to a replica that may not hold it."""
        urls = self.deps.controller_urls
        runs = self.store.unrouted_runs()
        if not runs or not urls:
            return
        unknown = []
        for run in runs:
            if len(urls) == 1:
                self.store.set_controller(run.id, urls[0])
            elif self.store.counts(run.id)[1] == 0:
                kin = self.store.get_run(run.config.colocate_with or run.config.match_run or "")
                url = kin.controller if kin is not None and kin.controller in self.deps.controllers else None
                self.store.set_controller(run.id, url or self.deps.route(run.collection))  # type: ignore[arg-type]
            else:
                unknown.append(run.id)
        if unknown:
            raise RuntimeError(
                f"{len(unknown)} runs ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}) were made "
                "before the orchestrator routed runs to controller replicas, so which controller holds their "
                f"collections is not recorded, and {len(urls)} --controller-url are configured. Start once with "
                "only the controller they were made with (each run records it), then add the other replicas.")
        log.info("recorded the controller of %d runs made before routing", len(runs))

    def _family_controller(self, config: RunConfig) -> str | None:
        """A new run's family's controller (``colocate_with``, else a baseline's ``match_run``: the
        runs a comparison pairs must share a replica); None when it has no family."""
        family: list[tuple[str, RunRow]] = []
        for param, rid in (("colocate_with", config.colocate_with), ("match_run", config.match_run)):
            if rid is None:
                continue
            other = self.store.get_run(rid)
            if other is None:
                raise BadRequestError(f"{param} {rid!r} is not a known run id", param=param)
            family.append((param, other))
        if len({r.controller for _, r in family}) > 1:
            (p1, r1), (p2, r2) = family
            raise BadRequestError(f"{p1} run {r1.id} lives on controller {r1.controller} and {p2} run {r2.id} "
                                  f"on {r2.controller}; a run lives on one: give only one of them", param=p1)
        if family:
            param, other = family[0]
            url = other.controller
            if url is not None and url not in self.deps.controllers:
                raise ConflictError(f"{param} run {other.id} lives on controller {url}, which is not among the "
                                    f"configured --controller-url ({', '.join(self.deps.controller_urls) or 'none'}); "
                                    "this run must live there too (to be compared with it): add the URL back, "
                                    "or leave out " + param, param=param)
            return url
        return None

    def check_controller(self, run: RunRow) -> None:
        """409 when the run's controller is no longer configured (a resume would only pause it)."""
        if run.controller is not None and run.controller not in self.deps.controllers:
            raise ConflictError(f"run {run.id} cannot resume: "
                                f"{not_configured(run.controller, self.deps.controller_urls)}")

    # ---- runs --------------------------------------------------------------------------------
    def create(self, config: RunConfig, target: int) -> RunRow:
        """Store a new run (``queued``) and start it if a slot is free; 429 when the queue is full."""
        queued = self.store.count_status("queued")
        if queued >= self.settings.max_queued_runs:
            raise RateLimitError(
                f"{queued} runs are already waiting for a slot (--max-queued-runs "
                f"{self.settings.max_queued_runs}, --max-active-runs {self.settings.max_active_runs}); "
                "retry after the Retry-After seconds, or cancel queued runs", retry_after=self.retry_after_s())
        family = self._family_controller(config)  # before an id is drawn: a refused run leaves no trace
        run_id = new_run_id()
        controller = family or self.deps.route(collection_name(run_id))
        self.store.create_run(run_id, config, target, collection_name(run_id), controller)
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
        if self._stopping or "node" in self.held or "controller" in self.held:
            return
        free = self.settings.max_active_runs - sum(1 for t in self.tasks.values() if not t.done())
        if free <= 0:
            return
        # with a replica held, its runs are skipped: read the whole queue rather than a page
        for run in self.store.list_runs("queued", limit=None if self.held else free + len(self.tasks)):
            if free <= 0:
                break
            if self.live(run.id) or run.controller in self.held:
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
            self.held.clear()
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
                   updated_at=run.updated, collection=run.collection, controller=run.controller,
                   train_job_id=run.train_job_id)

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
                key = exc.controller or ("node" if exc.service == "node" else "controller")
                if key not in self.held:
                    log.warning("queued runs that need %s wait until it answers again", key)
                self.held[key] = str(exc)
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
        """Lift the holds of the dependencies that answer again and resume the paused runs whose node
        and controller both answer (a run on an unconfigured controller waits for a person)."""
        paused = self.store.list_runs("paused")
        if not paused and not self.held:
            return False
        health = await self.deps.check()
        if health.get("node") != "ok":
            return False
        ok = {u for u, state in health.get("controllers", {}).items() if state == "ok"}
        lifted = [k for k in self.held if k == "node" or k in ok]
        for key in lifted:
            log.info("%s is back: queued runs that need it start again", key)
            del self.held[key]
        resumed = 0
        for run in paused:
            if run.controller in ok:
                log.info("dependencies are back: resuming run %s", run.id)
                self.resume(run.id, reason="dependencies are back", by_request=False)
                resumed += 1
        self._schedule()
        return bool(lifted or resumed)
