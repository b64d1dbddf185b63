"""The run driver: guided rounds and baselines as asyncio tasks, resumable from SQLite.

Guided (the reference method):
  round 0 (bootstrap): every logical node samples one augmentation of ``prompt + base``; each is
  stored and added to the controller.
  rounds 1..R, per node: negatives = controller ``dense(k, knn)``; generate with CFG at
  ``guidance.start``; while the controller finds the text similar and retries < ``max_retries``,
  raise the scale by ``step`` and generate again; then store and add the result.
Nodes of a round run concurrently (or one after another with round mode ``sequential``); the
similarity check and the insert happen under one lock per run, so two nodes never both accept
near-duplicates. Every attempt is written the moment its generation returns; a slot that already
has an accepted row is never generated again, and the controller id of a slot's instruction is
derived from (run, node, round), so a replayed insert overwrites instead of duplicating.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import uuid
from collections.abc import Awaitable
from typing import Any

from negspace_contracts.controller import PointIn
from negspace_contracts.errors import ConflictError, NegspaceError, NotFoundError, RateLimitError
from negspace_contracts.node import ChatCompletionRequest, ChatMessage
from negspace_contracts.orchestrator import (
    RunConfig,
    RunProgress,
)
from negspace_contracts.trainer import TERMINAL_JOB_STATUSES

from negspace_orchestrator import prompts
from negspace_orchestrator.services import Dependencies, DependencyDown
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.store import AttemptRow, RunRow, Store, point_id

log = logging.getLogger("negspace.orchestrator")

MAX_EMPTY_OUTPUTS = 5  # empty generations tolerated per slot before the run fails
DEFAULT_RETRY_AFTER_S = 30.0  # the 429's Retry-After when no active run has an ETA yet
LOST_JOB = "lost"  # the train event status of a job the trainer no longer knows


class RunFailed(Exception):
    """A problem that waiting will not fix (the message says what to change)."""


def derive_seed(seed: int, *parts: object) -> int:
    """A per-(node, round, attempt) seed: reproducible, so a lost attempt replays identically."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2  # < 2**62, fits every engine's seed range


def run_target(config: RunConfig) -> int:
    """Instructions a guided run accepts: one per node in the bootstrap and in each round."""
    return config.nodes * (config.rounds + 1)


def collection_name(run_id: str) -> str:
    return f"negspace-{run_id}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class Orchestrator:
    """Owns the driver tasks, the acceptance locks and the event notifications.

    At most ``--max-active-runs`` drivers are live. A run is ``running`` from the moment its driver
    gets a slot, so ``queued`` always means waiting for one; queued runs start in creation order
    whenever a driver ends (completed, failed, cancelled or paused: a paused run gives its slot
    back, and comes back through the queue when it is resumed).

    While a dependency is down (a run paused on ``DependencyDown``) no queued run is started: it
    would only pause in turn. The health loop lifts that once the node and the controller answer
    (and resumes the paused runs); a resume by request lifts it at once.
    """

    def __init__(self, settings: OrchestratorSettings, store: Store, deps: Dependencies) -> None:
        self.settings = settings
        self.store = store
        self.deps = deps
        self.tasks: dict[str, asyncio.Task] = {}
        self._trackers: dict[str, asyncio.Task] = {}
        self._accept_locks: dict[str, asyncio.Lock] = {}
        self._train_locks: dict[str, asyncio.Lock] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._health_task: asyncio.Task | None = None
        self.qa_running: set[str] = set()
        self._stopping = False
        self.waiting_for: str | None = None  # why queued runs are held back (a dependency is down)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume the runs that were running when the service stopped (they keep their slots, up to
        ``--max-active-runs``; any beyond go back to the queue), start queued runs in creation
        order, and follow again every training job that had not ended."""
        self._stopping = False
        for i, run in enumerate(self.store.list_runs("running")):
            if i < self.settings.max_active_runs:
                log.info("resuming run %s", run.id)
                self._start_driver(run.id)
            else:
                log.info("run %s waits for a slot (--max-active-runs %d)", run.id, self.settings.max_active_runs)
                self.set_status(run.id, "queued", reason="restarted with all --max-active-runs slots taken")
        self._schedule()
        self._resume_train_tracking()
        self._health_task = asyncio.create_task(self._health_loop(), name="health-loop")

    async def stop(self) -> None:
        self._stopping = True
        tasks = [*self.tasks.values(), *self._trackers.values()]
        if self._health_task:
            tasks.append(self._health_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        self._trackers.clear()

    # ---- events ------------------------------------------------------------------------------
    def event(self, run_id: str, type_: str, data: dict[str, Any]) -> None:
        self.store.add_event(run_id, type_, data)
        self.notify(run_id)

    def notify(self, run_id: str) -> None:
        ev = self._changed.pop(run_id, None)
        if ev is not None:
            ev.set()

    def waiter(self, run_id: str) -> asyncio.Event:
        return self._changed.setdefault(run_id, asyncio.Event())

    def set_status(self, run_id: str, status: str, **kw: Any) -> None:
        self.store.set_status(run_id, status, **kw)
        self.notify(run_id)

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
        self.set_status(run_id, "running")
        task = asyncio.create_task(self._drive(run_id), name=f"run-{run_id}")
        self.tasks[run_id] = task
        task.add_done_callback(lambda t, rid=run_id: self._driver_done(rid, t))

    def _driver_done(self, run_id: str, task: asyncio.Task) -> None:
        if self.tasks.get(run_id) is task:
            del self.tasks[run_id]
        self._schedule()  # the slot is free: the next queued run starts

    async def cancel(self, run_id: str) -> None:
        self.set_status(run_id, "cancelled", error="cancelled by request")
        task = self.tasks.get(run_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def resume(self, run_id: str, reason: str = "resumed by request", *, by_request: bool = True) -> None:
        """Back to the queue; it starts when it is the oldest queued run and a slot is free. A
        resume by request also lifts the hold on queued runs (the operator says: try now)."""
        if by_request:
            self.waiting_for = None
        self.set_status(run_id, "queued", reason=reason)
        self._schedule()

    def progress(self, run: RunRow) -> RunProgress:
        accepted, attempts, latency, slots = self.store.counts(run.id)
        eta: float | None = None
        if run.status == "completed":
            eta = 0.0
        elif run.status in ("queued", "running") and slots > 0:
            per_slot = latency / slots
            sequential = (run.config.round_mode or self.settings.round_mode) == "sequential"
            parallel = 1 if (sequential and run.mode == "guided") else max(1, run.config.nodes)
            eta = round(max(0, run.target - accepted) * per_slot / parallel, 1)
        rounds = run.config.rounds if run.mode == "guided" else -(-run.target // max(1, run.config.nodes)) - 1
        return RunProgress(round=run.round, rounds=rounds, accepted=accepted, attempts=attempts,
                           target=run.target, eta_seconds=eta)

    # ---- the driver --------------------------------------------------------------------------
    async def _drive(self, run_id: str) -> None:
        run = self.store.get_run(run_id)
        if run is None or run.status != "running":  # cancelled between getting its slot and here
            return
        try:
            await self.deps.controller_call("create collection", lambda c: self._ensure_collection(c, run))
            if run.mode == "guided":
                await self._guided(run)
            else:
                await self._baseline(run)
        except asyncio.CancelledError:
            raise  # cancel() already wrote "cancelled"; a shutdown leaves "running" to resume on start
        except DependencyDown as exc:
            if self._still_running(run_id):
                log.warning("run %s paused: %s", run_id, exc)
                if self.waiting_for is None:
                    log.warning("queued runs wait until the dependencies answer again")
                self.waiting_for = str(exc)
                self.set_status(run_id, "paused", error=str(exc), paused_reason=str(exc))
            return
        except (RunFailed, NegspaceError) as exc:
            if self._still_running(run_id):
                msg = getattr(exc, "message", None) or str(exc)
                log.warning("run %s failed: %s", run_id, msg)
                self.set_status(run_id, "failed", error=msg)
            return
        except Exception as exc:  # a bug: say so in the run instead of leaving it "running"
            log.exception("run %s crashed", run_id)
            if self._still_running(run_id):
                self.set_status(run_id, "failed", error=f"internal error: {exc!r}")
            return
        if self._still_running(run_id):
            accepted, attempts, _, _ = self.store.counts(run_id)
            self.set_status(run_id, "completed", accepted=accepted, attempts=attempts)

    def _still_running(self, run_id: str) -> bool:
        run = self.store.get_run(run_id)
        return run is not None and run.status == "running"

    @staticmethod
    async def _ensure_collection(ctl, run: RunRow) -> None:
        try:
            await ctl.collections.create(run.collection)
        except ConflictError:
            pass  # already there (a resumed run)

    async def _gather(self, coros: list[Awaitable[None]]) -> None:
        """Run slot coroutines together; the first failure cancels the others and is re-raised
        (a dependency outage first, so the run pauses rather than fails)."""
        first: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                for c in coros:
                    tg.create_task(c)
        # Raised after the try, not inside except*: Python < 3.11.4 (Debian bookworm's 3.11.2, the
        # containers' base here) wraps an exception raised in an except* clause in an
        # ExceptionGroup (gh-103590), which the driver took for a crash and failed the run.
        except* DependencyDown as eg:
            first = eg.exceptions[0]
        except* (RunFailed, NegspaceError) as eg:
            first = first or eg.exceptions[0]
        if first is not None:
            raise first from None

    async def _guided(self, run: RunRow) -> None:
        cfg = run.config
        sequential = (cfg.round_mode or self.settings.round_mode) == "sequential"
        for r in range(cfg.rounds + 1):
            self.store.set_round(run.id, r)
            if sequential:  # each slot's coroutine is made only when its turn comes: a failure or a
                for n in range(cfg.nodes):  # cancel leaves none created and never awaited
                    await self._slot(run, n, r)
            else:
                await self._gather([self._slot(run, n, r) for n in range(cfg.nodes)])
            self._check_round(run, r)
            if not self.store.has_round_event(run.id, r):  # once per round, also across restarts
                accepted, attempts, _, _ = self.store.counts(run.id)
                self.event(run.id, "round", {"round": r, "rounds": cfg.rounds, "accepted": accepted,
                                             "attempts": attempts})

    def _check_round(self, run: RunRow, round_: int) -> None:
        missing = [n for n in range(run.config.nodes)
                   if not any(a.accepted and a.inserted for a in self.store.slot_attempts(run.id, n, round_))]
        if missing:  # a slot task ended without accepting: never move on with a hole in the round
            raise RuntimeError(f"round {round_} ended without an instruction for nodes {missing}")

    async def _baseline(self, run: RunRow) -> None:
        cfg = run.config
        nodes = max(1, cfg.nodes)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(run.target):
            queue.put_nowait(i)
        last_round = -1

        async def worker() -> None:
            nonlocal last_round
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                n, r = i % nodes, i // nodes
                await self._slot(run, n, r)
                if r > last_round:
                    last_round = r
                    self.store.set_round(run.id, r)

        await self._gather([worker() for _ in range(min(nodes, run.target) or 1)])

    # ---- one (node, round) slot --------------------------------------------------------------
    def _lock(self, run_id: str) -> asyncio.Lock:
        return self._accept_locks.setdefault(run_id, asyncio.Lock())

    def train_lock(self, run_id: str) -> asyncio.Lock:
        """Serializes a run's training requests (check for an active job, then create one)."""
        return self._train_locks.setdefault(run_id, asyncio.Lock())

    async def _insert(self, run: RunRow, a: AttemptRow, pid: str) -> None:
        point = PointIn(id=uuid.UUID(pid), text=a.text,
                        payload={"run_id": run.id, "mode": run.mode, "node": a.node, "round": a.round,
                                 "attempt": a.attempt})
        await self.deps.controller_call("upsert", lambda c: c.collections.upsert(run.collection, [point]))
        self.store.mark_inserted(run.id, a.node, a.round, a.attempt)

    async def _judge(self, run: RunRow, a: AttemptRow, *, max_similarity: float | None,
                     is_similar: bool | None, accept: bool, empty: bool = False) -> None:
        """Store an attempt's verdict and its event together; an accepted one then goes to the
        controller (a restart between the two re-inserts it under the same id)."""
        a.max_similarity, a.is_similar, a.checked = max_similarity, is_similar, True
        pid = point_id(run.id, a.node, a.round)
        with self.store.transaction():
            self.store.record_check(run.id, a.node, a.round, a.attempt, max_similarity, bool(is_similar))
            if accept:
                self.store.mark_accepted(run.id, a.node, a.round, a.attempt, pid)
                a.accepted, a.point_id = True, pid
            self.store.add_event(run.id, "attempt", {
                "node": a.node, "round": a.round, "attempt": a.attempt, "scale": a.scale,
                "negatives": len(a.negatives), "max_similarity": max_similarity, "similar": is_similar,
                "accepted": accept, "empty": empty, "text": a.text, "prompt_tokens": a.prompt_tokens,
                "completion_tokens": a.completion_tokens, "latency_s": round(a.latency_s, 4),
                "node_url": a.node_url})
        self.notify(run.id)
        if accept:
            await self._insert(run, a, pid)

    def _source(self, run: RunRow, node: int, round_: int) -> str:
        cfg = run.config
        if cfg.use_previous_generation and round_ > 0:
            prev = [a for a in self.store.slot_attempts(run.id, node, round_ - 1) if a.accepted]
            if prev:
                return prev[0].text
        return cfg.base_instruction

    async def _generate(self, run: RunRow, node: int, round_: int, attempt: int, *, scale: float | None,
                        negatives: list[str]) -> AttemptRow:
        """One attempt. ``negatives`` are the slot's chosen instructions: the node's negative prompts
        with ``negatives.use == "guidance"``, listed in the positive prompt with ``"prompt"``."""
        cfg = run.config
        prompt = prompts.positive_prompt(prompts.augmentation_prompt(cfg.augmentation_prompt),
                                         self._source(run, node, round_))
        in_prompt = cfg.negatives.use == "prompt"
        if in_prompt:
            prompt = prompts.history_prompt(prompt, negatives)
        seed = derive_seed(cfg.seed, run.mode, node, round_, attempt)
        g = cfg.guidance
        request = ChatCompletionRequest(
            messages=[ChatMessage(role="user", content=prompt)], max_tokens=cfg.max_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, min_p=cfg.min_p, seed=seed,
            negative_prompts=[] if in_prompt else negatives,
            guidance_scale=scale if scale is not None else 1.0, guidance_space=g.space,
            guidance_combine=g.combine, guidance_alpha=g.alpha, guidance_max_tokens=g.max_tokens)
        gen = await self.deps.generate(node, request)
        row = AttemptRow(run_id=run.id, node=node, round=round_, attempt=attempt, scale=scale,
                         negatives=negatives, seed=seed, text=gen.text.strip(),
                         prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                         latency_s=gen.latency_s, node_url=gen.url, max_similarity=None, is_similar=None,
                         checked=False, accepted=False, point_id=None, inserted=False)
        self.store.add_attempt(row)  # persisted the moment it returns
        return row

    async def _choose_negatives(self, run: RunRow, node: int, round_: int) -> list[str]:
        """The slot's negatives: the controller's densest instructions, or (``source: random``) k
        accepted instructions of the run drawn with a per-slot seed; formatted as negative prompts
        for guidance, kept as they are for the in-prompt history."""
        cfg = run.config
        k = cfg.negatives.k
        if k <= 0:
            return []
        if cfg.negatives.source == "random":
            pool = sorted({a.text for a in self.store.accepted(run.id) if a.text.strip()})
            texts = random.Random(derive_seed(cfg.seed, "random-negatives", node, round_)).sample(
                pool, min(k, len(pool)))
        else:
            dense = await self.deps.controller_call(
                "dense", lambda c: c.collections.dense(run.collection, k=k, knn=cfg.negatives.knn))
            texts = [item.text for item in dense.items if item.text.strip()]
        if cfg.negatives.use == "prompt":
            return texts
        return [prompts.negative_prompt(cfg, t) for t in texts]

    async def _slot(self, run: RunRow, node: int, round_: int) -> None:
        existing = self.store.slot_attempts(run.id, node, round_)
        done = [a for a in existing if a.accepted]
        if done:
            if not done[0].inserted:  # killed between accepting and inserting: same id, no duplicate
                await self._insert(run, done[0], done[0].point_id or point_id(run.id, node, round_))
            return
        cfg = run.config
        guided = run.mode == "guided" and round_ > 0
        negatives: list[str] = []
        if guided:
            if existing:
                negatives = existing[0].negatives  # the retries of a slot share its negatives
            else:
                negatives = await self._choose_negatives(run, node, round_)
        cfg_guided = guided and cfg.negatives.use == "guidance"  # the in-prompt history has no scale
        retries = empties = 0
        i = 0
        while True:
            scale = (cfg.guidance.start + cfg.guidance.step * retries) if cfg_guided else None
            a = existing[i] if i < len(existing) else await self._generate(
                run, node, round_, i, scale=scale, negatives=negatives)
            i += 1
            if not a.text:
                empties += 1
                if not a.checked:
                    await self._judge(run, a, max_similarity=None, is_similar=None, accept=False, empty=True)
                if empties > MAX_EMPTY_OUTPUTS:
                    raise RunFailed(f"node {node} returned an empty text {empties} times in round {round_}: "
                                    "raise max_tokens or check the node's model and prompt")
                continue
            if not guided:
                await self._judge(run, a, max_similarity=None, is_similar=None, accept=True)
                return
            if a.checked and a.is_similar and retries < cfg.guidance.max_retries:
                retries += 1  # replay: this attempt was already judged similar
                continue
            async with self._lock(run.id):
                sim = await self.deps.controller_call(
                    "similar", lambda c, t=a.text: c.collections.similar(
                        run.collection, t, k=1, threshold=cfg.similarity_threshold,
                        threshold_quantile=cfg.similarity_quantile))
                accept = not sim.is_similar or retries >= cfg.guidance.max_retries
                await self._judge(run, a, max_similarity=sim.max_similarity, is_similar=sim.is_similar,
                                  accept=accept)
                if accept:
                    return
            retries += 1

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

    # ---- training jobs -----------------------------------------------------------------------
    def track_train_job(self, run_id: str, job_id: str) -> None:
        """Follow a run's training job (one follower per run; a newer job replaces the older)."""
        if self.deps.trainer is None or self._stopping:
            return
        old = self._trackers.pop(run_id, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(self._track_job(run_id, job_id), name=f"train-{run_id}")
        self._trackers[run_id] = task
        task.add_done_callback(lambda t: self._trackers.pop(run_id, None) if self._trackers.get(run_id) is t
                               else None)

    def _resume_train_tracking(self) -> None:
        """After a restart: follow every run's training job whose last ``train`` event was not final."""
        if self.deps.trainer is None:
            return
        for run_id, job_id in self.store.train_jobs():
            last = self.store.last_event(run_id, "train")
            if last is not None and last.data.get("job_id") == job_id and (
                    last.data.get("status") in TERMINAL_JOB_STATUSES or last.data.get("status") == LOST_JOB):
                continue
            log.info("following training job %s of run %s again", job_id, run_id)
            self.track_train_job(run_id, job_id)

    async def _track_job(self, run_id: str, job_id: str) -> None:
        """Poll the trainer job, writing a ``train`` event whenever its status or step changes."""
        last = None
        while True:
            await asyncio.sleep(self.settings.train_poll_s)
            try:
                job = await self.deps.trainer.jobs.get(job_id)  # type: ignore[union-attr]
            except NotFoundError as exc:  # the trainer lost it (e.g. a wiped database): stop following
                self.event(run_id, "train", {"job_id": job_id, "status": LOST_JOB,
                                             "error": f"the trainer does not know job {job_id}: {exc.message}"})
                return
            except Exception as exc:  # the trainer may be restarting or slow: keep following
                log.info("train job %s: %r", job_id, exc)
                continue
            state = (job.status, job.progress.step)
            if state != last:
                last = state
                self.event(run_id, "train", {"job_id": job_id, "status": job.status, "step": job.progress.step,
                                             "total_steps": job.progress.total_steps, "error": job.error})
            if job.status in TERMINAL_JOB_STATUSES:
                return
