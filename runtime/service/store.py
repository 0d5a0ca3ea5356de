"""The job table of `vidrt serve`, in an embedded SQLite database next to the clips.

    store = JobStore(out_dir / "vidrt-jobs.sqlite")   # UsageError if another server holds it
    store.save(job.id, job.seq, job.status, record)    # insert or replace one job (a JSON record)
    store.load()                                       # every record, in submission order
    store.delete(job.id); store.close()

One writer: the server's event-loop thread is the only one that calls these. The database is in
WAL mode (a crash mid-write leaves the last committed state) with `locking_mode=EXCLUSIVE`, which
takes the file lock at the first access and keeps it, so a second `vidrt serve` pointed at the same
--out is refused instead of sharing the table (https://sqlite.org/pragma.html#pragma_locking_mode;
in WAL mode this also means no -shm file is used: https://sqlite.org/wal.html#noshm). stdlib only.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from vidrt.errors import UsageError

DB_NAME = "vidrt-jobs.sqlite"
DB_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal")  # what SQLite may keep beside it
SCHEMA_VERSION = 1


class JobStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # timeout=0: a database another process holds fails at once instead of waiting
            self.db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self.db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
                            "status TEXT NOT NULL, record TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            version = int(self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise UsageError(f"{self.path.parent} is in use by another vidrt serve (its job table "
                                 f"{self.path.name} is locked); give another --out or stop that server") from None
            raise UsageError(f"cannot open the job table {self.path} ({exc}); check --out") from None
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{self.path} is not a vidrt job table ({exc}); move it away or give another "
                             f"--out") from None
        if version != SCHEMA_VERSION:
            self.db.close()
            raise UsageError(f"{self.path} was written by another vidrt version (schema {version}); give another "
                             f"--out")

    def save(self, job_id: str, seq: int, status: str, record: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO jobs (id, seq, status, record) VALUES (?, ?, ?, ?)",
                        (job_id, seq, status, json.dumps(record, ensure_ascii=False)))

    def delete(self, job_id: str) -> None:
        self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def load(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self.db.execute("SELECT record FROM jobs ORDER BY seq")]

    def close(self) -> None:
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.db.close()
