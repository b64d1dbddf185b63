"""SQLite state: runs, every attempt, accepted instructions, the event log, Q/A records.

One connection, used from the event loop only (every statement is a few milliseconds in WAL
mode), so there is exactly one writer. Attempts are unique per (run, node, round, attempt) and
Q/A records per (run, instruction): replaying work after a restart can never duplicate a row.
A run's ``controller`` is the URL of the controller replica its collection lives on, recorded when
the run is created and never changed (NULL: a run from before routing, assigned once at start).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from negspace_contracts.orchestrator import (
    RUN_EVENT,
    Instruction,
    RunConfig,
    RunEvent,
    RunEventData,
    StatusData,
)
from negspace_contracts.trainer import ChatRecord, ChatTurn

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    target INTEGER NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    paused_reason TEXT,
    collection TEXT NOT NULL,
    controller TEXT,
    train_job_id TEXT,
    train_key TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    node INTEGER NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    scale REAL,
    negatives TEXT NOT NULL DEFAULT '[]',
    seed INTEGER NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_s REAL NOT NULL,
    node_url TEXT,
    max_similarity REAL,
    is_similar INTEGER,
    checked INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0,
    point_id TEXT,
    inserted INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    on_topic REAL,
    angle TEXT,
    UNIQUE (run_id, node, round, attempt)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_accepted_per_slot ON attempts (run_id, node, round) WHERE accepted = 1;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, seq);
CREATE TABLE IF NOT EXISTS qa (
    run_id TEXT NOT NULL,
    instruction_id TEXT NOT NULL,
    status TEXT NOT NULL,
    question TEXT,
    answer TEXT,
    raw TEXT,
    tries INTEGER NOT NULL,
    created_at REAL NOT NULL,
    reason TEXT,
    PRIMARY KEY (run_id, instruction_id)
);
CREATE TABLE IF NOT EXISTS seed_train_jobs (
    run_id TEXT NOT NULL,
    seed INTEGER NOT NULL,
    train_key TEXT NOT NULL,
    job_id TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, seed)
);
CREATE INDEX IF NOT EXISTS runs_by_creation ON runs (created_at, id);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_at, id);
"""


def point_id(run_id: str, node: int, round_: int) -> str:
    """The controller id of the instruction accepted for (node, round): the same on every replay."""
    return str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, f"negspace:run:{run_id}"), f"{node}:{round_}"))


def _ts(t: float | None) -> datetime | None:
    return datetime.fromtimestamp(t, UTC) if t is not None else None


@dataclass
class RunRow:
    id: str
    mode: str
    status: str
    config: RunConfig
    target: int
    round: int
    error: str | None
    paused_reason: str | None
    collection: str
    controller: str | None  # the replica that holds the collection (None: not assigned yet)
    train_job_id: str | None
    created_at: float
    updated_at: float

    @property
    def created(self) -> datetime | None:
        return _ts(self.created_at)

    @property
    def updated(self) -> datetime | None:
        return _ts(self.updated_at)


@dataclass
class AttemptRow:
    run_id: str
    node: int
    round: int
    attempt: int
    scale: float | None
    negatives: list[str]
    seed: int
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    node_url: str | None
    max_similarity: float | None
    is_similar: bool | None
    checked: bool
    accepted: bool
    point_id: str | None
    inserted: bool
    on_topic: float | None = None   # cosine to the base (two-sided rule), persisted before the decision
    angle: str | None = None        # two-stage: the angle the attempt was written from


class Store:
    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(runs)")}
        if "train_key" not in columns:  # a database from before training jobs had idempotency keys
            self.db.execute("ALTER TABLE runs ADD COLUMN train_key TEXT")
        if "controller" not in columns:  # a database from before runs were routed to controller replicas
            self.db.execute("ALTER TABLE runs ADD COLUMN controller TEXT")
        qa_columns = {r["name"] for r in self.db.execute("PRAGMA table_info(qa)")}
        if "reason" not in qa_columns:  # a database from before rejections had reasons
            self.db.execute("ALTER TABLE qa ADD COLUMN reason TEXT")
        attempt_columns = {r["name"] for r in self.db.execute("PRAGMA table_info(attempts)")}
        for column in ("on_topic REAL", "angle TEXT"):  # a database from before the two-sided rule / two-stage
            if column.split()[0] not in attempt_columns:
                self.db.execute(f"ALTER TABLE attempts ADD COLUMN {column}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Statements that must land together (an attempt's verdict and its event)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- runs -------------------------------------------------------------------------------
    def create_run(self, run_id: str, config: RunConfig, target: int, collection: str,
                   controller: str | None = None) -> RunRow:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO runs (id, mode, status, config, target, collection, controller, created_at,"
                " updated_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (run_id, config.mode, config.model_dump_json(), target, collection, controller, now, now))
            self._event(run_id, StatusData(status="queued"))
        return self.get_run(run_id)  # type: ignore[return-value]

    def _row_to_run(self, r: sqlite3.Row) -> RunRow:
        return RunRow(id=r["id"], mode=r["mode"], status=r["status"],
                      config=RunConfig.model_validate_json(r["config"]), target=r["target"],
                      round=r["round"], error=r["error"], paused_reason=r["paused_reason"],
                      collection=r["collection"], controller=r["controller"], train_job_id=r["train_job_id"],
                      created_at=r["created_at"], updated_at=r["updated_at"])

    def get_run(self, run_id: str) -> RunRow | None:
        r = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._row_to_run(r) if r else None

    def list_runs(self, status: str | None = None, *, limit: int | None = None,
                  after: RunRow | None = None) -> list[RunRow]:
        """Runs in creation order (``created_at``, then id): the queue's order and the pages' order.
        ``after``: only runs created after that one (a page cursor)."""
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if after is not None:
            where.append("(created_at > ? OR (created_at = ? AND id > ?))")
            args += [after.created_at, after.created_at, after.id]
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [self._row_to_run(r) for r in self.db.execute(sql, args).fetchall()]

    def unrouted_runs(self) -> list[RunRow]:
        """Runs with no controller recorded (made before routing, or while none was configured)."""
        rows = self.db.execute("SELECT * FROM runs WHERE controller IS NULL ORDER BY created_at, id").fetchall()
        return [self._row_to_run(r) for r in rows]

    def set_controller(self, run_id: str, controller: str) -> None:
        """Record an unrouted run's controller: once only (a recorded one is never overwritten)."""
        self.db.execute("UPDATE runs SET controller = ? WHERE id = ? AND controller IS NULL", (controller, run_id))

    def controller_counts(self) -> dict[str | None, int]:
        """Runs per controller URL (None: not assigned yet)."""
        rows = self.db.execute("SELECT controller, COUNT(*) AS n FROM runs GROUP BY controller").fetchall()
        return {r["controller"]: int(r["n"]) for r in rows}

    def status_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) AS n FROM runs GROUP BY status").fetchall()
        return {r["status"]: int(r["n"]) for r in rows}

    def count_status(self, status: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM runs WHERE status = ?", (status,)).fetchone()[0])

    def set_status(self, run_id: str, status: str, *, error: str | None = None,
                   paused_reason: str | None = None, **data: Any) -> None:
        """Change a run's status and log a ``status`` event in the same transaction."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE runs SET status = ?, error = ?, paused_reason = ?, updated_at = ?"
                            " WHERE id = ?", (status, error, paused_reason, time.time(), run_id))
            self._event(run_id, StatusData(status=status, error=error or None, **data))  # type: ignore[arg-type]

    def set_round(self, run_id: str, round_: int) -> None:
        self.db.execute("UPDATE runs SET round = ?, updated_at = ? WHERE id = ?", (round_, time.time(), run_id))

    def train_jobs(self) -> list[tuple[str, str]]:
        """(run id, training job id) of every run that has had a training job."""
        rows = self.db.execute("SELECT id, train_job_id FROM runs WHERE train_job_id IS NOT NULL"
                               " ORDER BY created_at, id").fetchall()
        return [(r["id"], r["train_job_id"]) for r in rows]

    def train_key(self, run_id: str) -> str:
        """The idempotency key of the run's next training job, made and stored BEFORE the trainer
        is asked to create it: when the trainer's answer is lost (a timeout, a dropped connection,
        an orchestrator restart), a retry sends the same key and gets the job the first try made
        instead of a second one. ``set_train_job`` clears it, so the next job gets a new key."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT train_key FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            if row["train_key"]:
                return row["train_key"]
            key = f"negspace-run-{run_id}-train-{uuid.uuid4().hex}"
            self.db.execute("UPDATE runs SET train_key = ? WHERE id = ?", (key, run_id))
            return key

    def seed_train_key(self, run_id: str, seed: int) -> tuple[str, str | None]:
        """(idempotency key, job id or None) of the run's training job for ``seed``: the key is
        made and stored before the trainer is asked, so a retry creates no second job."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT train_key, job_id FROM seed_train_jobs WHERE run_id = ? AND seed = ?",
                                  (run_id, seed)).fetchone()
            if row is not None:
                return row["train_key"], row["job_id"]
            key = f"negspace-run-{run_id}-seed-{seed}-{uuid.uuid4().hex}"
            self.db.execute("INSERT INTO seed_train_jobs (run_id, seed, train_key, created_at) VALUES (?, ?, ?, ?)",
                            (run_id, seed, key, time.time()))
            return key, None

    def set_seed_train_job(self, run_id: str, seed: int, job_id: str) -> None:
        self.db.execute("UPDATE seed_train_jobs SET job_id = ? WHERE run_id = ? AND seed = ?", (job_id, run_id, seed))

    def seed_train_jobs(self, run_id: str) -> dict[int, str]:
        rows = self.db.execute("SELECT seed, job_id FROM seed_train_jobs WHERE run_id = ? AND job_id IS NOT NULL"
                               " ORDER BY seed", (run_id,)).fetchall()
        return {int(r["seed"]): r["job_id"] for r in rows}

    def set_train_job(self, run_id: str, job_id: str) -> None:
        """Record the run's training job; its idempotency key is spent."""
        self.db.execute("UPDATE runs SET train_job_id = ?, train_key = NULL, updated_at = ? WHERE id = ?",
                        (job_id, time.time(), run_id))

    # ---- attempts ---------------------------------------------------------------------------
    def add_attempt(self, a: AttemptRow) -> None:
        """Persist an attempt the moment its generation returns (a replay with the same key is ignored)."""
        self.db.execute(
            "INSERT OR IGNORE INTO attempts (run_id, node, round, attempt, scale, negatives, seed, text,"
            " prompt_tokens, completion_tokens, latency_s, node_url, created_at, on_topic, angle)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (a.run_id, a.node, a.round, a.attempt, a.scale, json.dumps(a.negatives), a.seed, a.text,
             a.prompt_tokens, a.completion_tokens, a.latency_s, a.node_url, time.time(), a.on_topic, a.angle))

    def record_on_topic(self, run_id: str, node: int, round_: int, attempt: int, on_topic: float) -> None:
        """The attempt's cosine to the base, stored before the two-sided rule decides on it (a replay
        decides from the stored value, not a new embedding)."""
        self.db.execute("UPDATE attempts SET on_topic = ? WHERE run_id = ? AND node = ? AND round = ? AND attempt = ?",
                        (on_topic, run_id, node, round_, attempt))

    def used_angles(self, run_id: str, limit: int) -> list[str]:
        """The two-stage angles of the run's accepted instructions, most recent first."""
        rows = self.db.execute("SELECT angle FROM attempts WHERE run_id = ? AND accepted = 1 AND angle IS NOT NULL"
                               " AND angle != '' ORDER BY round DESC, node DESC LIMIT ?", (run_id, limit)).fetchall()
        return [r["angle"] for r in rows]

    def record_check(self, run_id: str, node: int, round_: int, attempt: int,
                     max_similarity: float | None, is_similar: bool) -> None:
        self.db.execute("UPDATE attempts SET max_similarity = ?, is_similar = ?, checked = 1"
                        " WHERE run_id = ? AND node = ? AND round = ? AND attempt = ?",
                        (max_similarity, int(is_similar), run_id, node, round_, attempt))

    def mark_accepted(self, run_id: str, node: int, round_: int, attempt: int, pid: str) -> None:
        self.db.execute("UPDATE attempts SET accepted = 1, point_id = ?, checked = 1"
                        " WHERE run_id = ? AND node = ? AND round = ? AND attempt = ?",
                        (pid, run_id, node, round_, attempt))

    def mark_inserted(self, run_id: str, node: int, round_: int, attempt: int) -> None:
        self.db.execute("UPDATE attempts SET inserted = 1"
                        " WHERE run_id = ? AND node = ? AND round = ? AND attempt = ?",
                        (run_id, node, round_, attempt))

    def _row_to_attempt(self, r: sqlite3.Row) -> AttemptRow:
        return AttemptRow(run_id=r["run_id"], node=r["node"], round=r["round"], attempt=r["attempt"],
                          scale=r["scale"], negatives=json.loads(r["negatives"]), seed=r["seed"],
                          text=r["text"], prompt_tokens=r["prompt_tokens"],
                          completion_tokens=r["completion_tokens"], latency_s=r["latency_s"],
                          node_url=r["node_url"], max_similarity=r["max_similarity"],
                          is_similar=None if r["is_similar"] is None else bool(r["is_similar"]),
                          checked=bool(r["checked"]), accepted=bool(r["accepted"]),
                          point_id=r["point_id"], inserted=bool(r["inserted"]), on_topic=r["on_topic"],
                          angle=r["angle"])

    def slot_attempts(self, run_id: str, node: int, round_: int) -> list[AttemptRow]:
        rows = self.db.execute("SELECT * FROM attempts WHERE run_id = ? AND node = ? AND round = ?"
                               " ORDER BY attempt", (run_id, node, round_)).fetchall()
        return [self._row_to_attempt(r) for r in rows]

    def attempts(self, run_id: str) -> list[AttemptRow]:
        rows = self.db.execute("SELECT * FROM attempts WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        return [self._row_to_attempt(r) for r in rows]

    def accepted(self, run_id: str) -> list[AttemptRow]:
        rows = self.db.execute("SELECT * FROM attempts WHERE run_id = ? AND accepted = 1"
                               " ORDER BY round, node", (run_id,)).fetchall()
        return [self._row_to_attempt(r) for r in rows]

    def accepted_batch(self, run_id: str, after: tuple[int, int] | None, limit: int) -> list[AttemptRow]:
        """Accepted attempts in (round, node) order, starting after the slot ``after`` (keyset paging)."""
        r, n = after if after is not None else (-1, -1)
        rows = self.db.execute("SELECT * FROM attempts WHERE run_id = ? AND accepted = 1"
                               " AND (round > ? OR (round = ? AND node > ?)) ORDER BY round, node LIMIT ?",
                               (run_id, r, r, n, limit)).fetchall()
        return [self._row_to_attempt(r) for r in rows]

    def _is_guided(self, run_id: str) -> bool:
        mode = self.db.execute("SELECT mode FROM runs WHERE id = ?", (run_id,)).fetchone()
        return mode is not None and mode["mode"] == "guided"

    @staticmethod
    def _instruction(a: AttemptRow, guided: bool) -> Instruction:
        return Instruction(id=a.point_id or "", node=a.node, round=a.round, text=a.text,
                           guidance_scale=a.scale if guided else None, attempt=a.attempt,
                           max_similarity=a.max_similarity, angle=a.angle, on_topic=a.on_topic)

    def instructions(self, run_id: str) -> list[Instruction]:
        guided = self._is_guided(run_id)
        return [self._instruction(a, guided) for a in self.accepted(run_id)]

    def iter_instructions(self, run_id: str, batch: int = 500) -> Iterator[list[Instruction]]:
        """The run's instructions in (round, node) order, ``batch`` rows per query; no cursor stays
        open between batches, so a consumer may await between them."""
        guided = self._is_guided(run_id)
        after: tuple[int, int] | None = None
        while rows := self.accepted_batch(run_id, after, batch):
            yield [self._instruction(a, guided) for a in rows]
            after = (rows[-1].round, rows[-1].node)

    def counts(self, run_id: str) -> tuple[int, int, float, int]:
        """(accepted, attempts, summed attempt latency, slots whose latency is counted)."""
        r = self.db.execute("SELECT COALESCE(SUM(accepted), 0) AS acc, COUNT(*) AS att,"
                            " COALESCE(SUM(latency_s), 0) AS lat FROM attempts WHERE run_id = ?",
                            (run_id,)).fetchone()
        return int(r["acc"]), int(r["att"]), float(r["lat"]), int(r["acc"])

    def recent_pace(self, run_id: str, window: int) -> float | None:
        """Seconds per accepted instruction over the run's last ``window`` accepted slots (when
        their generations returned); None before two."""
        rows = self.db.execute("SELECT created_at FROM attempts WHERE run_id = ? AND accepted = 1"
                               " ORDER BY id DESC LIMIT ?", (run_id, max(2, window))).fetchall()
        if len(rows) < 2:
            return None
        return (rows[0]["created_at"] - rows[-1]["created_at"]) / (len(rows) - 1)

    # ---- events -----------------------------------------------------------------------------
    def _event(self, run_id: str, data: RunEventData) -> int:
        cur = self.db.execute("INSERT INTO events (run_id, type, data, created_at) VALUES (?, ?, ?, ?)",
                              (run_id, data.event_type, data.model_dump_json(), time.time()))
        return int(cur.lastrowid or 0)

    def add_event(self, run_id: str, data: RunEventData) -> int:
        return self._event(run_id, data)

    @staticmethod
    def _row_to_event(r: sqlite3.Row) -> RunEvent:
        return RUN_EVENT.validate_python({"type": r["type"], "run_id": r["run_id"], "seq": r["seq"],
                                          "data": json.loads(r["data"])})

    def last_event(self, run_id: str, type_: str) -> RunEvent | None:
        r = self.db.execute("SELECT * FROM events WHERE run_id = ? AND type = ? ORDER BY seq DESC LIMIT 1",
                            (run_id, type_)).fetchone()
        return self._row_to_event(r) if r else None

    def has_round_event(self, run_id: str, round_: int) -> bool:
        return self.db.execute("SELECT 1 FROM events WHERE run_id = ? AND type = 'round'"
                               " AND json_extract(data, '$.round') = ?", (run_id, round_)).fetchone() is not None

    def events_after(self, run_id: str, after: int, limit: int = 500) -> list[RunEvent]:
        rows = self.db.execute("SELECT * FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                               (run_id, after, limit)).fetchall()
        return [self._row_to_event(r) for r in rows]

    # ---- Q/A ----------------------------------------------------------------------------------
    def qa_done(self, run_id: str) -> set[str]:
        rows = self.db.execute("SELECT instruction_id FROM qa WHERE run_id = ?", (run_id,)).fetchall()
        return {r["instruction_id"] for r in rows}

    def add_qa(self, run_id: str, instruction_id: str, status: str, question: str | None,
               answer: str | None, raw: str, tries: int, reason: str | None = None) -> None:
        self.db.execute("INSERT OR IGNORE INTO qa (run_id, instruction_id, status, question, answer, raw,"
                        " tries, created_at, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (run_id, instruction_id, status, question, answer, raw, tries, time.time(), reason))

    def qa_rejections(self, run_id: str) -> dict[str, int]:
        """Rejected records per reason; rows stored before reasons were recorded count as
        ``unparseable`` (the only reason there was)."""
        rows = self.db.execute("SELECT COALESCE(reason, 'unparseable') AS reason, COUNT(*) AS n FROM qa"
                               " WHERE run_id = ? AND status = 'rejected' GROUP BY 1 ORDER BY 1",
                               (run_id,)).fetchall()
        return {r["reason"]: int(r["n"]) for r in rows}

    def qa_records(self, run_id: str) -> list[ChatRecord]:
        """Converted pairs in instruction order (round, node)."""
        return [record for batch in self.iter_qa_records(run_id, batch=10_000) for record in batch]

    def iter_qa_records(self, run_id: str, batch: int = 500) -> Iterator[list[ChatRecord]]:
        """Converted pairs in instruction order, ``batch`` per query (keyset on (round, node)), each
        as the chat record the trainer and the exports take (the user's question, the assistant's answer)."""
        r, n = -1, -1
        while True:
            rows = self.db.execute(
                "SELECT q.question, q.answer, a.round, a.node FROM qa q JOIN attempts a ON a.run_id = q.run_id"
                " AND a.point_id = q.instruction_id AND a.accepted = 1"
                " WHERE q.run_id = ? AND q.status = 'converted' AND (a.round > ? OR (a.round = ? AND a.node > ?))"
                " ORDER BY a.round, a.node LIMIT ?", (run_id, r, r, n, batch)).fetchall()
            if not rows:
                return
            yield [ChatRecord(messages=[ChatTurn(role="user", content=row["question"]),
                                        ChatTurn(role="assistant", content=row["answer"])]) for row in rows]
            r, n = rows[-1]["round"], rows[-1]["node"]

    def has_qa_records(self, run_id: str) -> bool:
        return next(self.iter_qa_records(run_id, batch=1), None) is not None

    def qa_counts(self, run_id: str) -> tuple[int, int]:
        r = self.db.execute("SELECT COALESCE(SUM(status = 'converted'), 0) AS c,"
                            " COALESCE(SUM(status = 'rejected'), 0) AS r FROM qa WHERE run_id = ?",
                            (run_id,)).fetchone()
        return int(r["c"]), int(r["r"])
