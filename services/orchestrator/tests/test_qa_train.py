"""Q/A conversion (parse, retry once, count rejects), exports, and the training hand-off."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

import httpx
import pytest
from negspace_contracts.errors import BadRequestError, ConflictError, NotFoundError, ServiceUnavailableError
from negspace_contracts.node import ChatCompletionRequest
from negspace_contracts.orchestrator import QARequest, RunConfig, TrainRequest
from negspace_orchestrator import prompts
from negspace_orchestrator.api import deps as app_mod

from .conftest import MockTrainer, ThreadServer, harness, seeded_text  # noqa: TID252


def script(req: ChatCompletionRequest) -> str:
    content = req.messages[0].content
    if not content.startswith(prompts.QA_PROMPT):
        return "Instruction: " + seeded_text(req.seed or 0)  # echoed label, cleaned before Q/A
    instruction = content[len(prompts.QA_PROMPT):].split("\n\n")[0]
    retry = content.endswith(prompts.QA_RETRY_SUFFIX)
    if instruction.startswith("Instruction:"):
        return "label was not cleaned"
    first = instruction.split()[0]
    if first in HOPELESS:
        return "I cannot do that."
    if first in FLAKY and not retry:
        return "Sure! Here is something without the format."
    return f"**Question:** What about {instruction}?\n**Answer:** An answer about {first}."


HOPELESS: set[str] = set()
FLAKY: set[str] = set()


async def test_qa_converts_retries_once_and_counts_rejects(make_harness, tmp_path, monkeypatch):
    monkeypatch.setattr(app_mod, "NDJSON_BATCH", 2)  # GET /qa streams its 3 records in two batches
    async with make_harness(script=script) as h:
        rid = (await h.client.runs.create(RunConfig(base_instruction="Write a riddle.", nodes=2, rounds=1,
                                                    seed=1))).id
        with pytest.raises(ConflictError):  # still running
            await h.client.runs.qa(rid)
        await h.wait(rid)
        insts = await h.client.runs.instructions(rid)
        cleaned = [prompts.clean_instruction(i.text) for i in insts]
        HOPELESS.add(cleaned[0].split()[0])
        FLAKY.add(cleaned[1].split()[0])
        with pytest.raises(ConflictError):
            await h.client.runs.qa_records(rid)
        # export_dir is relative to the data dir (the harness points it at tmp_path / "exports")
        result = await h.client.runs.qa(rid, QARequest(export_dir="out"))
        assert (result.total, result.converted, result.rejected) == (4, 3, 1)
        assert result.jsonl_path == str((tmp_path / "exports" / "out" / "qa.jsonl").resolve())
        records = await h.client.runs.qa_records(rid)
        assert len(records) == 3
        for r in records:
            assert [m.role for m in r.messages] == ["user", "assistant"]
            assert r.messages[0].content.startswith("What about ") and "*" not in r.messages[1].content
        lines = (tmp_path / "exports" / "out" / "qa.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == [r.model_dump(mode="json") for r in records]
        import datasets
        ds = datasets.load_from_disk(result.dataset_path)
        assert ds.num_rows == 3 and ds[0]["messages"][1]["role"] == "assistant"
        # a second call converts nothing again: the work is stored
        n_requests = sum(len(n.requests) for n in h.nodes)
        again = await h.client.runs.qa(rid)
        assert (again.converted, again.rejected) == (3, 1)
        assert sum(len(n.requests) for n in h.nodes) == n_requests
        qa_events = [e async for e in h.client.runs.events(rid) if e.type == "qa"]
        assert len(qa_events) == 4 and qa_events[-1].data["done"] == 4


async def test_export_dir_is_confined_to_the_data_dir(make_harness, tmp_path):
    data_dir = tmp_path / "exports"
    outside = tmp_path / "outside"
    outside.mkdir()
    async with make_harness(script=script) as h:
        rid = (await h.client.runs.create(RunConfig(base_instruction="Write a riddle.", nodes=1, rounds=0))).id
        await h.wait(rid)
        data_dir.mkdir(exist_ok=True)
        (data_dir / "link-out").symlink_to(outside, target_is_directory=True)
        (data_dir / "link-in").symlink_to(data_dir / "real", target_is_directory=True)
        generated = sum(len(n.requests) for n in h.nodes)
        refused = {
            "../escape": "a '..' escape",
            "a/../../escape": "'..' in the middle",
            "a/../b": "'..' even when it would stay inside",
            str(outside / "x"): "an absolute path outside",
            "/": "the root",
            "link-out": "a symlink leading out",
            "link-out/sub": "a folder under a symlink leading out",
            str(data_dir / "link-out"): "the same symlink, absolute",
        }
        for export_dir, why in refused.items():
            with pytest.raises(BadRequestError) as ei:
                await h.client.runs.qa(rid, QARequest(export_dir=export_dir))
            assert ei.value.param == "export_dir", why
            assert "outside the orchestrator's data folder" in ei.value.message, (why, ei.value.message)
            assert "relative to it" in ei.value.message  # says what is allowed
        with pytest.raises(BadRequestError) as ei:
            await h.client.runs.qa(rid, QARequest(export_dir="bad\x00name"))
        assert ei.value.param == "export_dir"
        assert list(outside.iterdir()) == [] and not (tmp_path / "escape").exists()
        assert sum(len(n.requests) for n in h.nodes) == generated  # refused before any Q/A generation
        # allowed: relative (nested), absolute inside, a symlink that stays inside
        for export_dir, where in [("nested/one", data_dir / "nested" / "one"),
                                  (str(data_dir / "abs"), data_dir / "abs"),
                                  ("link-in/x", data_dir / "real" / "x")]:
            result = await h.client.runs.qa(rid, QARequest(export_dir=export_dir))
            assert result.jsonl_path == str((where / "qa.jsonl").resolve()), export_dir
            assert (where / "qa.jsonl").is_file()
        default = await h.client.runs.qa(rid)
        assert default.jsonl_path == str((data_dir / rid / "qa" / "qa.jsonl").resolve())


async def test_train_hands_the_qa_dataset_to_the_trainer_and_tracks_the_job(make_harness):
    async with make_harness(script=script) as h:
        rid = (await h.client.runs.create(RunConfig(base_instruction="Write a riddle.", nodes=1, rounds=1))).id
        await h.wait(rid)
        with pytest.raises(ConflictError):  # no Q/A yet
            await h.client.runs.train(rid)
        await h.client.runs.qa(rid)
        job = await h.client.runs.train(rid, TrainRequest(method="lora"))
        sent, _ = h.trainer.jobs[job.id]
        assert sent.dataset.records is not None and len(sent.dataset.records) == 2
        assert sent.name == f"negspace-run-{rid}"
        assert (await h.client.runs.get(rid)).train_job_id == job.id
        assert (await h.client.runs.train_job(rid)).status == "succeeded"


def test_parse_and_clean():
    assert prompts.parse_qa("Question: What is 2+2?\nAnswer: 4") == ("What is 2+2?", "4")
    assert prompts.parse_qa("Q: a?\nA: b\nQuestion: c?\nAnswer: d") == ("a?", "b")
    assert prompts.parse_qa("Answer: 4") is None and prompts.parse_qa("Question: x\nAnswer:  ") is None
    assert prompts.clean_instruction('Augmentation: "Write a haiku."') == "Write a haiku."
    assert prompts.clean_instruction("Base instruction: Write X") == "Write X"
    assert prompts.clean_instruction("Instructions: Add Y") == "Add Y"
    # seen from the bundled 135M model: repeated labels, a placeholder answer
    assert prompts.parse_qa("Question: Question: How?\n\nAnswer: Question: Question: Question:") is None
    assert prompts.parse_qa("Question: Question: How far?\nAnswer: 3 km") == ("How far?", "3 km")
    assert prompts.parse_qa("Question: What?\nAnswer: [Adding the answer to the question]") is None
    assert prompts.clean_instruction("**Instruction:** Do X") == "Do X"
    assert prompts.clean_instruction("Design an instruction set") == "Design an instruction set"


def train_events(h, run_id: str) -> list[dict]:
    return [e.data for e in h.orch.store.events_after(run_id, 0, limit=10_000) if e.type == "train"]


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_restarted_orchestrator_follows_unfinished_training_jobs_again(make_harness):
    trainer = MockTrainer()
    async with make_harness(script=script, trainer=trainer, train_poll_s=3600) as h:  # never polls here
        rid = (await h.client.runs.create(RunConfig(base_instruction="Write a riddle.", nodes=1, rounds=0))).id
        await h.wait(rid)
        await h.client.runs.qa(rid)
        job = await h.client.runs.train(rid)
        assert [e["status"] for e in train_events(h, rid)] == ["running"]
        lost_rid = (await h.client.runs.create(RunConfig(base_instruction="Write a poem.", nodes=1, rounds=0))).id
        await h.wait(lost_rid)
        await h.client.runs.qa(lost_rid)
        lost_job = await h.client.runs.train(lost_rid)
    del trainer.jobs[lost_job.id]  # the trainer lost this one (e.g. its database was wiped)
    async with make_harness(script=script, trainer=trainer, train_poll_s=0.02) as h:
        await wait_for(lambda: train_events(h, rid)[-1]["status"] == "succeeded")
        assert [e["status"] for e in train_events(h, rid)] == ["running", "succeeded"]
        assert train_events(h, rid)[-1]["job_id"] == job.id
        await wait_for(lambda: train_events(h, lost_rid)[-1]["status"] == "lost")
        assert lost_job.id in train_events(h, lost_rid)[-1]["error"]
        await wait_for(lambda: not h.orch.training.followers)  # both followers ended
    async with make_harness(script=script, trainer=trainer, train_poll_s=0.02) as h:
        assert not h.orch.training.followers  # nothing left to follow: both jobs' last events were final


async def test_trainer_timeout_is_a_503_naming_the_trainer(tmp_path):
    trainer = MockTrainer()
    with ThreadServer(trainer.app) as server:  # real sockets: httpx enforces timeouts there only
        async with harness(tmp_path, script=script, trainer=trainer, trainer_url=server.url,
                           trainer_timeout_s=0.3) as h:
            assert h.orch.deps.trainer._http.timeout.read == 0.3
            rid = (await h.client.runs.create(RunConfig(base_instruction="Write a riddle.", nodes=1,
                                                        rounds=0))).id
            await h.wait(rid)
            await h.client.runs.qa(rid)
            trainer.answer_delay = 1.5  # the job is created, but its answer comes too late
            start = time.monotonic()
            with pytest.raises(ServiceUnavailableError) as ei:
                await h.client.runs.train(rid)
            assert time.monotonic() - start < 1.4  # 3 tries of 0.3 s
            assert ei.value.message.startswith("trainer:") and "timed out" in ei.value.message
            assert trainer.creates == 3 and len(trainer.jobs) == 1  # the retries sent the same key
            trainer.answer_delay = 0.0
            job = await h.client.runs.train(rid)  # answers again once the trainer does: the same job
            assert (await h.client.runs.train_job(rid)).id == job.id
            assert list(trainer.jobs) == [job.id]


# ---- the trainer's answer to POST /jobs is lost: never a second job ------------------------------
def lost_answer(kind: str) -> Exception:
    """What the orchestrator's client sees when the trainer made the job but its answer never came."""
    return (httpx.ReadTimeout("the answer never came") if kind == "timeout"
            else httpx.RemoteProtocolError("Server disconnected without sending a response."))


async def trained_run(h) -> str:
    rid = (await h.client.runs.create(RunConfig(base_instruction="Write a riddle.", nodes=1, rounds=0))).id
    await h.wait(rid)
    await h.client.runs.qa(rid)
    return rid


async def test_a_lost_create_answer_is_retried_with_the_same_key(make_harness):
    trainer = MockTrainer()
    async with make_harness(script=script, trainer=trainer) as h:
        rid = await trained_run(h)
        trainer.lose_answers = [lost_answer("timeout"), lost_answer("drop")]
        job = await h.client.runs.train(rid)
        assert trainer.creates == 3 and list(trainer.jobs) == [job.id]  # three tries, one job
        sent = trainer.jobs[job.id][0]
        assert sent.idempotency_key and sent.idempotency_key.startswith(f"negspace-run-{rid}-train-")
        assert (await h.client.runs.get(rid)).train_job_id == job.id
        assert [e["job_id"] for e in train_events(h, rid)] == [job.id]
        assert h.orch.store.db.execute("SELECT train_key FROM runs WHERE id = ?", (rid,)).fetchone()[0] is None


async def test_a_retried_train_request_after_a_503_gets_the_first_job(make_harness):
    """Every try lost (503), then POST /runs/{id}/train again, after an orchestrator restart."""
    trainer = MockTrainer()
    async with make_harness(script=script, trainer=trainer) as h:
        rid = await trained_run(h)
        trainer.lose_answers = [lost_answer("drop"), lost_answer("timeout"), lost_answer("drop")]
        with pytest.raises(ServiceUnavailableError) as ei:
            await h.client.runs.train(rid)
        assert ei.value.message.startswith("trainer:") and "same key" in ei.value.message
        assert len(trainer.jobs) == 1 and (await h.client.runs.get(rid)).train_job_id is None
    async with make_harness(script=script, trainer=trainer) as h:  # the pending key was stored
        job = await h.client.runs.train(rid)
        assert list(trainer.jobs) == [job.id] and trainer.creates == 4
        assert (await h.client.runs.get(rid)).train_job_id == job.id
        await wait_for(lambda: train_events(h, rid)[-1]["status"] == "succeeded")
        again = await h.client.runs.train(rid)  # the job finished: a new request is a new job (new key)
        assert again.id != job.id and len(trainer.jobs) == 2
        assert trainer.jobs[again.id][0].idempotency_key != trainer.jobs[job.id][0].idempotency_key


@asynccontextmanager
async def lost_job(make_harness):
    """A trained run whose LoRA request the trainer took while its answers were lost (three timeouts):
    yields the harness, the trainer, the run and the lost job's id."""
    trainer = MockTrainer()
    async with make_harness(script=script, trainer=trainer, train_poll_s=3600) as h:
        rid = await trained_run(h)
        trainer.lose_answers = [lost_answer("timeout")] * 3
        with pytest.raises(ServiceUnavailableError):
            await h.client.runs.train(rid, TrainRequest(method="lora"))
        (lost_id,) = trainer.jobs
        yield h, trainer, rid, lost_id


async def test_a_retry_with_other_settings_adopts_the_lost_job(make_harness):
    async with lost_job(make_harness) as (h, trainer, rid, lost_id):
        trainer.jobs[lost_id] = (trainer.jobs[lost_id][0], -5)  # still running for a few polls
        with pytest.raises(ConflictError) as ei:  # not a second job: the first one is the run's
            await h.client.runs.train(rid, TrainRequest(method="full"))
        assert lost_id in ei.value.message and "answer was lost" in ei.value.message
        assert list(trainer.jobs) == [lost_id] and (await h.client.runs.get(rid)).train_job_id == lost_id
        assert [e["job_id"] for e in train_events(h, rid)] == [lost_id]
        with pytest.raises(ConflictError):  # recorded now: the usual "already has a job" answer
            await h.client.runs.train(rid, TrainRequest(method="full"))


async def test_a_retry_with_other_settings_after_the_lost_job_finished_creates_one(make_harness):
    async with lost_job(make_harness) as (h, trainer, rid, lost_id):
        trainer.jobs[lost_id] = (trainer.jobs[lost_id][0], 5)  # it has succeeded meanwhile
        job = await h.client.runs.train(rid, TrainRequest(method="full"))
        assert job.id != lost_id and trainer.jobs[job.id][0].method == "full" and len(trainer.jobs) == 2
        assert (await h.client.runs.get(rid)).train_job_id == job.id
        assert [e["job_id"] for e in train_events(h, rid)] == [lost_id, job.id]


async def test_concurrent_train_requests_make_one_job(make_harness):
    # the job runs through all three requests (a job that finished in between may be trained again)
    trainer = MockTrainer(running_polls=10)
    async with make_harness(script=script, trainer=trainer) as h:
        rid = await trained_run(h)
        results = await asyncio.gather(*(h.client.runs.train(rid) for _ in range(3)), return_exceptions=True)
        ids = {r.id for r in results if not isinstance(r, BaseException)}
        assert len(trainer.jobs) == 1 and ids == set(trainer.jobs)
        assert all(isinstance(r, ConflictError) for r in results if isinstance(r, BaseException))
        assert len(train_events(h, rid)) == 1


def test_an_orchestrator_db_from_before_train_keys_gets_the_column(tmp_path):
    import sqlite3

    from negspace_orchestrator.store import Store

    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, mode TEXT NOT NULL, status TEXT NOT NULL, "
                "config TEXT NOT NULL, target INTEGER NOT NULL, round INTEGER NOT NULL DEFAULT 0, error TEXT, "
                "paused_reason TEXT, collection TEXT NOT NULL, train_job_id TEXT, created_at REAL NOT NULL, "
                "updated_at REAL NOT NULL)")
    old.commit()
    old.close()
    store = Store(tmp_path / "old.db")
    try:
        store.create_run("r1", RunConfig(base_instruction="x", nodes=1, rounds=0), 1, "c")
        key = store.train_key("r1")
        assert store.train_key("r1") == key  # kept until a job is recorded
        store.set_train_job("r1", "j1")
        assert store.train_key("r1") != key
    finally:
        store.close()


async def test_one_job_per_run_and_seed(make_harness):
    trainer = MockTrainer()
    async with make_harness(script=script, trainer=trainer) as h:
        rid = await trained_run(h)
        jobs = {s: await h.client.runs.train(rid, TrainRequest(method="lora"), seed=s) for s in (1, 2, 3)}
        assert len({j.id for j in jobs.values()}) == 3 and len(trainer.jobs) == 3
        assert [trainer.jobs[jobs[s].id][0].training.seed for s in (1, 2, 3)] == [1, 2, 3]
        # repeated: the same job, none created; GET ?seed= reports it; the run's own job is apart
        again = await h.client.runs.train(rid, TrainRequest(method="lora"), seed=2)
        assert again.id == jobs[2].id and len(trainer.jobs) == 3
        assert (await h.client.runs.train_job(rid, seed=3)).id == jobs[3].id
        with pytest.raises(NotFoundError):
            await h.client.runs.train_job(rid, seed=4)
        with pytest.raises(NotFoundError):
            await h.client.runs.train_job(rid)  # no unseeded job yet
        own = await h.client.runs.train(rid)
        assert own.id not in {j.id for j in jobs.values()} and len(trainer.jobs) == 4
        assert [e["seed"] for e in train_events(h, rid) if "seed" in e] == [1, 2, 3]


def parity(word: str) -> int:
    return int(word.lstrip("w")) % 2


def numeric_script(req: ChatCompletionRequest) -> str:
    """Q/A pairs whose answers end in a number; the self-consistency check's second answer agrees
    when the instruction's first word (``w<n>``) has an even ``n`` and disagrees when it is odd."""
    content = req.messages[0].content
    if content.startswith(prompts.CHECK_PROMPT):
        question = content[len(prompts.CHECK_PROMPT):]
        word = question.split()[2]
        return f"So the total is {12 if parity(word) == 0 else 13}."
    if not content.startswith(prompts.QA_PROMPT):
        return seeded_text(req.seed or 0)
    instruction = content[len(prompts.QA_PROMPT):].split("\n\n")[0]
    return f"Question: What about {instruction}?\nAnswer: Adding them up gives 12."


async def test_self_consistency_rejects_pairs_whose_second_answer_disagrees(make_harness):
    async with make_harness(script=numeric_script) as h:
        rid = (await h.client.runs.create(RunConfig(base_instruction="Write a math problem.", nodes=2, rounds=2,
                                                    seed=3))).id
        await h.wait(rid)
        insts = await h.client.runs.instructions(rid)
        even = sum(parity(prompts.clean_instruction(i.text).split()[0]) == 0 for i in insts)
        n_before = sum(len(n.requests) for n in h.nodes)
        result = await h.client.runs.qa(rid, QARequest(self_consistency=True))
        assert result.consistency == {"agreed": even, "disagreed": len(insts) - even, "unchecked": 0}
        assert (result.converted, result.rejected) == (even, len(insts) - even)
        assert result.rejections == ({"inconsistent": len(insts) - even} if even < len(insts) else {})
        assert sum(len(n.requests) for n in h.nodes) - n_before == 2 * len(insts)  # one more call per pair
        assert 0 < even < len(insts)  # the seeds give both cases


async def test_self_consistency_is_off_by_default(make_harness):
    async with make_harness(script=numeric_script) as h:
        rid = (await h.client.runs.create(RunConfig(base_instruction="Write a math problem.", nodes=2, rounds=1,
                                                    seed=3))).id
        await h.wait(rid)
        result = await h.client.runs.qa(rid)
        assert result.consistency is None and result.rejected == 0
        assert not any(r.messages[0].content.startswith(prompts.CHECK_PROMPT)
                       for n in h.nodes for r in n.requests)


def test_final_number_and_consistency():
    assert prompts.final_number("She has 3 apples, then 1,200 more: 1,203.") == 1203.0
    assert prompts.final_number("no digits here") is None
    assert prompts.consistent("so 12 apples", "The answer is 12.") is True
    assert prompts.consistent("so 12 apples", "The answer is 12.5") is False
    assert prompts.consistent("a long explanation", "The answer is 12") is None
