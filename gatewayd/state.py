"""The state database: the single source of truth for jobs, downloads and device transfers.

SQLite in WAL mode with `synchronous=FULL`, so a committed write is on disk before the
caller acts on it (design.md "State on disk"). Every state change goes through one of the
small methods here, each one transaction. The daemon owns a single connection and uses it
from the event loop thread only; writes are small, so they are not worth a thread hop.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    thing TEXT NOT NULL,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- 'proxied' or 'gateway'
    document TEXT NOT NULL,             -- the jobDocument as received (JSON)
    phase TEXT NOT NULL,                -- status word of the execution as a whole
    reason TEXT,
    final_status TEXT,                  -- SUCCEEDED/FAILED/REJECTED once decided
    final_sent INTEGER NOT NULL DEFAULT 0,
    cloud_status TEXT,                  -- last status the cloud accepted
    version_number INTEGER,             -- execution versionNumber after our last accepted update
    execution_number INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (thing, job_id)
);
CREATE TABLE IF NOT EXISTS files (
    thing TEXT NOT NULL,
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    size INTEGER NOT NULL,
    received BLOB,                      -- LSB-first bitmap of blocks on disk (fsynced)
    done INTEGER NOT NULL DEFAULT 0,
    phase TEXT NOT NULL,                -- downloading, verifying, verified, failed
    protocol TEXT,                      -- MQTT (received = bitmap) or HTTP (done = bytes from 0)
    block_size INTEGER,                 -- MQTT: the block size the bitmap counts in
    sha256 TEXT,                        -- set once verified: images/<sha256>
    version TEXT,
    image_hash TEXT,
    reason TEXT,
    PRIMARY KEY (thing, job_id, idx)
);
CREATE TABLE IF NOT EXISTS transfers (
    thing TEXT NOT NULL,
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    device TEXT NOT NULL,
    phase TEXT NOT NULL,                -- design.md status words, plus 'rebooting' (test set, reset pending)
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT,
    version TEXT,
    reason TEXT,
    unreachable_since REAL,
    updated REAL NOT NULL,
    PRIMARY KEY (thing, job_id, idx, device)
);
"""

FINAL_WORDS = frozenset({"succeeded", "failed", "rejected", "cancelled"})


@dataclass
class JobRecord:
    thing: str
    job_id: str
    kind: str
    document: object
    phase: str
    reason: str | None
    final_status: str | None
    final_sent: bool
    cloud_status: str | None
    version_number: int | None
    execution_number: int | None

    @property
    def open(self) -> bool:
        return not self.final_sent


@dataclass
class FileRecord:
    thing: str
    job_id: str
    idx: int
    size: int
    received: bytes | None
    done: int
    phase: str
    protocol: str | None
    block_size: int | None
    sha256: str | None
    version: str | None
    image_hash: str | None
    reason: str | None


@dataclass
class TransferRecord:
    thing: str
    job_id: str
    idx: int
    device: str
    phase: str
    done: int
    total: int
    sha256: str | None
    version: str | None
    reason: str | None
    unreachable_since: float | None

    @property
    def final(self) -> bool:
        return self.phase in FINAL_WORDS


@dataclass
class StateDB:
    path: Path
    _db: sqlite3.Connection = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")

    def close(self) -> None:
        self._db.close()

    def _tx(self):
        return _Transaction(self._db)

    # jobs

    def add_job(self, thing: str, job_id: str, kind: str, document: object,
                version_number: int | None, execution_number: int | None) -> JobRecord:
        now = time.time()
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO jobs (thing, job_id, kind, document, phase, version_number,"
                " execution_number, created, updated) VALUES (?,?,?,?,?,?,?,?,?)",
                (thing, job_id, kind, json.dumps(document), "queued", version_number,
                 execution_number, now, now),
            )
        job = self.job(thing, job_id)
        assert job is not None
        return job

    def job(self, thing: str, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE thing=? AND job_id=?", (thing, job_id)).fetchone()
        return _job(row) if row else None

    def open_jobs(self) -> list[JobRecord]:
        rows = self._db.execute("SELECT * FROM jobs WHERE final_sent=0 ORDER BY created").fetchall()
        return [_job(r) for r in rows]

    def recent_jobs(self, limit: int = 50) -> list[JobRecord]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY updated DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def set_job_phase(self, thing: str, job_id: str, phase: str, reason: str | None = None) -> None:
        with self._tx():
            self._db.execute("UPDATE jobs SET phase=?, reason=?, updated=? WHERE thing=? AND job_id=?",
                             (phase, reason, time.time(), thing, job_id))

    def decide_job(self, thing: str, job_id: str, final_status: str, phase: str, reason: str | None) -> None:
        """Record the final outcome before it is reported, so it survives a crash."""
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET final_status=?, phase=?, reason=?, updated=? WHERE thing=? AND job_id=?",
                (final_status, phase, reason, time.time(), thing, job_id))

    def record_cloud_state(self, thing: str, job_id: str, status: str | None,
                           version_number: int | None, final_sent: bool = False) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET cloud_status=COALESCE(?, cloud_status),"
                " version_number=COALESCE(?, version_number), final_sent=MAX(final_sent, ?), updated=?"
                " WHERE thing=? AND job_id=?",
                (status, version_number, int(final_sent), time.time(), thing, job_id))

    def close_job(self, thing: str, job_id: str) -> None:
        """The cloud no longer wants anything from this job (final sent, or job gone)."""
        with self._tx():
            self._db.execute("UPDATE jobs SET final_sent=1, updated=? WHERE thing=? AND job_id=?",
                             (time.time(), thing, job_id))

    # files

    def add_file(self, thing: str, job_id: str, idx: int, size: int) -> FileRecord:
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO files (thing, job_id, idx, size, phase) VALUES (?,?,?,?,?)",
                (thing, job_id, idx, size, "downloading"))
        f = self.file(thing, job_id, idx)
        assert f is not None
        return f

    def file(self, thing: str, job_id: str, idx: int) -> FileRecord | None:
        row = self._db.execute("SELECT * FROM files WHERE thing=? AND job_id=? AND idx=?",
                               (thing, job_id, idx)).fetchone()
        return FileRecord(**dict(row)) if row else None

    def files(self, thing: str, job_id: str) -> list[FileRecord]:
        rows = self._db.execute("SELECT * FROM files WHERE thing=? AND job_id=? ORDER BY idx",
                                (thing, job_id)).fetchall()
        return [FileRecord(**dict(r)) for r in rows]

    def save_download(self, thing: str, job_id: str, idx: int, received: bytes, done: int) -> None:
        with self._tx():
            self._db.execute("UPDATE files SET received=?, done=? WHERE thing=? AND job_id=? AND idx=?",
                             (received, done, thing, job_id, idx))

    def set_file(self, thing: str, job_id: str, idx: int, **values: object) -> None:
        allowed = {"phase", "protocol", "block_size", "sha256", "version", "image_hash", "reason", "done", "received"}
        assert set(values) <= allowed, values
        cols = ", ".join(f"{k}=?" for k in values)
        with self._tx():
            self._db.execute(f"UPDATE files SET {cols} WHERE thing=? AND job_id=? AND idx=?",
                             (*values.values(), thing, job_id, idx))

    def images_sent_to(self, device: str) -> set[str]:
        """MCUboot hashes (hex) of every image a transfer of ours took to `device`."""
        rows = self._db.execute(
            "SELECT DISTINCT f.image_hash FROM transfers t JOIN files f USING (thing, job_id, idx)"
            " WHERE t.device=? AND f.image_hash IS NOT NULL", (device,)).fetchall()
        return {r[0] for r in rows}

    def images_in_use(self) -> set[str]:
        rows = self._db.execute(
            "SELECT DISTINCT f.sha256 FROM files f JOIN jobs j USING (thing, job_id)"
            " WHERE j.final_status IS NULL AND j.final_sent=0 AND f.sha256 IS NOT NULL").fetchall()
        return {r[0] for r in rows}

    # transfers

    def add_transfer(self, thing: str, job_id: str, idx: int, device: str) -> TransferRecord:
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO transfers (thing, job_id, idx, device, phase, updated)"
                " VALUES (?,?,?,?,?,?)", (thing, job_id, idx, device, "queued", time.time()))
        t = self.transfer(thing, job_id, idx, device)
        assert t is not None
        return t

    def transfer(self, thing: str, job_id: str, idx: int, device: str) -> TransferRecord | None:
        row = self._db.execute(
            "SELECT * FROM transfers WHERE thing=? AND job_id=? AND idx=? AND device=?",
            (thing, job_id, idx, device)).fetchone()
        return _transfer(row) if row else None

    def transfers(self, thing: str, job_id: str) -> list[TransferRecord]:
        rows = self._db.execute("SELECT * FROM transfers WHERE thing=? AND job_id=? ORDER BY idx, device",
                                (thing, job_id)).fetchall()
        return [_transfer(r) for r in rows]

    def device_transfers(self, device: str, limit: int = 1) -> list[TransferRecord]:
        rows = self._db.execute("SELECT * FROM transfers WHERE device=? ORDER BY updated DESC LIMIT ?",
                                (device, limit)).fetchall()
        return [_transfer(r) for r in rows]

    def set_transfer(self, thing: str, job_id: str, idx: int, device: str, **values: object) -> None:
        allowed = {"phase", "done", "total", "sha256", "version", "reason", "unreachable_since"}
        assert set(values) <= allowed, values
        cols = ", ".join(f"{k}=?" for k in values)
        with self._tx():
            self._db.execute(
                f"UPDATE transfers SET {cols}, updated=? WHERE thing=? AND job_id=? AND idx=? AND device=?",
                (*values.values(), time.time(), thing, job_id, idx, device))


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _job(row: sqlite3.Row) -> JobRecord:
    d = dict(row)
    return JobRecord(
        thing=d["thing"], job_id=d["job_id"], kind=d["kind"], document=json.loads(d["document"]),
        phase=d["phase"], reason=d["reason"], final_status=d["final_status"],
        final_sent=bool(d["final_sent"]), cloud_status=d["cloud_status"],
        version_number=d["version_number"], execution_number=d["execution_number"])


def _transfer(row: sqlite3.Row) -> TransferRecord:
    d = dict(row)
    d.pop("updated")
    return TransferRecord(**d)
