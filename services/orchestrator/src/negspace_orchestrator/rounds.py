"""The round loop: guided rounds (the method) and baselines, one (node, round) slot at a time.

This module sequences and persists; what the method does is ``method.Method`` (the prompts, the
negatives, the scale schedule, the acceptance rule and the attempt kept when retries run out).

Guided (with the reference's options):
  round 0 (bootstrap): every logical node samples one augmentation of ``prompt + base``; each is
  stored and added to the controller.
  rounds 1..R, per node: negatives = controller ``dense(k, knn)``; generate with CFG at
  ``guidance.start``; while the controller finds the text similar and retries < ``max_retries``,
  raise the scale by ``step`` and generate again; then store and add the result.
Nodes of a round run concurrently (or one after another with round mode ``sequential``); the
similarity check and the insert are one atomic controller call (``/accept``), so two nodes never
both accept near-duplicates. Every attempt is written the moment its generation returns, and every
value a decision reads (the controller's verdict, the on-topic cosine) is written before the
decision acts; a slot that already has an accepted row is never generated again, a replayed slot
walks its stored attempts before generating, and the controller id of a slot's instruction is
derived from (run, node, round), so a replayed insert overwrites instead of duplicating.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict

from negspace_contracts.controller import PointIn
from negspace_contracts.errors import BadRequestError, ConflictError
from negspace_contracts.node import ChatCompletionRequest, ChatMessage, Guidance
from negspace_contracts.orchestrator import TERMINAL_RUN_STATUSES, AttemptData, RoundData, RunConfig

from negspace_orchestrator import prompts
from negspace_orchestrator.dependencies import Dependencies, Generation
from negspace_orchestrator.errors import RunFailed
from negspace_orchestrator.events import EventLog
from negspace_orchestrator.fanout import derive_seed, gather
from negspace_orchestrator.method import MAX_EMPTY_OUTPUTS, Method, Tally, cosine
from negspace_orchestrator.settings import OrchestratorSettings
from negspace_orchestrator.shared import SharedState
from negspace_orchestrator.store import AttemptRow, RunRow, Store, point_id

BASE_VECTORS_KEPT = 256  # base-instruction embeddings cached (one per recent run, for the two-sided rule)


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


class Rounds(SharedState):
    """Runs one run's rounds to the end (``run``); the scheduler decides when and what a failure means."""

    def __init__(self, settings: OrchestratorSettings, store: Store, deps: Dependencies,
                 events: EventLog) -> None:
        super().__init__(settings, store, deps, events)
        self._base_vectors: OrderedDict[str, asyncio.Future] = OrderedDict()

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
                     inserted: bool = False, kept: bool = False) -> None:
        """Store an attempt's verdict and its event together; an accepted one then goes to the
        controller (a restart between the two re-inserts it under the same id), unless the
        controller already holds it (``inserted``: it was judged and inserted by one ``/accept``).
        ``kept``: an attempt judged before, now forced in as the slot's best (its event repeats)."""
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
                latency_s=round(a.latency_s, 4), node_url=a.node_url, on_topic=a.on_topic, angle=a.angle,
                kept=True if kept else None))
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

    async def _angle(self, run: RunRow, method: Method, node: int, round_: int, attempt: int,
                     source: str) -> tuple[str, Generation]:
        """Two-stage, stage one: a short angle within the base, sampled hot (listing the run's used
        angles when ``two_stage.avoid_used``)."""
        cfg = run.config
        ts = cfg.two_stage
        used = self.store.used_angles(run.id, ts.avoid_used) if ts.avoid_used else []
        request = ChatCompletionRequest(
            messages=[ChatMessage(role="user", content=method.angle_prompt(source, used))],
            max_tokens=ts.angle_max_tokens, temperature=ts.angle_temperature, top_p=ts.angle_top_p,
            seed=derive_seed(cfg.seed, run.mode, node, round_, attempt, "angle"))
        gen = await self.deps.generate(node, request)
        return prompts.clean_angle(gen.text, wording=ts.prompt), gen

    async def _generate(self, run: RunRow, method: Method, node: int, round_: int, attempt: int, *,
                        guidance: Guidance | None, negatives: list[str]) -> AttemptRow:
        """One attempt. ``negatives`` are the slot's chosen instructions: the node's negative prompts
        with ``negatives.use == "guidance"``, listed in the positive prompt with ``"prompt"``."""
        cfg = run.config
        source = self._source(run, node, round_)
        angle, first = None, None
        if cfg.prompting == "two-stage":
            angle, first = await self._angle(run, method, node, round_, attempt, source)
        seed = derive_seed(cfg.seed, run.mode, node, round_, attempt)
        request = ChatCompletionRequest(
            messages=[ChatMessage(role="user", content=method.attempt_prompt(source, negatives, angle))],
            max_tokens=method.max_tokens(), temperature=cfg.temperature, top_p=cfg.top_p, min_p=cfg.min_p,
            seed=seed, negative_prompts=method.attempt_negatives(negatives, angle),
            guidance=guidance or Guidance(space=cfg.guidance.space, combine=cfg.guidance.combine,
                                          alpha=cfg.guidance.alpha, max_tokens=cfg.guidance.max_tokens))
        gen = await self.deps.generate(node, request)
        row = AttemptRow(run_id=run.id, node=node, round=round_, attempt=attempt,
                         scale=guidance.scale if guidance else None, negatives=negatives, seed=seed,
                         text=method.reply_text(gen.text, seed), prompt_tokens=gen.prompt_tokens,
                         completion_tokens=gen.completion_tokens, latency_s=gen.latency_s, node_url=gen.url,
                         max_similarity=None, is_similar=None, checked=False, accepted=False, point_id=None,
                         inserted=False, angle=angle)
        if first is not None:  # the angle's cost belongs to the attempt
            row.prompt_tokens = (row.prompt_tokens or 0) + (first.prompt_tokens or 0)
            row.completion_tokens = (row.completion_tokens or 0) + (first.completion_tokens or 0)
            row.latency_s += first.latency_s
        self.store.add_attempt(row)  # persisted the moment it returns
        return row

    async def _choose_negatives(self, run: RunRow, method: Method, node: int, round_: int) -> list[str]:
        """The slot's negatives (``Method``: which ones and how they are formatted): from the
        controller's densest instructions, or (``source: random``) from the run's accepted ones."""
        cfg = run.config
        if cfg.negatives.k <= 0:
            return []
        if cfg.negatives.source == "random":
            texts = method.pick_random([a.text for a in self.store.accepted(run.id)], node, round_)
        else:
            dense = await self.deps.controller_call(
                run.controller, "dense",
                lambda c: c.collections.dense(run.collection, k=method.dense_count(), knn=cfg.negatives.knn))
            texts = method.pick_dense([item.text for item in dense.items], node, round_)
        return method.format_negatives(texts, self._source(run, node, round_))

    async def _on_topic(self, run: RunRow, a: AttemptRow) -> float:
        """The attempt's cosine to the run's base instruction (the controller's embedder; the base's
        vector is embedded once per run), persisted before any decision uses it."""
        if a.on_topic is not None:
            return a.on_topic
        task = self._base_vectors.get(run.id)
        if task is None:  # one embedding per run, shared by the slots that ask at the same moment
            task = asyncio.ensure_future(self.deps.controller_call(
                run.controller, "embed", lambda c: c.embed([run.config.base_instruction])))
            self._base_vectors[run.id] = task
            while len(self._base_vectors) > BASE_VECTORS_KEPT:
                self._base_vectors.popitem(last=False)
        else:
            self._base_vectors.move_to_end(run.id)
        try:
            base = (await asyncio.shield(task)).embeddings[0]
        except BaseException:
            if task.done() and self._base_vectors.get(run.id) is task:
                del self._base_vectors[run.id]  # a failed embedding is asked again next time
            raise
        got = await self.deps.controller_call(run.controller, "embed", lambda c: c.embed([a.text]))
        a.on_topic = round(cosine(got.embeddings[0], base), 6)
        self.store.record_on_topic(run.id, a.node, a.round, a.attempt, a.on_topic)
        return a.on_topic

    async def _check_and_insert(self, run: RunRow, a: AttemptRow, *, force: bool, kept: bool = False) -> bool:
        """The controller's atomic similarity check and insert (``/accept``) and the verdict stored.
        It holds the collection's write lock across both, so every check sees every instruction
        accepted before it without a lock here. A restart between the controller's insert and
        _judge's record replays this attempt under the same point id, which the controller leaves
        out of its own check; a later attempt of the slot overwrites that id."""
        cfg = run.config
        point = self._point(run, a, point_id(run.id, a.node, a.round))
        sim = await self.deps.controller_call(
            run.controller, "accept",
            lambda c: c.collections.accept(run.collection, point, k=1, threshold=cfg.similarity_threshold,
                                           threshold_quantile=cfg.similarity_quantile, force=force))
        await self._judge(run, a, max_similarity=sim.max_similarity, is_similar=sim.is_similar,
                          accept=sim.accepted, inserted=sim.accepted, kept=kept)
        return sim.accepted

    async def _slot(self, run: RunRow, node: int, round_: int) -> None:
        """Sequence one slot's attempts and persist each step; ``Method`` decides everything else.
        A replay walks the stored attempts (and their stored verdicts and on-topic cosines) first,
        and only then generates, so it decides as the first pass did."""
        existing = self.store.slot_attempts(run.id, node, round_)
        done = [a for a in existing if a.accepted]
        if done:
            if not done[0].inserted:  # killed between accepting and inserting: same id, no duplicate
                await self._insert(run, done[0], done[0].point_id or point_id(run.id, node, round_))
            return
        cfg = run.config
        method = Method(cfg)
        guided = run.mode == "guided" and round_ > 0
        negatives: list[str] = []
        if guided:
            if existing:
                negatives = existing[0].negatives  # the retries of a slot share its negatives
            else:
                negatives = await self._choose_negatives(run, method, node, round_)
        cfg_guided = guided and not method.in_prompt  # the in-prompt history has no scale
        tally = Tally()
        i = 0
        while True:
            if guided and method.exhausted(tally):  # keep: best, and a budget is spent
                best = method.best(self.store.slot_attempts(run.id, node, round_))
                await self._check_and_insert(run, best, force=True, kept=True)
                return
            a = existing[i] if i < len(existing) else await self._generate(
                run, method, node, round_, i, guidance=method.guidance(tally, cfg_guided), negatives=negatives)
            i += 1
            if not a.text:
                tally.empties += 1
                if not a.checked:
                    await self._judge(run, a, max_similarity=None, is_similar=None, accept=False, empty=True)
                if tally.empties > MAX_EMPTY_OUTPUTS:
                    what = "an unparseable verbalized reply" if cfg.prompting == "verbalized" else "an empty text"
                    raise RunFailed(f"node {node} returned {what} {tally.empties} times in round {round_}: "
                                    "raise max_tokens or check the node's model and prompt")
                continue
            if not guided:
                await self._judge(run, a, max_similarity=None, is_similar=None, accept=True)
                return
            if method.two_sided and not method.is_on_topic(await self._on_topic(run, a)):
                tally.off_topic += 1
                if method.force_off_topic(tally):  # keep: last, the on-topic budget is spent
                    await self._check_and_insert(run, a, force=True)
                    return
                if not a.checked:
                    await self._judge(run, a, max_similarity=None, is_similar=None, accept=False)
                continue
            if a.checked:  # replay: judged too similar before (an accepted one ended the slot above)
                tally.retries += 1
                continue
            if await self._check_and_insert(run, a, force=method.force_novel(tally)):
                return
            tally.retries += 1
