"""Q/A conversion (the reference's inst2gen step) and the dataset exports.

Each accepted instruction is cleaned of echoed labels, sent to a node with a formatter that asks
for exactly one ``Question: ... Answer: ...`` pair, parsed and checked (``prompts.judge_qa``: not
cut at max_tokens, not empty, the answer not a restatement of the question, in the base
instruction's script, not a bare number where an explanation is asked). A rejected output is
retried once (with a stricter reminder); if it is still rejected it is stored as ``rejected``
with the raw text and the reason, so every instruction is accounted for. Work already stored is skipped, so a second call
after an interruption continues where the first stopped.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from negspace_contracts.errors import BadRequestError
from negspace_contracts.node import ChatCompletionRequest, ChatMessage
from negspace_contracts.orchestrator import QARequest, QAResult
from negspace_contracts.trainer import ChatRecord, ChatTurn

from negspace_orchestrator import prompts
from negspace_orchestrator.driver import Orchestrator, derive_seed
from negspace_orchestrator.store import RunRow


def chat_record(question: str, answer: str) -> ChatRecord:
    return ChatRecord(messages=[ChatTurn(role="user", content=question),
                                ChatTurn(role="assistant", content=answer)])


def _outside(data_dir: Path, given: str) -> BadRequestError:
    return BadRequestError(
        f"export_dir {given!r} is outside the orchestrator's data folder {str(data_dir)!r}: give a folder "
        "inside it, relative to it (e.g. 'my-export') or as an absolute path under it; no '..' "
        "and no symbolic link that leads out of it", param="export_dir")


def resolve_export_dir(data_dir: Path, export_dir: str) -> Path:
    """``export_dir`` confined to ``data_dir``: relative paths are taken under it, absolute ones must
    lie in it; a ``..`` part or a symbolic link that leads out of it is refused (BadRequestError)."""
    base = data_dir.resolve()
    try:
        given = Path(export_dir)
        if ".." in given.parts:
            raise _outside(base, export_dir)
        target = (given if given.is_absolute() else base / given).resolve()  # follows symlinks
    except (ValueError, OSError) as exc:  # a NUL byte, a symlink loop
        raise BadRequestError(f"export_dir {export_dir!r} is not a usable path: {exc}", param="export_dir") from exc
    if target != base and base not in target.parents:
        raise _outside(base, export_dir)
    return target


def make_export_dir(data_dir: Path, export_dir: str) -> Path:
    """``export_dir`` confined to ``data_dir`` (see resolve_export_dir), made if missing."""
    return _make_export_dir(data_dir, export_dir, "")


def _make_export_dir(data_dir: Path, export_dir: str | None, run_id: str) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    out_dir = resolve_export_dir(data_dir, export_dir) if export_dir else data_dir.resolve() / run_id / "qa"
    out_dir.mkdir(parents=True, exist_ok=True)
    if export_dir:  # a link swapped in while the folders were made must not lead out either
        resolve_export_dir(data_dir, str(out_dir))
    return out_dir


async def convert(orch: Orchestrator, run: RunRow, request: QARequest) -> QAResult:
    store = orch.store
    data_dir = orch.settings.exports_dir
    try:  # refuse an unusable folder before spending generation on the conversion
        out_dir = await asyncio.to_thread(_make_export_dir, data_dir, request.export_dir, run.id)
    except OSError as exc:
        raise BadRequestError(f"cannot create the Q/A export folder {request.export_dir or run.id + '/qa'!r} "
                              f"under {str(data_dir)!r}: {exc.strerror or exc}", param="export_dir") from exc
    accepted = store.accepted(run.id)
    done = store.qa_done(run.id)
    todo = [a for a in accepted if a.point_id not in done]
    sem = asyncio.Semaphore(orch.settings.qa_concurrency)
    total = len(accepted)

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
                    gen = await orch.deps.generate(a.node, req)
                    raw = gen.text
                    parsed, reason = prompts.judge_qa(raw, base_instruction=run.config.base_instruction,
                                                      finish_reason=gen.finish_reason)
                    if parsed:
                        break
            if parsed:
                store.add_qa(run.id, a.point_id, "converted", parsed[0], parsed[1], raw, tries)
            else:
                store.add_qa(run.id, a.point_id, "rejected", None, None, raw, tries, reason=reason)
            converted, rejected = store.qa_counts(run.id)
            orch.event(run.id, "qa", {"instruction_id": a.point_id, "status": "converted" if parsed else "rejected",
                                      "reason": None if parsed else reason,
                                      "done": converted + rejected, "total": total,
                                      "converted": converted, "rejected": rejected})

    await orch._gather([one(a) for a in todo])
    converted, rejected = store.qa_counts(run.id)
    records = [chat_record(q, a) for q, a in store.qa_records(run.id)]
    try:
        jsonl_path, dataset_path = await asyncio.to_thread(export, records, out_dir)
    except OSError as exc:
        raise BadRequestError(f"cannot write the Q/A export to {str(out_dir)!r}: {exc.strerror or exc}; the "
                              "conversion is stored: POST again with a writable export_dir", param="export_dir") from exc
    return QAResult(run_id=run.id, total=total, converted=converted, rejected=rejected,
                    rejections=store.qa_rejections(run.id), jsonl_path=str(jsonl_path), dataset_path=str(dataset_path) if dataset_path else None)


def export(records: list[ChatRecord], out_dir: Path) -> tuple[Path, Path | None]:
    """Write ``qa.jsonl`` and a Hugging Face ``datasets`` folder (``dataset/``) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "qa.jsonl"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r.model_dump(mode="json"), ensure_ascii=False) + "\n")
    tmp.replace(jsonl)
    if not records:
        return jsonl, None
    import datasets  # heavy (pyarrow): imported only when a dataset is written

    ds = datasets.Dataset.from_list([r.model_dump(mode="json") for r in records])
    folder = out_dir / "dataset"
    ds.save_to_disk(str(folder))
    return jsonl, folder
