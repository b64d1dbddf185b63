"""Exports: a run's datasets as files others can load, in a folder confined to the data folder:
``hf`` (a ``datasets.load_from_disk`` folder), ``parquet`` or ``jsonl``, one writer per format in
``WRITERS`` (where a new format goes), each with a ``README.md`` dataset card whose YAML header the Hugging
Face Hub understands (configs and their data files, license, task categories) and whose body
says how the data was made: the method, the full run config, the model and embedder, the seeds,
the diversity metrics, the counts and the Q/A rejection reasons, the negspace version.

Two configs (``datasets`` splits in the ``hf`` format): ``instructions`` (text, node, round,
attempt, scale, similarity) and ``qa`` (chat ``messages``). The Q/A conversion's folder
(``qa.jsonl`` and ``dataset/``) is written by the same writers (``write_qa_folder``).
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from negspace_contracts.controller import MetricsResponse
from negspace_contracts.errors import BadRequestError, ConflictError, NegspaceError
from negspace_contracts.orchestrator import (
    EXPORT_FORMATS,
    ExportRequest,
    ExportResult,
    Instruction,
    RunConfig,
)
from negspace_contracts.trainer import ChatRecord

from negspace_orchestrator import __version__
from negspace_orchestrator.dependencies import Dependencies
from negspace_orchestrator.store import RunRow, Store

CONFIGS = ("instructions", "qa")
EXPORT_BATCH = 1000  # rows per store query and per written chunk


@dataclass
class ExportInfo:
    """What the card tells about the run (everything but the rows)."""

    run_id: str
    mode: str
    status: str
    config: RunConfig
    attempts: int
    qa_total: int = 0
    qa_converted: int = 0
    qa_rejections: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    embedder: str | None = None
    metrics: dict[str, Any] | None = None
    metrics_note: str | None = None
    license: str = "other"


def instruction_rows(instructions: list[Instruction]) -> list[dict[str, Any]]:
    return [{"id": i.id, "text": i.text, "node": i.node, "round": i.round, "attempt": i.attempt,
             "scale": i.guidance_scale, "similarity": i.max_similarity} for i in instructions]


def qa_rows(records: list[ChatRecord]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in records]


def _features():
    import datasets

    instr = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                               "node": datasets.Value("int64"), "round": datasets.Value("int64"),
                               "attempt": datasets.Value("int64"), "scale": datasets.Value("float64"),
                               "similarity": datasets.Value("float64")})
    qa = datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                       "content": datasets.Value("string")})})
    return {"instructions": instr, "qa": qa}


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def data_files(fmt: str) -> dict[str, str]:
    """Each config's data files, relative to the export folder (what the card's YAML names)."""
    return {c: WRITERS[fmt].data_file(c) for c in CONFIGS}


def card(info: ExportInfo, fmt: str, n_instructions: int, n_qa: int) -> str:
    files = data_files(fmt)
    present = [c for c, n in (("instructions", n_instructions), ("qa", n_qa)) if n]
    header = {
        "pretty_name": f"negspace {info.mode} run {info.run_id}",
        "license": info.license,
        "task_categories": ["text-generation", "question-answering"],
        "tags": ["synthetic", "negspace", f"negspace-{info.mode}"],
        "size_categories": [_size_category(max(n_instructions, n_qa))],
        "configs": [{"config_name": c, "data_files": [{"split": "train", "path": files[c]}],
                     **({"default": True} if c == present[-1] else {})} for c in present],
    }
    cfg = info.config
    method = (f"guided generation with negative prompts: each node rewrites the base instruction; when the "
              f"new text's max cosine similarity to the stored ones is >= {cfg.similarity_threshold}, it is "
              f"generated again with the {cfg.negatives.k} nearest dense-region instructions as negative "
              f"prompts (classifier-free-guidance style, scale {cfg.guidance.start} + {cfg.guidance.step} per "
              f"retry, at most {cfg.guidance.max_retries} retries; negative form: {cfg.negative_format})"
              if info.mode == "guided" else
              "baseline: plain sampling of the same augmentation prompt, no negatives, no similarity check"
              + (f" (as many instructions as run {cfg.match_run})" if cfg.match_run else ""))
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# negspace {info.mode} run `{info.run_id}`", "",
             f"Synthetic instructions generated by negspace {__version__} from the base instruction "
             f"**{cfg.base_instruction}**, and the question/answer pairs made from them.", "",
             "## Configs", "",
             f"- `instructions` ({n_instructions} rows): text, node, round, attempt, scale (guidance scale; "
             "null for the baseline and round 0), similarity (max cosine similarity to the earlier ones).",
             f"- `qa` ({n_qa} rows): `messages`, one user question and one assistant answer."
             + ("" if n_qa else " Not included: the run has no Q/A pairs yet (POST /runs/{id}/qa)."), "",
             "## How it was made", "", f"- Method: {method}.",
             f"- Generation model: {info.model or 'unknown (the node did not say)'}",
             f"- Embedder: {info.embedder or 'unknown (the controller did not say)'}",
             f"- Seeds: run seed {cfg.seed}; every generation's seed is derived from it and its "
             "(node, round, attempt), each Q/A conversion's from it and the instruction id.",
             f"- Status: {info.status}; {n_instructions} instructions accepted out of {info.attempts} attempts.",
             f"- Q/A: {info.qa_converted} of {info.qa_total} instructions converted"
             + (", rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(info.qa_rejections.items()))
                if info.qa_rejections else "") + ".",
             "", "## Diversity metrics", ""]
    if info.metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in info.metrics.items() if isinstance(v, (int, float))]
    else:
        lines.append(f"Not available: {info.metrics_note or 'no controller'}.")
    lines += ["", "## Run config", "", "```json", json.dumps(cfg.model_dump(mode="json"), indent=2), "```", ""]
    return "\n".join(lines)


def parse_card(text: str) -> dict[str, Any]:
    """The YAML header of a card written by ``card``."""
    if not text.startswith("---\n"):
        raise ValueError("no YAML header")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


# ---- the formats: one writer per format, in WRITERS ------------------------------------------
# A new export format is a writer class here (``data_file``, ``add``, ``close``, ``counts``), its
# entry in WRITERS, and its name in ``negspace_contracts.orchestrator.ExportFormat`` (the wire).
class _FilePerConfig:
    """A writer with one file per config under ``out_dir``, opened when its first rows come."""

    suffix = ""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.counts: dict[str, int] = {}
        self._files: dict[str, Any] = {}

    @classmethod
    def data_file(cls, config: str) -> str:
        return f"{config}.{cls.suffix}"

    def add(self, config: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if config not in self._files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._files[config] = self._open(config)
        self.counts[config] = self.counts.get(config, 0) + len(rows)
        self._write(self._files[config], config, rows)

    def _open(self, config: str) -> Any:
        raise NotImplementedError

    def _write(self, f: Any, config: str, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError


class JsonlWriter(_FilePerConfig):
    """``<config>.jsonl``: one JSON object a line, appended as rows come; each file is written under
    a temporary name and moved into place on ``close``."""

    suffix = "jsonl"

    def _open(self, config: str) -> Any:
        return (self.out_dir / f"{self.data_file(config)}.tmp").open("w", encoding="utf-8")

    def _write(self, f: Any, config: str, rows: list[dict[str, Any]]) -> None:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def close(self) -> None:
        for config, f in self._files.items():
            f.close()
            Path(f.name).replace(self.out_dir / self.data_file(config))


class ParquetWriter(_FilePerConfig):
    """``<config>.parquet``: one row group per batch, with the ``datasets`` features in its schema."""

    suffix = "parquet"

    def _open(self, config: str) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetWriter(str(self.out_dir / self.data_file(config)), _features()[config].arrow_schema)

    def _write(self, f: Any, config: str, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        f.write_table(pa.Table.from_pylist(rows, schema=f.schema))   # carries the datasets features

    def close(self) -> None:
        for f in self._files.values():
            f.close()


class HFWriter:
    """A ``datasets.load_from_disk`` folder: the rows go to parquet files in a temporary folder, which
    ``close`` turns into a ``save_to_disk`` folder through memory-mapped Arrow (``datasets`` never
    holds the rows in memory): a ``DatasetDict`` with one split per config, or with ``splits=False``
    the one config as a plain ``Dataset`` (the Q/A folder's ``dataset/``)."""

    def __init__(self, out_dir: Path, *, splits: bool = True) -> None:
        self.out_dir, self.splits = out_dir, splits
        self._tmp = tempfile.TemporaryDirectory(prefix="negspace-export-")
        self._parquet = ParquetWriter(Path(self._tmp.name))
        self.counts = self._parquet.counts

    @staticmethod
    def data_file(config: str) -> str:
        return f"{config}/data-*.arrow"

    def add(self, config: str, rows: list[dict[str, Any]]) -> None:
        self._parquet.add(config, rows)

    def close(self) -> None:
        try:
            self._parquet.close()
            if not self.counts:
                return
            import datasets

            feats = _features()
            with _DATASETS_LOCK:
                sets = {c: datasets.Dataset.from_parquet(str(self._parquet.out_dir / self._parquet.data_file(c)),
                                                         features=feats[c],
                                                         cache_dir=str(Path(self._tmp.name) / "cache"))
                        for c in CONFIGS if self.counts.get(c)}
                if self.splits:
                    datasets.DatasetDict(sets).save_to_disk(str(self.out_dir))
                else:
                    (one,) = sets.values()
                    one.save_to_disk(str(self.out_dir))
        finally:
            self._tmp.cleanup()


#: ``datasets`` is not safe to call from several threads at once: ``Dataset.from_parquet`` resolves its
#: files through tqdm's ``thread_map``, whose ``ensure_lock`` sets and then deletes a class-level
#: ``tqdm._lock``, so two concurrent exports (two runs' Q/A folders written by ``asyncio.to_thread``)
#: raced into ``AttributeError: type object 'tqdm' has no attribute '_lock'`` and a 500. One export
#: builds its ``datasets`` folder at a time; the rows are already on disk as Parquet, so this part is short.
_DATASETS_LOCK = threading.Lock()

WRITERS: dict[str, type[JsonlWriter | ParquetWriter | HFWriter]] = {
    "hf": HFWriter, "parquet": ParquetWriter, "jsonl": JsonlWriter}
assert tuple(WRITERS) == EXPORT_FORMATS, "every wire format has its writer"


class ExportWriter:
    """One export, at flat memory: ``add`` hands a config's rows to the format's writer as they come;
    ``finish`` closes it and writes the card. A config that got no rows is left out (``datasets``
    cannot load an empty saved split back)."""

    def __init__(self, out_dir: Path, fmt: str) -> None:
        if fmt not in WRITERS:
            raise ValueError(f"format must be one of {', '.join(WRITERS)}")
        self.out_dir, self.fmt = out_dir, fmt
        out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = WRITERS[fmt](out_dir)

    def add(self, config: str, rows: list[dict[str, Any]]) -> None:
        self.writer.add(config, rows)

    def finish(self, info: ExportInfo) -> list[Path]:
        """Close the files, write the card; return the files written."""
        self.writer.close()
        counts = self.writer.counts
        if not any(counts.values()):
            raise ValueError("nothing to export: the run has no instructions")
        (self.out_dir / "README.md").write_text(card(info, self.fmt, counts.get("instructions", 0),
                                                     counts.get("qa", 0)))
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())


async def write_qa_folder(out_dir: Path, batches: Iterator[list[ChatRecord]]) -> tuple[Path, Path | None]:
    """The Q/A conversion's folder: ``qa.jsonl`` and a ``datasets.load_from_disk`` folder ``dataset/``
    (none without records), written by the ``jsonl`` and ``hf`` writers. The batches are read on the
    loop (the store's connection), the files written off it."""
    jsonl, hf = JsonlWriter(out_dir), HFWriter(out_dir / "dataset", splits=False)
    for batch in batches:
        rows = qa_rows(batch)
        for w in (jsonl, hf):
            await asyncio.to_thread(w.add, "qa", rows)
    for w in (jsonl, hf):
        await asyncio.to_thread(w.close)
    path = out_dir / jsonl.data_file("qa")
    if not jsonl.counts:
        await asyncio.to_thread(path.write_text, "")  # no record converted: the file is there, empty
    return path, hf.out_dir if hf.counts else None


# ---- the export folder ------------------------------------------------------------------------
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
    return qa_export_dir(data_dir, export_dir, "")


def qa_export_dir(data_dir: Path, export_dir: str | None, run_id: str) -> Path:
    """``export_dir`` (confined, made if missing), or ``<data_dir>/<run_id>/qa`` when it is not given."""
    data_dir.mkdir(parents=True, exist_ok=True)
    out_dir = resolve_export_dir(data_dir, export_dir) if export_dir else data_dir.resolve() / run_id / "qa"
    out_dir.mkdir(parents=True, exist_ok=True)
    if export_dir:  # a link swapped in while the folders were made must not lead out either
        resolve_export_dir(data_dir, str(out_dir))
    return out_dir


# ---- an export of one run ---------------------------------------------------------------------
class Exports:
    """Writes a run's export: the rows from the store, the card's model and embedder asked of the
    node and the run's controller (the card says so when they cannot tell), its metrics through ``metrics``."""

    def __init__(self, store: Store, deps: Dependencies, metrics: Callable[[str], Awaitable[MetricsResponse]],
                 *, exports_dir: Path) -> None:
        self.store = store
        self.deps = deps
        self.metrics = metrics
        self.exports_dir = exports_dir

    async def info(self, run: RunRow, license: str) -> ExportInfo:
        """Everything the dataset card says about the run."""
        store = self.store
        converted, rejected = store.qa_counts(run.id)
        info = ExportInfo(run_id=run.id, mode=run.mode, status=run.status, config=run.config,
                          attempts=store.counts(run.id)[1], qa_total=converted + rejected,
                          qa_converted=converted, qa_rejections=store.qa_rejections(run.id), license=license)
        for node in self.deps.nodes[:1]:
            try:
                models = await asyncio.wait_for(node.models.list(), timeout=10.0)
                info.model = ", ".join(m.id for m in models.data) or None
            except (NegspaceError, TimeoutError):
                pass
        ctl = self.deps.controllers.get(run.controller or "")  # the run's own replica (its embedder)
        if ctl is not None:
            try:
                health = await asyncio.wait_for(ctl.health(), timeout=10.0)
                info.embedder = str(health.info.get("embedder")) if health.info.get("embedder") else None
            except (NegspaceError, TimeoutError):
                pass
        if store.counts(run.id)[0]:
            try:
                info.metrics = (await self.metrics(run.id)).model_dump(mode="json")
            except (NegspaceError, TimeoutError) as exc:
                info.metrics_note = f"the controller did not answer ({getattr(exc, 'message', exc)})"
        else:
            info.metrics_note = "the run has no instructions"
        return info

    def _ready(self, run: RunRow) -> None:
        if run.status in ("queued", "running"):
            raise ConflictError(f"run {run.id} is {run.status}; export it once it has finished")
        if self.store.counts(run.id)[0] == 0:
            raise ConflictError(f"run {run.id} has no accepted instructions to export")

    async def _write(self, run: RunRow, fmt: str, out_dir: Path, license: str) -> list[Path]:
        """Rows read a batch at a time on the loop (the store's connection), written off it."""
        info = await self.info(run, license)
        writer = await asyncio.to_thread(ExportWriter, out_dir, fmt)
        for batch in self.store.iter_instructions(run.id, batch=EXPORT_BATCH):
            await asyncio.to_thread(writer.add, "instructions", instruction_rows(batch))
        for records in self.store.iter_qa_records(run.id, batch=EXPORT_BATCH):
            await asyncio.to_thread(writer.add, "qa", qa_rows(records))
        return await asyncio.to_thread(writer.finish, info)

    async def to_folder(self, run: RunRow, req: ExportRequest) -> ExportResult:
        """The export written inside the data folder."""
        self._ready(run)
        default = f"{run.id}/export-{req.format}"
        try:
            out_dir = await asyncio.to_thread(make_export_dir, self.exports_dir, req.export_dir or default)
            files = await self._write(run, req.format, out_dir, req.license)
        except OSError as exc:
            raise BadRequestError(f"cannot write the export to {req.export_dir or default!r} under "
                                  f"{str(self.exports_dir)!r}: {exc.strerror or exc}", param="export_dir") from exc
        return ExportResult(run_id=run.id, format=req.format, path=str(out_dir), files=[str(f) for f in files],
                            instructions=self.store.counts(run.id)[0], qa=self.store.qa_counts(run.id)[0])

    async def to_archive(self, run: RunRow, fmt: str, license: str) -> tuple[Path, tempfile.TemporaryDirectory]:
        """The same export as a tar archive (the folder's files at its root), written to a
        temporary file so it can be streamed at flat memory; the caller removes the folder
        (``cleanup()``) once it has sent the file."""
        self._ready(run)
        tmp = tempfile.TemporaryDirectory(prefix="negspace-archive-")
        try:
            folder = Path(tmp.name) / "export"
            await self._write(run, fmt, folder, license)
            tar_path = Path(tmp.name) / "export.tar"

            def pack() -> None:
                with tarfile.open(tar_path, mode="w") as tar:
                    for f in sorted(folder.rglob("*")):
                        if f.is_file():
                            tar.add(f, arcname=str(f.relative_to(folder)))

            await asyncio.to_thread(pack)
        except BaseException:
            tmp.cleanup()
            raise
        return tar_path, tmp
