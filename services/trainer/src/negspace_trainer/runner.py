"""The job queue: one job at a time, each in its own worker process (``negspace_trainer.worker``).

A job's worker runs in its own process group, so the API stays responsive while it trains, a
crash (or the OOM killer) takes only the worker, and cancel can end the worker and its children.
The runner polls the worker's ``progress.json`` into the job's SQLite row and, when the worker
exits, records ``succeeded`` (``result.json``), ``failed`` (``error.json``, or the exit code /
signal when the worker could not say) or ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from negspace_contracts.errors import (
    BadRequestError,
    ConflictError,
    NegspaceError,
    NotFoundError,
    RateLimitError,
)
from negspace_contracts.orchestrator import OrchestratorClient
from negspace_contracts.trainer import TERMINAL_JOB_STATUSES, ChatRecord, Job, JobRequest
from pydantic import ValidationError

from negspace_trainer.settings import TrainerSettings
from negspace_trainer.store import JobStore, now

log = logging.getLogger("negspace.trainer")

RESTART_REASON = "interrupted by service restart: the worker was lost when the trainer stopped; submit the job again"
SHUTDOWN_REASON = "interrupted: the trainer service shut down while the job ran"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = ": out of memory, or ended from outside" if -returncode == signal.SIGKILL else ""
        return f"worker killed by signal {-returncode} ({name}{hint}); see GET /jobs/{{id}}/logs"
    return f"worker exited with code {returncode} without a result; see GET /jobs/{{id}}/logs"


def _kill_orphan(pid: int, job_dir: Path) -> bool:
    """A worker left by a previous service process may still be training: end its group, but only
    if that pid really is this job's worker (pids are reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"negspace_trainer.worker" not in cmdline or str(job_dir).encode() not in cmdline:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return True


MAX_DATASET_FILE_BYTES = 1024 * 1024 * 1024


def read_dataset_file(source: str) -> list[dict]:
    """A ``dataset.path`` on this machine, checked when the job is submitted (a missing file, an
    empty one or a line that is not a chat record answers 422 naming the line) and copied into
    the job, so editing the file later does not change what the job trains on. http(s) URLs are
    fetched by the worker."""
    try:
        path = Path(source).expanduser()
        is_file = path.is_file()
    except (OSError, ValueError, RuntimeError):  # e.g. a NUL byte, an unknown ~user
        is_file = False
    if not is_file:
        raise BadRequestError(f"dataset.path {source!r} is not a file on the trainer's machine (give a JSONL "
                              "file of chat records, an http(s) URL, inline records or an orchestrator run_id)",
                              param="dataset.path", status_code=422)
    if path.stat().st_size > MAX_DATASET_FILE_BYTES:
        raise BadRequestError(f"dataset.path {source!r} is larger than {MAX_DATASET_FILE_BYTES} bytes",
                              param="dataset.path", status_code=422)
    records = []
    try:
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(ChatRecord.model_validate_json(line).model_dump())
                except ValidationError as exc:
                    err = exc.errors()[0]
                    where = ".".join(str(p) for p in err.get("loc", ())) or "record"
                    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
                    raise BadRequestError(f"dataset.path {source!r} line {number} is not a chat record "
                                          f'{{"messages": [{{"role", "content"}}, ...]}}: {where}: {msg}',
                                          param="dataset.path", status_code=422) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"cannot read dataset.path {source!r}: {exc}", param="dataset.path",
                              status_code=422) from None
    if not records:
        raise BadRequestError(f"dataset.path {source!r} holds no records: it needs at least one "
                              '{"messages": [...]} line', param="dataset.path", status_code=422)
    return records


class JobRunner:
    def __init__(self, settings: TrainerSettings, store: JobStore,
                 orchestrator: Callable[[], OrchestratorClient] | None = None, *,
                 start_worker: bool = True) -> None:
        """``start_worker=False``: jobs are accepted and stay queued (API tests, fuzzing)."""
        self.settings = settings
        self.start_worker = start_worker
        self.store = store
        self.jobs_dir = settings.resolved_workdir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._orchestrator = orchestrator or (lambda: OrchestratorClient(settings.orchestrator_url))
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._current: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._cancel_requested: set[str] = set()
        self.on_finish: Callable[[str], None] | None = None  # metrics hook: called with the status

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        for job in self.store.list("running"):
            row = self.store.row(job.id)
            if row is not None and row["pid"] and _kill_orphan(int(row["pid"]), self.job_dir(job.id)):
                log.warning("job %s: ended worker pid %s left by the previous service process", job.id, row["pid"])
        lost = self.store.fail_interrupted(RESTART_REASON)
        if lost:
            log.warning("marked %d job(s) interrupted by the restart as failed: %s", len(lost), ", ".join(lost))
        if self.start_worker:
            self._task = asyncio.create_task(self._loop(), name="trainer-job-loop")

    async def stop(self) -> None:
        if self._current is not None and self._proc is not None:
            job_id = self._current
            await self._terminate(self._proc, grace=min(self.settings.cancel_grace_s, 5.0))
            self._finish(job_id, "failed", error=SHUTDOWN_REASON)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def busy(self) -> str | None:
        return self._current

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # -- API operations ---------------------------------------------------------------------------
    def submit(self, request: JobRequest, records: list[dict] | None = None) -> Job:
        """Queue a job. ``records``: the dataset already read (``read_dataset_file``) for a path."""
        if self.store.count("queued") >= self.settings.max_queued:
            raise RateLimitError(f"{self.settings.max_queued} jobs are already queued; retry later",
                                 retry_after=60)
        job_id = uuid.uuid4().hex[:16]
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True)
        if request.base_model is None and self.settings.default_base_model:
            request = request.model_copy(update={"base_model": self.settings.default_base_model})
        (job_dir / "request.json").write_text(request.model_dump_json())
        if request.dataset.records is not None:
            records = [r.model_dump() for r in request.dataset.records]
        if records is not None:
            self._write_dataset(job_dir, records)
        self.store.create(job_id, request)
        self._wake.set()
        job = self.store.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r}", param="id")
        return job

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status in TERMINAL_JOB_STATUSES:
            raise ConflictError(f"job {job_id} is already {job.status}; only queued or running jobs can be cancelled")
        if job.status == "queued" and self.store.transition(job_id, "queued", status="cancelled",
                                                            error="cancelled while queued",
                                                            finished_at=now()):
            self._count(job_id, "cancelled")
            return self.get(job_id)
        # running (or just started): end the worker; the job loop records the outcome.
        self._cancel_requested.add(job_id)
        if self._current == job_id and self._proc is not None:
            await self._terminate(self._proc, grace=self.settings.cancel_grace_s)
        for _ in range(200):  # the loop records `cancelled` right after the worker exits
            if self.get(job_id).status in TERMINAL_JOB_STATUSES:
                break
            await asyncio.sleep(0.05)
        return self.get(job_id)

    def logs(self, job_id: str, tail: int | None = None) -> str:
        self.get(job_id)
        path = self.job_dir(job_id) / "worker.log"
        if not path.is_file():
            return ""
        text = path.read_text(errors="replace")
        if tail is not None:
            text = "\n".join(text.splitlines()[-tail:])
        return text

    # -- the loop ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            job_id = self.store.next_queued()
            if job_id is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._run(job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  (a runner bug must not stop the queue)
                log.exception("job %s: runner error", job_id)
                self._finish(job_id, "failed", error=f"trainer error while running the job: {exc!r}")
            finally:
                self._current = None
                self._proc = None

    def _write_dataset(self, job_dir: Path, records: list[dict]) -> None:
        tmp = job_dir / ".dataset.jsonl.tmp"
        with tmp.open("w") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        tmp.replace(job_dir / "dataset.jsonl")

    async def _fetch_run_dataset(self, job_dir: Path, run_id: str) -> None:
        client = self._orchestrator()
        try:
            records = await client.runs.qa_records(run_id)
        except NegspaceError as exc:
            raise RuntimeError(f"cannot fetch the Q/A dataset of orchestrator run {run_id!r} from "
                               f"{client.base_url}: {exc.message}") from None
        except ValueError as exc:
            raise RuntimeError(f"orchestrator run {run_id!r}: the Q/A dataset has a record that is "
                               f"not a chat record: {exc}") from None
        finally:
            await client.aclose()
        if not records:
            raise RuntimeError(f"orchestrator run {run_id!r} has no Q/A records yet: nothing to train on")
        self._write_dataset(job_dir, [r.model_dump() for r in records])

    async def _run(self, job_id: str) -> None:
        if not self.store.transition(job_id, "queued", status="running", started_at=now(),
                                     progress={"stage": "starting", "step": 0}):
            return  # cancelled meanwhile
        self._current = job_id
        job_dir = self.job_dir(job_id)
        job = self.get(job_id)
        assert job.request is not None
        if job.request.dataset.run_id is not None:
            self.store.update(job_id, progress={"stage": "fetching dataset", "step": 0})
            try:
                await self._fetch_run_dataset(job_dir, job.request.dataset.run_id)
            except RuntimeError as exc:
                self._finish(job_id, "failed", error=str(exc))
                return
        if job_id in self._cancel_requested:
            self._finish(job_id, "cancelled", error="cancelled")
            return

        env = dict(os.environ)
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.settings.worker_threads:
            env["NEGSPACE_TRAINER_THREADS"] = str(self.settings.worker_threads)
        with (job_dir / "worker.log").open("ab") as logfile:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "negspace_trainer.worker", str(job_dir),
                stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True)
        self._proc = proc
        self.store.update(job_id, pid=proc.pid)
        log.info("job %s: worker pid %d", job_id, proc.pid)
        if job_id in self._cancel_requested:
            await self._terminate(proc, grace=self.settings.cancel_grace_s)
        while True:
            try:
                await asyncio.wait_for(proc.wait(), timeout=self.settings.poll_interval_s)
                break
            except TimeoutError:
                self._sync_progress(job_id, job_dir)
        self._sync_progress(job_id, job_dir)
        rc = proc.returncode
        assert rc is not None
        # A worker's own children (none today) must not outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if job_id in self._cancel_requested:
            self._cancel_requested.discard(job_id)
            self._finish(job_id, "cancelled", error="cancelled while running")
            return
        result = _read_json(job_dir / "result.json")
        if rc == 0 and result is not None:
            self._finish(job_id, "succeeded", eval=result.get("eval") or {})
            return
        err = _read_json(job_dir / "error.json")
        message = (err or {}).get("error") or exit_reason(rc).replace("{id}", job_id)
        self._finish(job_id, "failed", error=message)

    def _sync_progress(self, job_id: str, job_dir: Path) -> None:
        state = _read_json(job_dir / "progress.json")
        if state is None:
            return
        self.store.update(job_id, progress={k: state.get(k) for k in ("stage", "step", "total_steps")},
                          losses=state.get("losses") or [])

    async def _terminate(self, proc: asyncio.subprocess.Process, grace: float) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def _finish(self, job_id: str, status: str, *, error: str | None = None,
                eval: dict | None = None) -> None:
        fields: dict[str, Any] = {"status": status, "error": error, "finished_at": now(), "pid": None}
        if eval is not None:
            fields["eval"] = eval
        self.store.update(job_id, **fields)
        log.info("job %s: %s%s", job_id, status, f" ({error})" if error else "")
        self._count(job_id, status)

    def _count(self, job_id: str, status: str) -> None:
        if self.on_finish is not None:
            self.on_finish(status)

    def artifacts_root(self, job_id: str) -> Path:
        self.get(job_id)
        return self.job_dir(job_id)

