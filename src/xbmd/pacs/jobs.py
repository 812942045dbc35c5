"""The service's durable job queue (SQLite, one file in the state folder).

One row per Orthanc instance seen in the change feed (``orthanc_id`` is unique: seeing it again
adds nothing). States::

    pending -> running -> done | failed | skipped
       ^          |
       +----------+  (Orthanc unavailable: retried later; a crash: recovered at start)

Guarantees, given SQLite's atomic transactions (WAL journal):

- never lost: the change-feed position and the jobs it produced are written in one transaction,
  so after a kill the feed is read again from a position whose jobs are all in the table;
- redone after a kill: a job found 'running' at start-up was interrupted and goes back to
  'pending' (``recover``);
- never duplicated: the SR and SC have UIDs derived from the source instance and the model
  (``xbmd.pacs.uids``) and the worker looks them up in Orthanc before storing, so a redone job
  stores nothing twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STATES = ("pending", "running", "done", "failed", "skipped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    orthanc_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    study_instance_uid TEXT,
    series_instance_uid TEXT,
    sop_instance_uid TEXT,
    accession_number TEXT,
    study_date TEXT,
    reason TEXT,
    results TEXT,
    sr_uid TEXT,
    sc_uid TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS feed (id INTEGER PRIMARY KEY CHECK (id = 1), last_seq INTEGER);
"""


@dataclass
class Job:
    id: int
    orthanc_id: str
    status: str
    attempts: int
    received_at: float
    started_at: float | None
    finished_at: float | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    accession_number: str | None
    study_date: str | None
    reason: str | None
    results: list[dict] | None
    sr_uid: str | None
    sc_uid: str | None

    @property
    def latency_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return self.finished_at - self.received_at


class JobQueue:
    """The queue; safe to share between the service's threads (one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    # ---- the change feed

    def last_seq(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT last_seq FROM feed WHERE id = 1").fetchone()
        return None if row is None else int(row[0])

    def add_from_feed(self, orthanc_ids: list[str], last_seq: int) -> int:
        """Queue new instances and move the feed position, in one transaction; returns how many
        jobs were new."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(
                    "INSERT OR IGNORE INTO jobs (orthanc_id, received_at) VALUES (?, ?)",
                    [(i, now) for i in orthanc_ids],
                )
                added = self._db.total_changes - before
                self._db.execute(
                    "INSERT INTO feed (id, last_seq) VALUES (1, ?) "
                    "ON CONFLICT (id) DO UPDATE SET last_seq = excluded.last_seq",
                    (int(last_seq),),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return added

    # ---- workers

    def recover(self) -> int:
        """Jobs left 'running' by a killed process go back to 'pending'; returns how many."""
        return self._write("UPDATE jobs SET status = 'pending' WHERE status = 'running'").rowcount

    def claim(self) -> Job | None:
        """The oldest pending job that is due, now 'running'; None when there is none."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE status = 'pending' AND next_attempt_at <= ? "
                    "ORDER BY id LIMIT 1",
                    (now,),
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ?",
                        (now, row[0]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else self.get(int(row[0]))

    def describe(self, job_id: int, ids: dict) -> None:
        """Record the source's DICOM identifiers (``study_instance_uid``, ...)."""
        keys = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")
        keys += ("accession_number", "study_date")
        self._write(
            f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in keys)} WHERE id = ?",
            (*(ids.get(k) for k in keys), job_id),
        )

    def finish(
        self,
        job_id: int,
        status: str,
        reason: str | None = None,
        results: list[dict] | None = None,
        sr_uid: str | None = None,
        sc_uid: str | None = None,
    ) -> None:
        """Close a job: 'done' (with results), 'failed' or 'skipped' (with the reason)."""
        if status not in ("done", "failed", "skipped"):
            raise ValueError(f"cannot finish a job as {status!r}")
        self._write(
            "UPDATE jobs SET status = ?, reason = ?, results = ?, sr_uid = ?, sc_uid = ?, "
            "finished_at = ?, attempts = attempts + 1 WHERE id = ?",
            (
                status,
                reason,
                None if results is None else json.dumps(results),
                sr_uid,
                sc_uid,
                time.time(),
                job_id,
            ),
        )

    def retry_later(self, job_id: int, delay_s: float, reason: str, count: bool) -> None:
        """Back to 'pending', due in ``delay_s``; ``count``: the attempt counts (an error of
        ours), or not (Orthanc was unavailable)."""
        self._write(
            "UPDATE jobs SET status = 'pending', next_attempt_at = ?, reason = ?, "
            "attempts = attempts + ? WHERE id = ?",
            (time.time() + delay_s, reason, 1 if count else 0, job_id),
        )

    # ---- reading

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, include_skipped: bool = False, limit: int = 500) -> list[Job]:
        """Newest first."""
        where = "" if include_skipped else "WHERE status != 'skipped'"
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (int(limit),)
            ).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATES} | {r[0]: int(r[1]) for r in rows}


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values.pop("next_attempt_at")
    values["results"] = None if values["results"] is None else json.loads(values["results"])
    return Job(**values)
