"""Q/A conversion (the reference's inst2gen step): a run's instructions become chat records.

Each accepted instruction is cleaned of echoed labels, sent to a node with a formatter that asks
for exactly one ``Question: ... Answer: ...`` pair, parsed and checked (``prompts.judge_qa``: not
cut at max_tokens, not empty, the answer not a restatement of the question, in the base
instruction's script, not a bare number where an explanation is asked). A rejected output is
retried once (with a stricter reminder); if it is still rejected it is stored as ``rejected``
with the raw text and the reason, so every instruction is accounted for. With
``self_consistency`` a parsed question is answered once more and a pair whose two answers end in
different numbers is rejected as ``inconsistent``. Work already stored is skipped, so a second call
after an interruption continues where the first stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from negspace_contracts.errors import BadRequestError, ConflictError, ServiceUnavailableError
from negspace_contracts.node import ChatCompletionRequest, ChatMessage
from negspace_contracts.orchestrator import QAData, QARequest, QAResult

from negspace_orchestrator import prompts
from negspace_orchestrator.dependencies import Generation
from negspace_orchestrator.errors import DependencyDown
from negspace_orchestrator.events import EventLog
from negspace_orchestrator.export import EXPORT_BATCH, qa_export_dir, write_qa_folder
from negspace_orchestrator.fanout import derive_seed, gather
from negspace_orchestrator.store import RunRow, Store

Generate = Callable[[int, ChatCompletionRequest], Awaitable[Generation]]  # (logical node, request)


class QAConverter:
    """Converts a run's accepted instructions to Q/A pairs (one conversion per run at a time)."""

    def __init__(self, store: Store, events: EventLog, generate: Generate, *, exports_dir: Path,
                 concurrency: int) -> None:
        self.store = store
        self.events = events
        self.generate = generate
        self.exports_dir = exports_dir
        self.concurrency = concurrency
        self.running: set[str] = set()

    async def convert(self, run: RunRow, request: QARequest) -> QAResult:
        """409 while the run is generating, has no instructions or is being converted already."""
        if run.status in ("queued", "running"):
            raise ConflictError(f"run {run.id} is {run.status}; convert it to Q/A once it has finished")
        if self.store.counts(run.id)[0] == 0:
            raise ConflictError(f"run {run.id} has no accepted instructions to convert")
        if run.id in self.running:
            raise ConflictError(f"a Q/A conversion of run {run.id} is already in progress")
        self.running.add(run.id)
        try:
            return await self._convert(run, request)
        except DependencyDown as exc:
            raise ServiceUnavailableError(f"{exc}; converted pairs so far are kept: POST /qa again to "
                                          "continue") from exc
        finally:
            self.running.discard(run.id)

    async def _convert(self, run: RunRow, request: QARequest) -> QAResult:
        store = self.store
        data_dir = self.exports_dir
        try:  # refuse an unusable folder before spending generation on the conversion
            out_dir = await asyncio.to_thread(qa_export_dir, data_dir, request.export_dir, run.id)
        except OSError as exc:
            raise BadRequestError(f"cannot create the Q/A export folder {request.export_dir or run.id + '/qa'!r} "
                                  f"under {str(data_dir)!r}: {exc.strerror or exc}", param="export_dir") from exc
        accepted = store.accepted(run.id)
        done = store.qa_done(run.id)
        todo = [a for a in accepted if a.point_id not in done]
        sem = asyncio.Semaphore(self.concurrency)
        total = len(accepted)
        checks = {"agreed": 0, "disagreed": 0, "unchecked": 0}

        async def one(a) -> None:
            async with sem:
                instruction = prompts.clean_instruction(a.text)
                raw, tries, parsed, reason = "", 0, None, prompts.REJECT_EMPTY
                if instruction:
                    for tries in (1, 2):  # a rejected output gets one more try, with a stricter reminder
                        content = prompts.QA_PROMPT + instruction + (prompts.QA_RETRY_SUFFIX if tries == 2 else "")
                        req = ChatCompletionRequest(
                            messages=[ChatMessage(role="user", content=content)], max_tokens=request.max_tokens,
                            temperature=request.temperature, top_p=request.top_p,
                            seed=derive_seed(run.config.seed, "qa", a.point_id, tries))
                        gen = await self.generate(a.node, req)
                        raw = gen.text
                        parsed, reason = prompts.judge_qa(raw, base_instruction=run.config.base_instruction,
                                                          finish_reason=gen.finish_reason)
                        if parsed:
                            break
                if parsed and request.self_consistency:
                    req = ChatCompletionRequest(
                        messages=[ChatMessage(role="user", content=prompts.CHECK_PROMPT + parsed[0])],
                        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                        seed=derive_seed(run.config.seed, "qa-check", a.point_id))
                    second = (await self.generate(a.node, req)).text
                    verdict = prompts.consistent(parsed[1], second)
                    checks["unchecked" if verdict is None else "agreed" if verdict else "disagreed"] += 1
                    if verdict is False:
                        parsed, reason = None, prompts.REJECT_INCONSISTENT
                        raw = f"{raw}\n\n--- second answer (self-consistency) ---\n{second}"
                if parsed:
                    store.add_qa(run.id, a.point_id, "converted", parsed[0], parsed[1], raw, tries)
                else:
                    store.add_qa(run.id, a.point_id, "rejected", None, None, raw, tries, reason=reason)
                converted, rejected = store.qa_counts(run.id)
                self.events.emit(run.id, QAData(instruction_id=a.point_id,
                                                status="converted" if parsed else "rejected",
                                                reason=None if parsed else reason, done=converted + rejected,
                                                total=total, converted=converted, rejected=rejected))

        await gather([one(a) for a in todo])
        converted, rejected = store.qa_counts(run.id)
        try:
            jsonl_path, dataset_path = await write_qa_folder(out_dir, store.iter_qa_records(run.id, EXPORT_BATCH))
        except OSError as exc:
            raise BadRequestError(f"cannot write the Q/A export to {str(out_dir)!r}: {exc.strerror or exc}; the "
                                  "conversion is stored: POST again with a writable export_dir",
                                  param="export_dir") from exc
        return QAResult(run_id=run.id, total=total, converted=converted, rejected=rejected,
                        rejections=store.qa_rejections(run.id),
                        consistency=checks if request.self_consistency else None, jsonl_path=str(jsonl_path),
                        dataset_path=str(dataset_path) if dataset_path else None)

