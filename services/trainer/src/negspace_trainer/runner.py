"""The job queue: one job at a time, each in its own worker process (``negspace_trainer.worker``).

A job's worker runs in its own process group, so the API stays responsive while it trains, a
crash (or the OOM killer) takes only the worker, and cancel can end the worker and its children.
The runner polls the worker's ``progress.json`` into the job's SQLite row and, when the worker
exits, records ``succeeded`` (``result.json``), ``failed`` (``error.json``, or the exit code /
signal when the worker could not say) or ``cancelled``.

A job whose attempt is interrupted by the trainer itself stopping (a graceful shutdown, or a crash
or SIGKILL found at the next start) is queued again in its old place with ``attempt + 1``, its
partial outputs removed (training restarts from scratch: the worker writes no checkpoints), until
``--max-attempts`` attempts were interrupted; then it fails saying so. Cancelled jobs stay cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from negspace_contracts.errors import (
    ConflictError,
    NotFoundError,
    RateLimitError,
)
from negspace_contracts.trainer import TERMINAL_JOB_STATUSES, Artifact, ArtifactList, Job, JobRequest

from negspace_trainer import sources
from negspace_trainer.settings import TrainerSettings
from negspace_trainer.sources import TASK_DIRS_ENV
from negspace_trainer.store import JobStore, now

log = logging.getLogger("negspace.trainer")

CRASH_REASON = "the trainer stopped (crashed or was killed) while it ran"
SHUTDOWN_REASON = "the trainer service shut down while it ran"
WORKER_MODULE = "negspace_trainer.worker"
# What a requeued job keeps of its folder: what it was asked to do, its data, and its log.
KEPT_ON_REQUEUE = frozenset({"request.json", "dataset.jsonl", "worker.log"})


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


def _job_processes(job_dir: Path, marker: str) -> list[int]:
    """Live worker processes of this job (e.g. left by a previous service process), found by
    their command line: it names the worker (``marker``) and this job's folder. By command line
    and not by the stored pid, because pids are reused and a service killed right after starting
    a worker had no time to store it."""
    found: list[int] = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:  # no /proc (not Linux): nothing to find
        return found
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and marker.encode() in cmdline and str(job_dir).encode() in cmdline:
            found.append(int(entry.name))
    return found


async def _kill_orphans(job_dir: Path, marker: str, timeout: float = 60.0) -> list[int]:
    """SIGKILL this job's leftover workers (their whole process groups) and wait until they are
    gone, so none still writes into the job's folder when it is cleaned and run again. (A killed
    process with gigabytes of tensors can take seconds to be torn down on a loaded machine.)"""
    pids = _job_processes(job_dir, marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + timeout
    while pids and _job_processes(job_dir, marker) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    if pids and (left := _job_processes(job_dir, marker)):
        log.error("worker(s) %s of %s outlived SIGKILL for %.0f s (stuck in the kernel?); the job runs "
                  "again beside them", ", ".join(map(str, left)), job_dir.name, timeout)
    return pids


def request_fingerprint(request: JobRequest) -> str:
    """What "the same request" means for an idempotency key: the request as parsed (defaults
    spelled out or left out compare equal), without the key itself."""
    return hashlib.sha256(request.model_dump_json(exclude={"idempotency_key"}).encode()).hexdigest()


def _stamp(message: str) -> str:
    return f"[negspace trainer {time.strftime('%H:%M:%S')}] {message}\n"


class JobRunner:
    def __init__(self, settings: TrainerSettings, store: JobStore, *,
                 start_worker: bool = True, worker_command: Sequence[str] | None = None) -> None:
        """``start_worker=False``: jobs are accepted and stay queued (API tests, fuzzing).
        ``worker_command``: what runs a job, given its folder as the last argument (default
        ``python -m negspace_trainer.worker``; tests give a fake one that does not train)."""
        self.settings = settings
        self.start_worker = start_worker
        self.worker_command = list(worker_command or [sys.executable, "-m", WORKER_MODULE])
        self.store = store
        self.jobs_dir = settings.resolved_workdir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._current: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._cancel_requested: set[str] = set()
        self.on_finish: Callable[[str], None] | None = None  # metrics hook: called with the status

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Settle the jobs a previous service process left ``running`` (it crashed or was killed):
        end their leftover workers, then record what the worker finished, or queue them again."""
        for job in self.store.list("running"):
            killed = await _kill_orphans(self.job_dir(job.id), self.worker_command[-1])
            if killed:
                log.warning("job %s: ended worker(s) %s left by the previous service process",
                            job.id, ", ".join(map(str, killed)))
            self._settle_interrupted(job.id, CRASH_REASON)
        if self.start_worker:
            self._task = asyncio.create_task(self._loop(), name="trainer-job-loop")

    async def stop(self) -> None:
        """Graceful shutdown: stop the loop, end the running worker, and queue its job again
        (or record it cancelled when the user asked for that)."""
        job_id, proc = self._current, self._proc
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if job_id is None:
            return
        if proc is not None:
            await self._terminate(proc, grace=min(self.settings.cancel_grace_s, 5.0))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if job_id in self._cancel_requested:
            self._cancel_requested.discard(job_id)
            if self.store.transition(job_id, "running", status="cancelled", error="cancelled while running",
                                     finished_at=now(), pid=None):
                self._count(job_id, "cancelled")
            return
        self._settle_interrupted(job_id, SHUTDOWN_REASON)

    def _settle_interrupted(self, job_id: str, why: str) -> None:
        """A ``running`` job whose worker is gone and whose outcome was never recorded. If the
        worker had finished (``result.json``) or failed for a reason it named (``error.json``),
        record that; otherwise the attempt was lost: queue the job again or, after
        ``--max-attempts``, fail it."""
        job_dir = self.job_dir(job_id)
        row = self.store.row(job_id)
        if row is None or row["status"] != "running":
            return
        self._sync_progress(job_id, job_dir)
        result = _read_json(job_dir / "result.json")
        if result is not None:
            self._job_log(job_id, f"the worker had finished before the trainer stopped ({why}): succeeded")
            self._finish(job_id, "succeeded", eval=result.get("eval") or {})
            return
        err = _read_json(job_dir / "error.json")
        if err is not None and err.get("error"):
            self._job_log(job_id, f"the worker had failed before the trainer stopped ({why})")
            self._finish(job_id, "failed", error=str(err["error"]))
            return
        attempt, limit = int(row["attempt"]), self.settings.max_attempts
        if attempt < limit:
            self._clean_attempt(job_dir)  # before requeueing: a crash in between just repeats this
        outcome = self.store.requeue(
            job_id, limit, lambda n: (f"interrupted {n} times: {why} during attempt {n}, and "
                                      f"--max-attempts is {limit}; submit the job again (or raise "
                                      "--max-attempts / TRAINER_MAX_ATTEMPTS)"))
        if outcome is None:
            return
        status, attempt = outcome
        if status == "queued":
            message = (f"attempt {attempt} of {limit} interrupted: {why}; requeued as attempt {attempt + 1} "
                       "(restarts from scratch: the partial outputs were removed)")
            log.warning("job %s: %s", job_id, message)
            self._job_log(job_id, message)
            self._wake.set()
        else:
            message = f"attempt {attempt} of {limit} interrupted: {why}; no attempts left: failed"
            log.warning("job %s: %s", job_id, message)
            self._job_log(job_id, message)
            self._count(job_id, "failed")

    def _clean_attempt(self, job_dir: Path) -> None:
        for entry in job_dir.iterdir():
            if entry.name in KEPT_ON_REQUEUE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _job_log(self, job_id: str, message: str) -> None:
        """A line from the service in the job's log (``GET /jobs/{id}/logs``), among the worker's."""
        with contextlib.suppress(OSError), (self.job_dir(job_id) / "worker.log").open("a") as fh:
            fh.write(_stamp(message))

    @property
    def busy(self) -> str | None:
        return self._current

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # -- API operations ---------------------------------------------------------------------------
    def replay(self, key: str, fingerprint: str) -> Job | None:
        """The job created earlier with idempotency key ``key`` (None if none was): the same
        request again gets that job; a different request under the same key is a 409."""
        found = self.store.by_key(key)
        if found is None:
            return None
        job_id, stored = found
        if stored != fingerprint:
            raise ConflictError(
                f"idempotency_key {key!r} was already used for job {job_id}, created from a different "
                "request; a key may only be reused to retry the very same request (send a new key for "
                "a new job)", param="idempotency_key")
        return self.get(job_id)

    async def create(self, body: JobRequest) -> tuple[Job, bool]:
        """``POST /jobs``: a retry with the same ``idempotency_key`` gets the first job before
        anything is re-checked; ``eval.include_path`` must lie in --task-dirs and a dataset path in
        --dataset-dirs / --dataset-url-prefixes (422 otherwise); a local file is read here, a URL
        is fetched by the worker. Returns the job and whether it was a replay."""
        fingerprint = None
        if body.idempotency_key is not None:
            fingerprint = request_fingerprint(body)
            existing = self.replay(body.idempotency_key, fingerprint)
            if existing is not None:
                return existing, True
        if body.eval is not None and body.eval.include_path is not None:
            folder = sources.check_include_path(body.eval.include_path, self.settings.allowed_task_dirs)
            body = body.model_copy(update={"eval": body.eval.model_copy(update={"include_path": str(folder)})})
        records = None
        path = body.dataset.path
        if path is not None:
            source = sources.check(path, self.settings)
            if source.file is not None:
                records = await asyncio.to_thread(sources.read_file, source.file, path, self.settings)
            else:  # the worker fetches the normalized URL that was checked
                body = body.model_copy(update={"dataset": body.dataset.model_copy(update={"path": source.url})})
        # replayed: a concurrent request with the same key created it while this one read the file
        return self.submit(body, records, fingerprint=fingerprint)

    def submit(self, request: JobRequest, records: list[dict] | None = None, *,
               fingerprint: str | None = None) -> tuple[Job, bool]:
        """Queue a job; return it and whether it was a replay. ``records``: the dataset already
        read (``read_dataset_file``) for a path. ``fingerprint``: ``request_fingerprint`` of the
        request as the client sent it (before paths were resolved and defaults filled in), kept
        with ``request.idempotency_key``; a key already used returns that job (``replay``)."""
        key = request.idempotency_key
        if key is not None:
            fingerprint = fingerprint or request_fingerprint(request)
            # No await between this check and the insert below: concurrent POSTs with one key
            # (all on the event loop) cannot both create; the unique index guards the rest.
            existing = self.replay(key, fingerprint)
            if existing is not None:
                return existing, True
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
        try:
            self.store.create(job_id, request, fingerprint if key is not None else None)
        except sqlite3.IntegrityError:  # another process/thread created the key's job meanwhile
            shutil.rmtree(job_dir, ignore_errors=True)
            existing = self.replay(key, fingerprint) if key is not None else None
            if existing is None:
                raise
            return existing, True
        self._wake.set()
        job = self.store.get(job_id)
        assert job is not None
        return job, False

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

    async def _run(self, job_id: str) -> None:
        if not self.store.transition(job_id, "queued", status="running", started_at=now(),
                                     progress={"stage": "starting", "step": 0}):
            return  # cancelled meanwhile
        self._current = job_id
        job_dir = self.job_dir(job_id)
        if job_id in self._cancel_requested:
            self._finish(job_id, "cancelled", error="cancelled")
            return

        env = dict(os.environ)
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env[TASK_DIRS_ENV] = os.pathsep.join(map(str, self.settings.allowed_task_dirs))
        if self.settings.worker_threads:
            env["NEGSPACE_TRAINER_THREADS"] = str(self.settings.worker_threads)
        job = self.get(job_id)
        if job.attempt > 1:
            self._job_log(job_id, f"attempt {job.attempt} of {self.settings.max_attempts} starting")
        with (job_dir / "worker.log").open("ab") as logfile:
            spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
                *self.worker_command, str(job_dir),
                stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True))
            try:
                proc = await asyncio.shield(spawn)
            except asyncio.CancelledError:  # stopping right now: the new worker must not outlive us
                with contextlib.suppress(Exception):
                    started = await spawn
                    os.killpg(started.pid, signal.SIGKILL)
                    await started.wait()
                raise
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

    def artifacts(self, job_id: str) -> ArtifactList:
        """The job's adapter / merged model files and its metrics.json."""
        root = self.artifacts_root(job_id)
        found = []
        for top in ("adapter", "model", "metrics.json"):
            path = root / top
            files = ([path] if path.is_file() else
                     sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [])
            found += [Artifact(name=str(f.relative_to(root)), path=str(f), size_bytes=f.stat().st_size) for f in files]
        return ArtifactList(job_id=job_id, root=str(root), artifacts=found)

