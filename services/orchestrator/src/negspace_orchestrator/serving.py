"""The orchestrator's rules behind the routes: one ``Orchestrator`` that wires the rooms and answers
the requests (runs, metrics, event streams, Q/A, exports, training)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from negspace_contracts.controller import CollectionComparison, MetricsRequest, MetricsResponse
from negspace_contracts.errors import BadRequestError, ConflictError, NotFoundError, ServiceUnavailableError
from negspace_contracts.orchestrator import (
    TERMINAL_RUN_STATUSES,
    ExportRequest,
    ExportResult,
    Instruction,
    QARequest,
    QAResult,
    RoundPoint,
    Run,
    RunComparison,
    RunConfig,
    RunDiversity,
    RunList,
    RunStatus,
    TrainRequest,
)
from negspace_contracts.trainer import ChatRecord, Job

from negspace_orchestrator.dependencies import Dependencies
from negspace_orchestrator.errors import DependencyDown
from negspace_orchestrator.events import EventLog
from negspace_orchestrator.export import Exports
from negspace_orchestrator.qa import QAConverter
from negspace_orchestrator.rounds import Rounds, target_for
from negspace_orchestrator.scheduler import Scheduler
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.store import RunRow, Store
from negspace_orchestrator.training import Training

KEEPALIVE_S = 15.0  # a comment line on an idle event stream, so proxies keep it open

Batches = Callable[[int], Iterator[list]]  # rows ``n`` at a time, read from the store as they are streamed


class Orchestrator:
    """The rooms of one orchestrator: ``scheduler`` (slots, queue, lifecycle), ``rounds`` (the
    algorithms), ``training`` (hand-off, job tracking), ``qa`` and ``exports``; ``events`` and
    ``store`` are shared by all of them."""

    def __init__(self, settings: OrchestratorSettings, store: Store, deps: Dependencies) -> None:
        self.settings = settings
        self.store = store
        self.deps = deps
        self.events = EventLog(store)
        self.rounds = Rounds(settings, store, deps, self.events)
        self.scheduler = Scheduler(settings, store, deps, self.events, self.rounds)
        self.training = Training(settings, store, deps, self.events)
        self.qa = QAConverter(store, self.events, deps.generate, exports_dir=settings.exports_dir,
                              concurrency=settings.qa_concurrency)
        self.exports = Exports(store, deps, lambda run_id: self.metrics(run_id, MetricsRequest()),
                               exports_dir=settings.exports_dir)

    async def start(self) -> None:
        await self.scheduler.start()
        self.training.start()

    async def stop(self) -> None:
        await asyncio.gather(self.scheduler.stop(), self.training.stop())

    # ---- runs --------------------------------------------------------------------------------
    def run_or_404(self, run_id: str) -> RunRow:
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"no run with id {run_id!r} (GET /runs lists them)", param="run_id")
        return run

    def get_run(self, run_id: str) -> Run:
        return self.scheduler.to_wire(self.run_or_404(run_id))

    def create_run(self, config: RunConfig) -> RunRow:
        return self.scheduler.create(config, target_for(self.store, config))

    def list_runs(self, status: RunStatus | None, limit: int, after: str | None) -> RunList:
        """A page of runs in creation order after the run ``after``."""
        cursor = None
        if after is not None:
            cursor = self.store.get_run(after)
            if cursor is None:
                raise BadRequestError(f"after={after!r} is not a run id; pass the next_after of the previous page "
                                      "(or leave it out for the first page)", param="after")
        rows = self.store.list_runs(status, limit=limit + 1, after=cursor)
        page = rows[:limit]
        return RunList(runs=[self.scheduler.to_wire(r) for r in page],
                       next_after=page[-1].id if len(rows) > limit else None)

    async def cancel(self, run_id: str) -> Run:
        run = self.run_or_404(run_id)
        if run.status in ("completed", "failed"):
            raise ConflictError(f"run {run_id} already ended ({run.status}); nothing to cancel")
        if run.status != "cancelled":
            await self.scheduler.cancel(run_id)
        return self.get_run(run_id)

    def resume(self, run_id: str) -> Run:
        run = self.run_or_404(run_id)
        if run.status in ("completed", "cancelled"):
            raise ConflictError(f"run {run_id} is {run.status}; only paused or failed runs can be resumed")
        if run.status in ("paused", "failed"):
            self.scheduler.check_controller(run)
            self.scheduler.resume(run_id)
        return self.get_run(run_id)

    def instructions(self, run_id: str) -> Batches:
        """The run's accepted instructions in batches (404 now, the rows as they are streamed)."""
        self.run_or_404(run_id)

        def batches(n: int) -> Iterator[list[Instruction]]:
            return self.store.iter_instructions(run_id, n)

        return batches

    async def metrics(self, run_id: str, request: MetricsRequest) -> MetricsResponse:
        """Diversity metrics of the run's accepted instructions (its own controller collection)."""
        run = self.run_or_404(run_id)
        if self.store.counts(run_id)[0] == 0:
            raise ConflictError(f"run {run_id} has no accepted instructions yet; metrics need at least one")
        try:
            return await self.deps.controller_call(
                run.controller, "metrics", lambda c: c.collections.metrics(run.collection, request))
        except DependencyDown as exc:
            raise ServiceUnavailableError(str(exc)) from exc

    async def compare(self, run_id: str, other: str) -> RunComparison:
        """Both runs measured by the controller on one PCA basis fitted on their union, per run and
        per round, with the 2-D map (the controller's ``POST /compare`` on their collections)."""
        runs = [self.run_or_404(run_id), self.store.get_run(other)]
        if runs[1] is None:
            raise NotFoundError(f"with={other!r} is not a run id (GET /runs lists them)", param="with")
        for run in runs:
            if self.store.counts(run.id)[0] == 0:
                raise ConflictError(f"run {run.id} has no accepted instructions yet; a comparison needs at least one")
        a, b = runs
        if a.controller != b.controller:  # the controller fits one basis on both collections: one replica
            raise ConflictError(
                f"runs {a.id} and {b.id} live on different controller replicas ({a.controller} and "
                f"{b.controller}), and a comparison fits one PCA basis on both collections inside one "
                f"controller; make the run to compare on the same replica: a baseline with "
                f"match_run={a.id}, or any run with colocate_with={a.id}", param="with")
        try:
            got = await self.deps.controller_call(
                a.controller, "compare", lambda c: c.compare(a.collection, b.collection, group_by="round"))
        except DependencyDown as exc:
            raise ServiceUnavailableError(str(exc)) from exc

        def side(run: RunRow, c: CollectionComparison) -> RunDiversity:
            return RunDiversity(run_id=run.id, metrics=c.metrics,
                                per_round={int(k): m for k, m in c.groups.items() if k.lstrip("-").isdigit()},
                                points=[RoundPoint(x=p.x, y=p.y, round=p.group if isinstance(p.group, int) else None)
                                        for p in c.points])

        return RunComparison(run=side(runs[0], got.a), other=side(runs[1], got.b), pca_basis=got.pca_basis,
                             notes=got.notes)

    # ---- Q/A, exports, training ----------------------------------------------------------------
    async def convert_qa(self, run_id: str, request: QARequest) -> QAResult:
        return await self.qa.convert(self.run_or_404(run_id), request)

    def qa_records(self, run_id: str) -> Batches:
        """The run's Q/A records in batches (404 and 409 now, the records as they are streamed)."""
        self.run_or_404(run_id)
        if not self.store.has_qa_records(run_id):
            raise ConflictError(f"run {run_id} has no Q/A records: POST /runs/{run_id}/qa first")

        def batches(n: int) -> Iterator[list[ChatRecord]]:
            return self.store.iter_qa_records(run_id, n)

        return batches

    async def export(self, run_id: str, request: ExportRequest) -> ExportResult:
        return await self.exports.to_folder(self.run_or_404(run_id), request)

    async def export_archive(self, run_id: str, fmt: str, license: str) -> tuple[Path, tempfile.TemporaryDirectory]:
        return await self.exports.to_archive(self.run_or_404(run_id), fmt, license)

    async def train(self, run_id: str, request: TrainRequest | None, seed: int | None) -> Job:
        seen = self.run_or_404(run_id).train_job_id  # the run's job when the request came (see Training.train)
        return await self.training.train(run_id, request, seed, seen)

    async def train_status(self, run_id: str, seed: int | None) -> Job:
        self.run_or_404(run_id)
        return await self.training.status(run_id, seed)

    async def event_stream(self, run_id: str, after: int) -> AsyncIterator[str]:
        """Server-sent events after ``after`` until the run ended and every event was sent."""
        seq = after
        while True:
            waiter = self.events.waiter(run_id)
            run = self.store.get_run(run_id)
            batch = self.store.events_after(run_id, seq)
            for ev in batch:
                seq = ev.seq
                yield f"id: {ev.seq}\nevent: {ev.type}\ndata: {ev.model_dump_json()}\n\n"
            if batch:
                continue
            if run is None or run.status in TERMINAL_RUN_STATUSES:
                return
            try:
                await asyncio.wait_for(waiter.wait(), timeout=KEEPALIVE_S)
            except TimeoutError:
                yield ": keepalive\n\n"

    async def health(self) -> dict:
        """What ``/health`` reports beyond the status: runs per status, dependencies, limits."""
        per_controller = self.store.controller_counts()
        return dict(runs=self.store.status_counts(), dependencies=await self.deps.check(),
                    runs_per_controller={u: n for u, n in per_controller.items() if u is not None},
                    runs_on_unconfigured_controllers={u: n for u, n in per_controller.items()
                                                      if u is not None and u not in self.deps.controllers},
                    round_mode=self.settings.round_mode, db=str(self.settings.db_path),
                    max_active_runs=self.settings.max_active_runs, max_queued_runs=self.settings.max_queued_runs,
                    queued_runs_held_because=self.scheduler.waiting_for)
