"""Exports: hf / parquet / jsonl round trips, the dataset card, the confinement, the tar archive."""

from __future__ import annotations

import io
import json
import tarfile

import datasets
import pytest
from negspace_contracts.errors import BadRequestError, NegspaceError, NotFoundError
from negspace_contracts.orchestrator import ExportRequest, QARequest, RunConfig
from negspace_orchestrator import export as export_mod

from .test_qa_train import HOPELESS, script  # noqa: TID252


async def converted_run(h) -> str:
    rid = (await h.client.runs.create(RunConfig(base_instruction="Write a riddle.", nodes=2, rounds=1, seed=3))).id
    await h.wait(rid)
    HOPELESS.clear()
    await h.client.runs.qa(rid, QARequest())
    return rid


def stored(h, rid):
    instr = export_mod.instruction_rows(h.orch.store.instructions(rid))
    qa = export_mod.qa_rows(h.orch.store.qa_records(rid))
    assert instr and qa
    return instr, qa


def check_card(folder, fmt: str, rid: str) -> dict:
    text = (folder / "README.md").read_text()
    header = export_mod.parse_card(text)
    assert [c["config_name"] for c in header["configs"]] == ["instructions", "qa"]
    paths = [c["data_files"][0]["path"] for c in header["configs"]]
    assert paths == [export_mod.data_files(fmt)[c] for c in ("instructions", "qa")]
    for p in paths:  # every file the card names exists
        assert list(folder.glob(p)), p
    assert header["license"] == "other" and "text-generation" in header["task_categories"]
    # the body: the method, the full run config, the seeds, the counts, the version
    assert f"run `{rid}`" in text and '"base_instruction": "Write a riddle."' in text
    assert "Seeds: run seed 3" in text and "negspace 0.1.0" in text and "4 instructions accepted" in text
    assert "Q/A: 4 of 4 instructions converted" in text
    # the controller's diversity metrics of the run; the mock node names no model, and the card says so
    assert "| semantic_diversity | 0.5 |" in text and "| vendi_score | 4.0 |" in text
    assert "Generation model: unknown (the node did not say)" in text
    return header


async def test_hf_export_round_trips_and_carries_a_card(make_harness, tmp_path):
    async with make_harness(script=script) as h:
        rid = await converted_run(h)
        res = await h.client.runs.export(rid, ExportRequest(format="hf"))
        folder = tmp_path / "exports" / rid / "export-hf"
        assert res.path == str(folder.resolve()) and (res.instructions, res.qa) == (4, 4)
        dd = datasets.load_from_disk(str(folder))
        instr, qa = stored(h, rid)
        assert dd["instructions"].to_list() == instr and dd["qa"].to_list() == qa
        assert set(dd["instructions"].column_names) >= {"text", "node", "round", "attempt", "scale", "similarity"}
        check_card(folder, "hf", rid)


async def test_parquet_and_jsonl_exports_round_trip(make_harness, tmp_path):
    async with make_harness(script=script) as h:
        rid = await converted_run(h)
        instr, qa = stored(h, rid)
        await h.client.runs.export(rid, ExportRequest(format="parquet", export_dir="pq"))
        folder = tmp_path / "exports" / "pq"
        for name, rows in (("instructions", instr), ("qa", qa)):
            ds = datasets.load_dataset("parquet", data_files=str(folder / f"{name}.parquet"), split="train")
            assert ds.to_list() == rows
        check_card(folder, "parquet", rid)
        await h.client.runs.export(rid, ExportRequest(format="jsonl", export_dir="js"))
        lines = (tmp_path / "exports" / "js" / "qa.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == qa
        check_card(tmp_path / "exports" / "js", "jsonl", rid)


async def test_the_archive_unpacks_to_the_same_export(make_harness, tmp_path):
    async with make_harness(script=script) as h:
        rid = await converted_run(h)
        body = await h.client.runs.export_archive(rid, "hf")
        out = tmp_path / "unpacked"
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            tar.extractall(out, filter="data")
        dd = datasets.load_from_disk(str(out))
        instr, qa = stored(h, rid)
        assert dd["instructions"].to_list() == instr and dd["qa"].to_list() == qa
        check_card(out, "hf", rid)


async def test_export_refuses_folders_outside_the_data_dir_and_unknown_runs(make_harness):
    async with make_harness(script=script) as h:
        rid = await converted_run(h)
        with pytest.raises(BadRequestError) as e:
            await h.client.runs.export(rid, ExportRequest(export_dir="../outside"))
        assert e.value.param == "export_dir"
        with pytest.raises(NotFoundError):
            await h.client.runs.export("no-such-run")
        with pytest.raises(NegspaceError) as e:  # an unknown format is a 4xx naming it
            await h.client.send("POST", f"/runs/{rid}/export", json_body={"format": "csv"})
        assert 400 <= e.value.status_code < 500 and "format" in str(e.value.message)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_the_writer_streams_at_flat_memory(tmp_path, fmt):
    """Issue 15: an export is written a batch at a time, so its peak Python memory does not grow
    with the run: 40 batches of 1,000 rows peak within 1.5x of 4 batches (a writer that kept
    the rows would peak ~10x higher), and every row arrives, in order."""
    import tracemalloc

    info = export_mod.ExportInfo(run_id="r", mode="guided", status="completed",
                                 config=RunConfig(base_instruction="Write a math problem."), attempts=0)

    def batch(b: int) -> list[dict]:
        return [{"id": f"{b}-{i}", "text": f"instruction {b} {i} " + "word " * 30, "node": i % 64, "round": b,
                 "attempt": 0, "scale": 1.0, "similarity": 0.5} for i in range(1000)]

    def peak(batches: int) -> int:
        out = tmp_path / f"{fmt}-{batches}"
        tracemalloc.start()
        w = export_mod.ExportWriter(out, fmt)
        for b in range(batches):
            w.add("instructions", batch(b))
        w.finish(info)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    peak(1)  # imports and first-use caches are not the export's
    small, large = peak(4), peak(40)
    assert large < 1.5 * small, (small, large)
    out = tmp_path / f"{fmt}-40"
    if fmt == "jsonl":
        ids = [json.loads(line)["id"] for line in (out / "instructions.jsonl").read_text().splitlines()]
    elif fmt == "parquet":
        ids = datasets.load_dataset("parquet", data_files=str(out / "instructions.parquet"), split="train")["id"]
    else:
        ids = datasets.load_from_disk(str(out))["instructions"]["id"]
    assert ids == [f"{b}-{i}" for b in range(40) for i in range(1000)]


def test_hf_exports_from_several_threads_at_once(tmp_path, monkeypatch):
    """Two runs' Q/A folders are written at the same time (each in ``asyncio.to_thread``); ``datasets``
    resolves their files through tqdm's thread_map, whose ``ensure_lock`` reads the class lock, creates
    one if there is none and deletes it at the end: two threads that both found none both deleted it,
    ``AttributeError: ... no attribute '_lock'``, a 500 in the 4-experiment stack test. The window is
    widened here (lock creation made slow, no class lock to start with) so that the race is certain
    without the export's own lock."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import tqdm as tqdm_mod
    from datasets.utils import tqdm as hf_tqdm  # the class datasets' thread_map uses

    for cls in (tqdm_mod.tqdm, hf_tqdm):          # as in a fresh process: no class lock yet
        if "_lock" in cls.__dict__:
            monkeypatch.delattr(cls, "_lock")
    real_get_lock = hf_tqdm.get_lock.__func__

    def slow_get_lock(cls):
        time.sleep(0.2)
        return real_get_lock(cls)

    monkeypatch.setattr(hf_tqdm, "get_lock", classmethod(slow_get_lock))
    info = export_mod.ExportInfo(run_id="r", mode="guided", status="completed",
                                 config=RunConfig(base_instruction="Write a math problem."), attempts=0)

    def one(name: str) -> int:
        w = export_mod.ExportWriter(tmp_path / name, "hf")
        w.add("instructions", [{"id": f"{name}-{i}", "text": f"t {i}", "node": 0, "round": 0, "attempt": 0,
                                "scale": 1.0, "similarity": 0.5} for i in range(20)])
        w.finish(info)
        return len(datasets.load_from_disk(str(tmp_path / name))["instructions"])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, [f"x{i}" for i in range(4)])) == [20] * 4
