"""Job records in SQLite: one row per job; JSON columns for the request, progress, losses, eval."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from negspace_contracts.trainer import Job, JobRequest
from pydantic import ValidationError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    losses TEXT NOT NULL DEFAULT '[]',
    eval TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    pid INTEGER,
    attempt INTEGER NOT NULL DEFAULT 1,
    idempotency_key TEXT,
    request_hash TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
"""
# After the columns exist (a jobs.sqlite from before idempotency keys gets them first).
_KEY_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key ON jobs(idempotency_key) "
              "WHERE idempotency_key IS NOT NULL")

_JSON_COLUMNS = ("progress", "losses", "eval")


def now() -> str:
    return datetime.now(UTC).isoformat()


class JobStore:
    """Small and synchronous: each call is one short SQLite transaction (WAL), safe across threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if "attempt" not in columns:  # a jobs.sqlite written before attempts were counted
            self._db.execute("ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1")
        for column in ("idempotency_key", "request_hash"):  # ... or before idempotency keys
            if column not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
        self._db.execute(_KEY_INDEX)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, job_id: str, request: JobRequest, request_hash: str | None = None) -> None:
        """Insert a queued job. With ``request.idempotency_key`` set, a second job with the same
        key is refused by the unique index (``sqlite3.IntegrityError``)."""
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            self._db.execute(
                "INSERT INTO jobs (id, seq, name, status, request, idempotency_key, request_hash, created_at)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, seq, request.name, request.model_dump_json(), request.idempotency_key,
                 request_hash, now()))

    def by_key(self, key: str) -> tuple[str, str | None] | None:
        """(job id, request hash) of the job created with idempotency key ``key``, if any."""
        with self._lock:
            row = self._db.execute("SELECT id, request_hash FROM jobs WHERE idempotency_key = ?",
                                   (key,)).fetchone()
        return (row["id"], row["request_hash"]) if row else None

    def update(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        values = [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values, job_id))

    def transition(self, job_id: str, from_status: str, **fields: Any) -> bool:
        """Update only if the job is still in ``from_status`` (so a cancel and a start cannot race)."""
        values = [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND status = ?",
                                   (*values, job_id, from_status))
            return cur.rowcount == 1

    def row(self, job_id: str) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def get(self, job_id: str) -> Job | None:
        row = self.row(job_id)
        return to_job(row) if row is not None else None

    def list(self, status: str | None = None) -> list[Job]:
        with self._lock:
            if status:
                rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        return [to_job(r) for r in rows]

    def next_queued(self) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
        return row["id"] if row else None

    def count(self, status: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def requeue(self, job_id: str, max_attempts: int, fail_reason: Callable[[int], str]) -> tuple[str, int] | None:
        """A ``running`` job whose attempt was interrupted (the trainer stopped or crashed): back to
        ``queued`` with ``attempt + 1``, keeping its place in the queue (``seq``), or ``failed``
        (error ``fail_reason(attempt)``) once ``max_attempts`` attempts were interrupted. Returns the new status and the attempt
        that was interrupted, or None when the job was not running (nothing changed)."""
        with self._lock:
            row = self._db.execute("SELECT attempt FROM jobs WHERE id = ? AND status = 'running'",
                                   (job_id,)).fetchone()
            if row is None:
                return None
            attempt = int(row["attempt"])
            if attempt >= max_attempts:
                self._db.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, pid = NULL "
                    "WHERE id = ? AND status = 'running'", (fail_reason(attempt), now(), job_id))
                return "failed", attempt
            self._db.execute(
                "UPDATE jobs SET status = 'queued', attempt = ?, pid = NULL, started_at = NULL, "
                "progress = ?, losses = '[]', eval = '{}', error = NULL WHERE id = ? AND status = 'running'",
                (attempt + 1, json.dumps({"stage": "requeued", "step": 0}), job_id))
            return "queued", attempt

def to_job(row: sqlite3.Row) -> Job:
    progress = json.loads(row["progress"] or "{}")
    return Job(
        id=row["id"], status=row["status"], name=row["name"],
        progress={"step": progress.get("step", 0), "total_steps": progress.get("total_steps"),
                  "stage": progress.get("stage")},
        losses=json.loads(row["losses"] or "[]"),
        eval=json.loads(row["eval"] or "{}"),
        error=row["error"], attempt=row["attempt"], created_at=row["created_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], request=_stored_request(row["request"]))


def _stored_request(text: str) -> JobRequest | None:
    """The job's request; None for one this trainer no longer takes (a job from before
    ``dataset.run_id`` was removed stays listed, without its request)."""
    try:
        return JobRequest.model_validate_json(text)
    except ValidationError:
        return None
