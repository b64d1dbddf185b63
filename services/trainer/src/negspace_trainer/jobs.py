"""The job queue: one worker process at a time, each in its own process group.

The service never imports torch: it resolves the dataset into ``<job_dir>/dataset.jsonl``,
writes ``job.json``, starts ``python -m negspace_trainer.worker <job_dir>`` and follows the files
the worker writes (progress, result) into the SQLite row. A cancel SIGTERMs the worker's group
(SIGKILL after a grace); a worker that dies by a signal it was not sent by a cancel fails the job
with ``worker killed by signal N``; rows a previous service process left ``running`` fail at
start-up with ``interrupted by a service restart``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
from negspace_contracts.errors import BadRequestError, NotFoundError, RateLimitError, ServiceUnavailableError
from negspace_contracts.orchestrator import OrchestratorClient
from negspace_contracts.trainer import ChatRecord, Job, JobRequest
from pydantic import ValidationError

from negspace_trainer import local_tasks
from negspace_trainer.settings import TrainerSettings
from negspace_trainer.store import JobStore, now
from negspace_trainer.worker import ARTIFACTS_DIR, DATASET_FILE, JOB_FILE, PROGRESS_FILE, RESULT_FILE

log = logging.getLogger("negspace.trainer")

LOG_FILE = "worker.log"
RESTART_REASON = "interrupted by a service restart"
SHUTDOWN_REASON = "interrupted: the trainer service shut down while the job was running"
MAX_DATASET_BYTES = 512 * 1024 * 1024


def _parse_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"{source} line {n} is not JSON ({exc.msg})", param="dataset",
                                  status_code=422) from exc
        if not isinstance(raw, dict) or "messages" not in raw:
            raise BadRequestError(f"{source} line {n} has no 'messages': each record must be "
                                  '{"messages": [{"role": ..., "content": ...}, ...]}',
                                  param="dataset", status_code=422)
        try:
            record = ChatRecord.model_validate({"messages": raw["messages"]})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            raise BadRequestError(f"{source} line {n}: {where}: {msg}", param="dataset",
                                  status_code=422) from exc
        records.append(record.model_dump(mode="json"))
    if not records:
        raise BadRequestError(f"{source} holds no records: send at least one chat record", param="dataset",
                              status_code=422)
    return records


class JobRunner:
    def __init__(self, settings: TrainerSettings, *, start_worker: bool = True) -> None:
        self.settings = settings
        self.root = settings.resolved_workdir
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.root / "jobs.db")
        self.tasks_dir = local_tasks.materialize(self.root / "local_tasks")
        self.start_worker = start_worker
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._running_id: str | None = None
        self._cancelling: set[str] = set()

    # ---- lifecycle ------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        for job in self.store.list("running"):
            row = self.store.row(job.id)
            if row is not None and row["pid"]:
                self._kill_orphan(int(row["pid"]), self.job_dir(job.id))
        ids = self.store.fail_interrupted(RESTART_REASON)
        if ids:
            log.warning("jobs %s were running when the service stopped: marked failed", ids)
        return ids

    @staticmethod
    def _kill_orphan(pid: int, job_dir: Path) -> None:
        """A worker of a previous service process may still run: stop it, if it really is that one."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        if b"negspace_trainer.worker" in cmdline and str(job_dir).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    async def start(self) -> None:
        self.recover()
        if self.start_worker:
            self._loop_task = asyncio.create_task(self._loop(), name="trainer-queue")
            self._wake.set()

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self.store.close()

    # ---- submission -----------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    async def resolve_records(self, request: JobRequest) -> list[dict[str, Any]]:
        ds = request.dataset
        if ds.records is not None:
            return [r.model_dump(mode="json") for r in ds.records]
        if ds.run_id is not None:
            async with OrchestratorClient(self.settings.orchestrator_url, timeout=120) as client:
                try:
                    records = await client.runs.qa_records(ds.run_id)
                except NotFoundError as exc:
                    raise BadRequestError(f"orchestrator has no run {ds.run_id!r}: {exc.message}",
                                          param="dataset.run_id", status_code=422) from exc
                except Exception as exc:
                    message = getattr(exc, "message", str(exc))
                    if getattr(exc, "status_code", 500) < 500:
                        raise BadRequestError(f"run {ds.run_id!r}: {message}", param="dataset.run_id",
                                              status_code=422) from exc
                    raise ServiceUnavailableError(f"cannot fetch run {ds.run_id!r} from the orchestrator at "
                                                  f"{self.settings.orchestrator_url}: {message}") from exc
            if not records:
                raise BadRequestError(f"run {ds.run_id!r} has no Q/A records", param="dataset.run_id",
                                      status_code=422)
            return [r.model_dump(mode="json") for r in records]
        path = ds.path or ""
        if path.startswith(("http://", "https://")):
            try:
                async with httpx.AsyncClient(timeout=120, follow_redirects=True) as http:
                    response = await http.get(path)
            except httpx.HTTPError as exc:
                raise BadRequestError(f"cannot fetch dataset {path}: {exc!r}", param="dataset.path",
                                      status_code=422) from exc
            if response.status_code != 200:
                raise BadRequestError(f"fetching dataset {path} answered {response.status_code}",
                                      param="dataset.path", status_code=422)
            return _parse_jsonl(response.text, path)
        file = Path(path).expanduser()
        if not file.is_file():
            raise BadRequestError(f"dataset path {path!r} is not a file on the trainer's machine",
                                  param="dataset.path", status_code=422)
        if file.stat().st_size > MAX_DATASET_BYTES:
            raise BadRequestError(f"dataset file {path!r} is larger than {MAX_DATASET_BYTES} bytes",
                                  param="dataset.path", status_code=422)
        try:
            text = await asyncio.to_thread(file.read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadRequestError(f"cannot read dataset {path!r}: {exc}", param="dataset.path",
                                  status_code=422) from exc
        return _parse_jsonl(text, path)

    async def submit(self, request: JobRequest) -> Job:
        if self.store.count("queued") >= self.settings.max_queued:
            raise RateLimitError(f"{self.settings.max_queued} jobs are already queued; retry later",
                                 retry_after=60.0)
        records = await self.resolve_records(request)
        job_id = uuid.uuid4().hex[:16]
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True)
        with (job_dir / DATASET_FILE).open("w") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.store.create(job_id, request)
        self._wake.set()
        job = self.store.get(job_id)
        assert job is not None
        return job

    # ---- queries ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFoundError(f"no job with id {job_id!r} (GET /jobs lists them)", param="job_id")
        return job

    # ---- cancel -----------------------------------------------------------------------------------
    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status == "queued":
            if self.store.transition(job_id, "queued", status="cancelled", error="cancelled while queued",
                                     finished_at=now()):
                return self.get(job_id)
            job = self.get(job_id)  # it just started: cancel the worker below
        if job.status == "running":
            self._cancelling.add(job_id)
            if job_id == self._running_id and self._proc is not None:
                self._signal(self._proc.pid, signal.SIGTERM)
            asyncio.get_running_loop().call_later(self.settings.cancel_grace_s, self._kill_if_alive,
                                                  self._proc, job_id)
        return self.get(job_id)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def _kill_if_alive(self, proc: asyncio.subprocess.Process, job_id: str) -> None:
        if proc.returncode is None and self._running_id == job_id:
            log.warning("job %s: worker still alive %.0f s after SIGTERM: SIGKILL", job_id,
                        self.settings.cancel_grace_s)
            self._signal(proc.pid, signal.SIGKILL)

    # ---- the queue --------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (job_id := self.store.next_queued()) is not None:
                try:
                    await self._run(job_id)
                except asyncio.CancelledError:
                    await self._abort_running(SHUTDOWN_REASON)
                    raise
                except Exception as exc:  # never let one job stop the queue
                    log.exception("job %s: the service failed to run it", job_id)
                    self.store.update(job_id, status="failed", error=f"trainer service error: {exc!r}",
                                      finished_at=now())

    def _job_spec(self, job_id: str, request: JobRequest) -> dict[str, Any]:
        from negspace_node.models import resolve_model

        resolved = resolve_model(request.base_model or self.settings.default_base_model or None)
        return {"id": job_id, "request": request.model_dump(mode="json"), "base_model": resolved.name,
                "base_model_path": resolved.path, "local_tasks_dir": str(self.tasks_dir),
                "local_task_names": local_tasks.shipped_task_names(),
                "torch_threads": self.settings.worker_threads}

    async def _run(self, job_id: str) -> None:
        row = self.store.get(job_id)
        if row is None or row.request is None:
            return
        if not self.store.transition(job_id, "queued", status="running", started_at=now()):
            return  # cancelled in between
        job_dir = self.job_dir(job_id)
        self.store.update(job_id, progress={"stage": "resolving base model", "step": 0, "total_steps": None})
        try:
            spec = await asyncio.to_thread(self._job_spec, job_id, row.request)
        except ValueError as exc:  # ModelResolutionError
            self.store.update(job_id, status="failed", error=f"base_model: {exc}", finished_at=now())
            return
        (job_dir / JOB_FILE).write_text(json.dumps(spec))
        for stale in (PROGRESS_FILE, RESULT_FILE):
            (job_dir / stale).unlink(missing_ok=True)
        if job_id in self._cancelling:
            self._cancelling.discard(job_id)
            self.store.update(job_id, status="cancelled", error="cancelled while running", finished_at=now())
            return
        with (job_dir / LOG_FILE).open("ab") as logfh:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "negspace_trainer.worker", str(job_dir),
                stdin=asyncio.subprocess.DEVNULL, stdout=logfh, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, cwd=str(job_dir))
        self._proc, self._running_id = proc, job_id
        self.store.update(job_id, pid=proc.pid)
        if job_id in self._cancelling:  # cancelled while the worker was being started
            self._signal(proc.pid, signal.SIGTERM)
        log.info("job %s: worker pid %d started", job_id, proc.pid)
        try:
            while True:
                try:
                    await asyncio.wait_for(proc.wait(), timeout=self.settings.poll_interval_s)
                    break
                except TimeoutError:
                    self._read_progress(job_id, job_dir)
            self._read_progress(job_id, job_dir)
            self._finish(job_id, job_dir, proc.returncode)
        finally:
            self._proc, self._running_id = None, None
            self._cancelling.discard(job_id)

    def _read_progress(self, job_id: str, job_dir: Path) -> None:
        try:
            data = json.loads((job_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return
        self.store.update(job_id, progress={k: data.get(k) for k in ("stage", "step", "total_steps")},
                          losses=data.get("losses") or [])

    def _finish(self, job_id: str, job_dir: Path, returncode: int | None) -> None:
        result: dict[str, Any] | None = None
        with contextlib.suppress(OSError, ValueError):
            result = json.loads((job_dir / RESULT_FILE).read_text())
        fields: dict[str, Any] = {"finished_at": now(), "pid": None}
        if job_id in self._cancelling:
            fields.update(status="cancelled", error="cancelled while running")
        elif result is not None and result.get("status") == "succeeded" and returncode == 0:
            fields.update(status="succeeded", error=None, eval=result.get("eval") or {})
        elif result is not None and result.get("error"):
            fields.update(status="failed", error=result["error"])
        elif returncode is not None and returncode < 0:
            fields.update(status="failed", error=f"worker killed by signal {-returncode} "
                                                 f"({signal.Signals(-returncode).name}); see GET /jobs/{job_id}/logs")
        else:
            fields.update(status="failed", error=f"worker exited with status {returncode} without a result; "
                                                 f"see GET /jobs/{job_id}/logs")
        self.store.update(job_id, **fields)
        log.info("job %s: %s%s", job_id, fields["status"], f" ({fields.get('error')})" if fields.get("error") else "")

    async def _abort_running(self, reason: str) -> None:
        proc, job_id = self._proc, self._running_id
        if proc is None or job_id is None:
            return
        self._signal(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=min(5.0, self.settings.cancel_grace_s))
        except TimeoutError:
            self._signal(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=5.0)
        self.store.update(job_id, status="failed", error=reason, finished_at=now(), pid=None)

    # ---- artifacts and logs -----------------------------------------------------------------------
    def artifacts(self, job_id: str) -> tuple[Path, list[tuple[str, Path, int]]]:
        self.get(job_id)
        root = self.job_dir(job_id) / ARTIFACTS_DIR
        files = []
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    files.append((str(p.relative_to(root)), p, p.stat().st_size))
        return root, files

    def log_text(self, job_id: str, tail_bytes: int | None = None) -> str:
        self.get(job_id)
        path = self.job_dir(job_id) / LOG_FILE
        if not path.is_file():
            return ""
        with path.open("rb") as fh:
            if tail_bytes is not None:
                size = path.stat().st_size
                fh.seek(max(0, size - tail_bytes))
            return fh.read().decode("utf-8", errors="replace")

    def remove_dir(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
