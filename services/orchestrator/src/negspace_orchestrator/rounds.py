"""The round algorithms: guided rounds (the method) and baselines, one (node, round) slot at a time.

Guided (the reference method):
  round 0 (bootstrap): every logical node samples one augmentation of ``prompt + base``; each is
  stored and added to the controller.
  rounds 1..R, per node: negatives = controller ``dense(k, knn)``; generate with CFG at
  ``guidance.start``; while the controller finds the text similar and retries < ``max_retries``,
  raise the scale by ``step`` and generate again; then store and add the result.
Nodes of a round run concurrently (or one after another with round mode ``sequential``); the
similarity check and the insert are one atomic controller call (``/accept``), so two nodes never
both accept near-duplicates. Every attempt is written the moment its generation returns; a slot that already
has an accepted row is never generated again, and the controller id of a slot's instruction is
derived from (run, node, round), so a replayed insert overwrites instead of duplicating.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import Awaitable

from negspace_contracts.controller import PointIn
from negspace_contracts.errors import BadRequestError, ConflictError, NegspaceError
from negspace_contracts.node import ChatCompletionRequest, ChatMessage
from negspace_contracts.orchestrator import TERMINAL_RUN_STATUSES, AttemptData, RoundData, RunConfig

from negspace_orchestrator import prompts
from negspace_orchestrator.dependencies import Dependencies, DependencyDown
from negspace_orchestrator.events import EventLog, Room
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.store import AttemptRow, RunRow, Store, point_id

MAX_EMPTY_OUTPUTS = 5  # empty generations tolerated per slot before the run fails


class RunFailed(Exception):
    """A problem that waiting will not fix (the message says what to change)."""


def derive_seed(seed: int, *parts: object) -> int:
    """A per-(node, round, attempt) seed: reproducible, so a lost attempt replays identically."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2  # < 2**62, fits every engine's seed range


def run_target(config: RunConfig) -> int:
    """Instructions a guided run accepts: one per node in the bootstrap and in each round."""
    return config.nodes * (config.rounds + 1)


def target_for(store: Store, config: RunConfig) -> int:
    """Instructions a new run will accept: a guided run's slots, a baseline's size or its match's count."""
    if config.mode == "guided":
        return run_target(config)
    if config.size is not None:
        return config.size
    match = store.get_run(config.match_run or "")
    if match is None:
        raise BadRequestError(f"match_run {config.match_run!r} is not a known run id", param="match_run")
    if match.mode != "guided":
        raise BadRequestError(f"match_run {config.match_run!r} is a baseline; give a guided run's id",
                              param="match_run")
    if match.status in TERMINAL_RUN_STATUSES:
        accepted = store.counts(match.id)[0]
        if accepted == 0:
            raise BadRequestError(f"run {match.id} ended ({match.status}) with no instructions to match",
                                  param="match_run")
        return accepted
    return match.target


async def gather(coros: list[Awaitable[None]]) -> None:
    """Run slot coroutines together; the first failure cancels the others and is re-raised
    (a dependency outage first, so the run pauses rather than fails)."""
    first: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            for c in coros:
                tg.create_task(c)
    # Raised after the try, not inside except*: Python < 3.11.4 (Debian bookworm's 3.11.2, the
    # containers' base) wraps an exception raised in an except* clause in an ExceptionGroup
    # (gh-103590), which the scheduler took for a crash and failed the run.
    except* DependencyDown as eg:
        first = eg.exceptions[0]
    except* (RunFailed, NegspaceError) as eg:
        first = first or eg.exceptions[0]
    if first is not None:
        raise first from None


class Rounds(Room):
    """Runs one run's rounds to the end (``run``); the scheduler decides when and what a failure means."""

    def __init__(self, settings: OrchestratorSettings, store: Store, deps: Dependencies,
                 events: EventLog) -> None:
        super().__init__(settings, store, deps, events)

    async def run(self, run: RunRow) -> None:
        await self.deps.controller_call(run.controller, "create collection",
                                        lambda c: self._ensure_collection(c, run))
        if run.mode == "guided":
            await self._guided(run)
        else:
            await self._baseline(run)

    @staticmethod
    async def _ensure_collection(ctl, run: RunRow) -> None:
        try:
            await ctl.collections.create(run.collection)
        except ConflictError:
            pass  # already there (a resumed run)

    async def _guided(self, run: RunRow) -> None:
        cfg = run.config
        sequential = (cfg.round_mode or self.settings.round_mode) == "sequential"
        for r in range(cfg.rounds + 1):
            self.store.set_round(run.id, r)
            if sequential:  # each slot's coroutine is made only when its turn comes: a failure or a
                for n in range(cfg.nodes):  # cancel leaves none created and never awaited
                    await self._slot(run, n, r)
            else:
                await gather([self._slot(run, n, r) for n in range(cfg.nodes)])
            self._check_round(run, r)
            if not self.store.has_round_event(run.id, r):  # once per round, also across restarts
                accepted, attempts, _, _ = self.store.counts(run.id)
                self.events.emit(run.id, RoundData(round=r, rounds=cfg.rounds, accepted=accepted,
                                                   attempts=attempts))

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

        await gather([worker() for _ in range(min(nodes, run.target) or 1)])

    # ---- one (node, round) slot --------------------------------------------------------------
    @staticmethod
    def _point(run: RunRow, a: AttemptRow, pid: str) -> PointIn:
        return PointIn(id=uuid.UUID(pid), text=a.text,
                       payload={"run_id": run.id, "mode": run.mode, "node": a.node, "round": a.round,
                                "attempt": a.attempt})

    async def _insert(self, run: RunRow, a: AttemptRow, pid: str) -> None:
        point = self._point(run, a, pid)
        await self.deps.controller_call(run.controller, "upsert",
                                        lambda c: c.collections.upsert(run.collection, [point]))
        self.store.mark_inserted(run.id, a.node, a.round, a.attempt)

    async def _judge(self, run: RunRow, a: AttemptRow, *, max_similarity: float | None,
                     is_similar: bool | None, accept: bool, empty: bool = False,
                     inserted: bool = False) -> None:
        """Store an attempt's verdict and its event together; an accepted one then goes to the
        controller (a restart between the two re-inserts it under the same id), unless the
        controller already holds it (``inserted``: it was judged and inserted by one ``/accept``)."""
        a.max_similarity, a.is_similar, a.checked = max_similarity, is_similar, True
        pid = point_id(run.id, a.node, a.round)
        with self.store.transaction():
            self.store.record_check(run.id, a.node, a.round, a.attempt, max_similarity, bool(is_similar))
            if accept:
                self.store.mark_accepted(run.id, a.node, a.round, a.attempt, pid)
                a.accepted, a.point_id = True, pid
                if inserted:
                    self.store.mark_inserted(run.id, a.node, a.round, a.attempt)
            self.store.add_event(run.id, AttemptData(
                node=a.node, round=a.round, attempt=a.attempt, scale=a.scale, negatives=len(a.negatives),
                max_similarity=max_similarity, similar=is_similar, accepted=accept, empty=empty, text=a.text,
                prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens,
                latency_s=round(a.latency_s, 4), node_url=a.node_url))
        self.events.notify(run.id)
        if accept and not inserted:
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
                run.controller, "dense", lambda c: c.collections.dense(run.collection, k=k, knn=cfg.negatives.knn))
            texts = [item.text for item in dense.items if item.text.strip()]
        if cfg.negatives.use == "prompt":
            return texts
        positive = prompts.positive_prompt(prompts.augmentation_prompt(cfg.augmentation_prompt),
                                           self._source(run, node, round_))
        return prompts.negative_prompts(cfg, texts, positive)

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
            # Check and insert are one atomic controller call (it holds the collection's write lock
            # across both), so every check sees every instruction accepted before it without a lock
            # here. The last retry is forced in. A restart between the controller's insert and
            # _judge's record replays this attempt under the same point id, which the controller
            # leaves out of its own check; a later attempt of the slot overwrites that id.
            point = self._point(run, a, point_id(run.id, node, round_))
            sim = await self.deps.controller_call(
                run.controller, "accept",
                lambda c, p=point, last=retries >= cfg.guidance.max_retries: c.collections.accept(
                    run.collection, p, k=1, threshold=cfg.similarity_threshold,
                    threshold_quantile=cfg.similarity_quantile, force=last))
            await self._judge(run, a, max_similarity=sim.max_similarity, is_similar=sim.is_similar,
                              accept=sim.accepted, inserted=sim.accepted)
            if sim.accepted:
                return
            retries += 1
