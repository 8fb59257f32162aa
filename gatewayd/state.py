"""The state database: the single source of truth for jobs, downloads and device transfers.

SQLite in WAL mode with `synchronous=FULL`, so a committed write is on disk before the
caller acts on it (design.md "State on disk"). Every state change goes through one of the
small methods here, each one transaction. The daemon owns a single connection and uses it
from the event loop thread only; writes are small, so they are not worth a thread hop.

Rows are named by typed keys (`JobKey`, `FileKey`, `TransferKey`). `job(key)`, `file(key)`
and `transfer(key)` return the record or raise `MissingRecord`; `find_job(key)` returns
None for a job that may not exist.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .vocab import CloudStatus, FilePhase, JobKind, TransferPhase, Word

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: transfers.high_water and transfers.restarts; 3: devices (the inventory)
# state.db holds presigned download URLs: only the daemon's user reads it. SQLite gives the
# files it creates beside it (-wal, -shm, -journal) the database's own mode.
DB_MODE = 0o600
STATE_DIR_MODE = 0o750  # as the unit's StateDirectoryMode=
_SIDE_FILES = ("-wal", "-shm", "-journal")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    thing TEXT NOT NULL,                -- '' for a local update (no AWS IoT thing)
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- 'gateway', 'proxied', 'local' or 'redeliver' (vocab.JobKind)
    document TEXT NOT NULL,             -- the jobDocument as received, or a local update's request (JSON)
    phase TEXT NOT NULL,                -- status word of the job as a whole (vocab.Word)
    reason TEXT,
    final_status TEXT,                  -- SUCCEEDED/FAILED/REJECTED/CANCELED once decided
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
    phase TEXT NOT NULL,                -- receiving, downloading, verifying, verified, failed (vocab.FilePhase)
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
    phase TEXT NOT NULL,                -- vocab.TransferPhase: the status words plus 'rebooting'
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT,
    version TEXT,
    reason TEXT,
    unreachable_since REAL,             -- since when the device makes no new progress (none: it does)
    high_water INTEGER NOT NULL DEFAULT 0, -- the most upload bytes the device ever acknowledged
    restarts INTEGER NOT NULL DEFAULT 0,   -- times it went back below high_water (lost the upload)
    updated REAL NOT NULL,
    PRIMARY KEY (thing, job_id, idx, device)
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    images TEXT,                        -- the image list the device last gave (JSON), with
    seen REAL,                          --   when it gave it
    shadow TEXT,                        -- the named shadow ("<thing>/<shadow>") of the last report AWS accepted,
    reported TEXT                       --   and that report's reported state without `seen` (JSON)
);
"""

# what each schema version added, for a state.db an older version made
_MIGRATIONS = {
    2: ["ALTER TABLE transfers ADD COLUMN high_water INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE transfers ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0"],
}


class StateTooNew(RuntimeError):
    """state.db was written by a newer release, whose schema this one does not know."""


class MissingRecord(LookupError):
    """A job, file or transfer that should be in the database is not."""


@dataclass(frozen=True)
class JobKey:
    thing: str
    job_id: str


@dataclass(frozen=True)
class FileKey:
    thing: str
    job_id: str
    idx: int

    @property
    def job(self) -> JobKey:
        return JobKey(self.thing, self.job_id)


@dataclass(frozen=True)
class TransferKey:
    thing: str
    job_id: str
    idx: int
    device: str

    @property
    def job(self) -> JobKey:
        return JobKey(self.thing, self.job_id)

    @property
    def file(self) -> FileKey:
        return FileKey(self.thing, self.job_id, self.idx)


@dataclass
class JobRecord:
    thing: str
    job_id: str
    kind: JobKind
    document: object
    phase: Word
    reason: str | None
    final_status: CloudStatus | None
    final_sent: bool
    cloud_status: CloudStatus | None
    version_number: int | None
    execution_number: int | None

    @property
    def key(self) -> JobKey:
        return JobKey(self.thing, self.job_id)

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
    phase: FilePhase
    protocol: str | None
    block_size: int | None
    sha256: str | None
    version: str | None
    image_hash: str | None
    reason: str | None

    @property
    def key(self) -> FileKey:
        return FileKey(self.thing, self.job_id, self.idx)


@dataclass
class TransferRecord:
    thing: str
    job_id: str
    idx: int
    device: str
    phase: TransferPhase
    done: int
    total: int
    sha256: str | None
    version: str | None
    reason: str | None
    unreachable_since: float | None
    high_water: int = 0
    restarts: int = 0

    @property
    def key(self) -> TransferKey:
        return TransferKey(self.thing, self.job_id, self.idx, self.device)

    @property
    def word(self) -> Word:
        return self.phase.word

    @property
    def final(self) -> bool:
        return self.phase.final


_FILE_COLUMNS = frozenset({"phase", "protocol", "block_size", "sha256", "version", "image_hash", "reason", "done",
                           "received"})
_TRANSFER_COLUMNS = frozenset({"phase", "done", "total", "sha256", "version", "reason", "unreachable_since",
                               "high_water", "restarts"})


@dataclass(frozen=True)
class Inventoried:
    """What the state database knows of a device between transfers (the `devices` table)."""

    device: str
    images: list[dict[str, object]] | None  # as `ImageSlot.as_dict` gives them
    seen: float | None
    shadow: str | None
    reported: dict[str, object] | None


@dataclass(frozen=True)
class Placed:
    """An image a transfer of this gateway got onto a device and confirmed there."""

    device: str
    job: JobKey
    kind: JobKind
    idx: int
    sha256: str
    image_hash: str
    version: str
    at: float


@dataclass(frozen=True)
class Ended:
    """A device's transfer that reached its final word."""

    job_id: str
    kind: JobKind
    word: Word
    version: str | None
    reason: str | None
    at: float


@dataclass
class StateDB:
    path: Path
    _db: sqlite3.Connection = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        _make_private(self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        """Bring a state.db an older version made up to this schema; newer ones are refused."""
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StateTooNew(f"{self.path} has schema version {found}, newer than this ota-gatewayd's "
                              f"{SCHEMA_VERSION}: it was written by a newer release (downgraded package?): "
                              "install that release again, or move the file away to start afresh")
        if found and found < SCHEMA_VERSION:
            with self._tx():
                for version in range(found + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS.get(version, []):
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    # jobs

    def add_job(self, key: JobKey, kind: JobKind, document: object,
                version_number: int | None = None, execution_number: int | None = None) -> JobRecord:
        now = time.time()
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO jobs (thing, job_id, kind, document, phase, version_number,"
                " execution_number, created, updated) VALUES (?,?,?,?,?,?,?,?,?)",
                (key.thing, key.job_id, str(kind), json.dumps(document), str(Word.QUEUED), version_number,
                 execution_number, now, now),
            )
        return self.job(key)

    def find_job(self, key: JobKey) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE thing=? AND job_id=?", (key.thing, key.job_id)).fetchone()
        return _job(row) if row else None

    def job(self, key: JobKey) -> JobRecord:
        job = self.find_job(key)
        if job is None:
            raise MissingRecord(f"no job {key.job_id} of thing {key.thing!r} in {self.path}")
        return job

    def open_jobs(self) -> list[JobRecord]:
        rows = self._db.execute("SELECT * FROM jobs WHERE final_sent=0 ORDER BY created").fetchall()
        return [_job(r) for r in rows]

    def recent_jobs(self, limit: int = 50) -> list[JobRecord]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY updated DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def set_job_phase(self, key: JobKey, phase: Word, reason: str | None = None) -> None:
        with self._tx():
            self._db.execute("UPDATE jobs SET phase=?, reason=?, updated=? WHERE thing=? AND job_id=?",
                             (str(phase), reason, time.time(), key.thing, key.job_id))

    def decide_job(self, key: JobKey, final_status: CloudStatus, phase: Word, reason: str | None) -> None:
        """Record the final outcome before it is reported, so it survives a crash."""
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET final_status=?, phase=?, reason=?, updated=? WHERE thing=? AND job_id=?",
                (str(final_status), str(phase), reason, time.time(), key.thing, key.job_id))

    def record_cloud_state(self, key: JobKey, status: CloudStatus | None, version_number: int | None,
                           final_sent: bool = False) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET cloud_status=COALESCE(?, cloud_status),"
                " version_number=COALESCE(?, version_number), final_sent=MAX(final_sent, ?), updated=?"
                " WHERE thing=? AND job_id=?",
                (None if status is None else str(status), version_number, int(final_sent), time.time(),
                 key.thing, key.job_id))

    def close_job(self, key: JobKey) -> None:
        """The cloud no longer wants anything from this job (final sent, or job gone)."""
        with self._tx():
            self._db.execute("UPDATE jobs SET final_sent=1, updated=? WHERE thing=? AND job_id=?",
                             (time.time(), key.thing, key.job_id))

    # files

    def add_file(self, key: FileKey, size: int, phase: FilePhase = FilePhase.DOWNLOADING) -> FileRecord:
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO files (thing, job_id, idx, size, phase) VALUES (?,?,?,?,?)",
                (key.thing, key.job_id, key.idx, size, str(phase)))
        return self.file(key)

    def file(self, key: FileKey) -> FileRecord:
        row = self._db.execute("SELECT * FROM files WHERE thing=? AND job_id=? AND idx=?",
                               (key.thing, key.job_id, key.idx)).fetchone()
        if row is None:
            raise MissingRecord(f"no files[{key.idx}] of job {key.job_id} ({key.thing!r}) in {self.path}")
        return _file(row)

    def files(self, key: JobKey) -> list[FileRecord]:
        rows = self._db.execute("SELECT * FROM files WHERE thing=? AND job_id=? ORDER BY idx",
                                (key.thing, key.job_id)).fetchall()
        return [_file(r) for r in rows]

    def save_download(self, key: FileKey, received: bytes, done: int) -> None:
        self.set_file(key, received=received, done=done)

    def set_file(self, key: FileKey, **values: object) -> None:
        _check_columns("files", values, _FILE_COLUMNS)
        cols = ", ".join(f"{k}=?" for k in values)
        with self._tx():
            self._db.execute(f"UPDATE files SET {cols} WHERE thing=? AND job_id=? AND idx=?",
                             (*_plain(values), key.thing, key.job_id, key.idx))

    def images_sent_to(self, device: str) -> set[str]:
        """MCUboot hashes (hex) of every image a transfer of ours took to `device`."""
        rows = self._db.execute(
            "SELECT DISTINCT f.image_hash FROM transfers t JOIN files f USING (thing, job_id, idx)"
            " WHERE t.device=? AND f.image_hash IS NOT NULL", (device,)).fetchall()
        return {r[0] for r in rows}

    def images_in_use(self, kept_for: Iterable[str] = ()) -> set[str]:
        """The images undecided jobs need, and the last one placed on each device of `kept_for`."""
        rows = self._db.execute(
            "SELECT DISTINCT f.sha256 FROM files f JOIN jobs j USING (thing, job_id)"
            " WHERE j.final_status IS NULL AND j.final_sent=0 AND f.sha256 IS NOT NULL").fetchall()
        kept = {placed.sha256 for placed in map(self.last_placed, kept_for) if placed is not None}
        return {r[0] for r in rows} | kept

    # transfers

    def add_transfer(self, key: TransferKey) -> TransferRecord:
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO transfers (thing, job_id, idx, device, phase, updated)"
                " VALUES (?,?,?,?,?,?)",
                (key.thing, key.job_id, key.idx, key.device, str(TransferPhase.QUEUED), time.time()))
        return self.transfer(key)

    def transfer(self, key: TransferKey) -> TransferRecord:
        row = self._db.execute(
            "SELECT * FROM transfers WHERE thing=? AND job_id=? AND idx=? AND device=?",
            (key.thing, key.job_id, key.idx, key.device)).fetchone()
        if row is None:
            raise MissingRecord(f"no transfer of files[{key.idx}] of job {key.job_id} to {key.device} in {self.path}")
        return _transfer(row)

    def transfers(self, key: JobKey) -> list[TransferRecord]:
        rows = self._db.execute("SELECT * FROM transfers WHERE thing=? AND job_id=? ORDER BY idx, device",
                                (key.thing, key.job_id)).fetchall()
        return [_transfer(r) for r in rows]

    def device_transfers(self, device: str, limit: int = 1) -> list[TransferRecord]:
        rows = self._db.execute("SELECT * FROM transfers WHERE device=? ORDER BY updated DESC LIMIT ?",
                                (device, limit)).fetchall()
        return [_transfer(r) for r in rows]

    def last_placed(self, device: str) -> Placed | None:
        """The image the latest successful transfer to `device` left running there."""
        row = self._db.execute(
            "SELECT t.thing, t.job_id, t.idx, t.updated, j.kind, f.sha256, f.image_hash, f.version"
            " FROM transfers t JOIN files f USING (thing, job_id, idx) JOIN jobs j USING (thing, job_id)"
            " WHERE t.device=? AND t.phase=? AND f.sha256 IS NOT NULL AND f.image_hash IS NOT NULL"
            " ORDER BY t.updated DESC LIMIT 1", (device, str(TransferPhase.SUCCEEDED))).fetchone()
        if row is None:
            return None
        return Placed(device=device, job=JobKey(row["thing"], row["job_id"]), kind=JobKind(row["kind"]),
                      idx=row["idx"], sha256=row["sha256"], image_hash=row["image_hash"],
                      version=row["version"] or "", at=row["updated"])

    def last_ended(self, device: str) -> Ended | None:
        """The device's latest transfer that reached a final phase."""
        finals = [str(p) for p in TransferPhase if p.final]
        row = self._db.execute(
            f"SELECT t.job_id, t.phase, t.reason, t.updated, j.kind, COALESCE(t.version, f.version) AS version"
            f" FROM transfers t JOIN jobs j USING (thing, job_id) LEFT JOIN files f USING (thing, job_id, idx)"
            f" WHERE t.device=? AND t.phase IN ({','.join('?' * len(finals))}) ORDER BY t.updated DESC LIMIT 1",
            (device, *finals)).fetchone()
        if row is None:
            return None
        return Ended(job_id=row["job_id"], kind=JobKind(row["kind"]), word=TransferPhase(row["phase"]).word,
                     version=row["version"], reason=row["reason"], at=row["updated"])

    def failed_since(self, device: str, kind: JobKind, sha256: str, since: float) -> int:
        """Jobs of `kind` created after `since` to take the image `sha256` to `device` that were
        decided otherwise than SUCCEEDED (failed on the device, or before it)."""
        row = self._db.execute(
            "SELECT COUNT(DISTINCT j.job_id) FROM jobs j JOIN files f USING (thing, job_id)"
            " JOIN transfers t USING (thing, job_id, idx) WHERE t.device=? AND j.kind=? AND f.sha256=?"
            " AND j.created>? AND j.final_status IS NOT NULL AND j.final_status<>?",
            (device, str(kind), sha256, since, str(CloudStatus.SUCCEEDED))).fetchone()
        return int(row[0])

    # the inventory

    def inventoried(self, device: str) -> Inventoried:
        row = self._db.execute("SELECT * FROM devices WHERE device=?", (device,)).fetchone()
        if row is None:
            return Inventoried(device, None, None, None, None)
        return Inventoried(device=device, images=_json_or_none(row["images"]), seen=row["seen"],
                           shadow=row["shadow"], reported=_json_or_none(row["reported"]))

    def save_images(self, device: str, images: list[dict[str, object]], seen: float) -> None:
        with self._tx():
            self._db.execute("INSERT INTO devices (device, images, seen) VALUES (?,?,?) ON CONFLICT(device)"
                             " DO UPDATE SET images=excluded.images, seen=excluded.seen",
                             (device, json.dumps(images), seen))

    def save_report(self, device: str, shadow: str, reported: dict[str, object]) -> None:
        """The report AWS IoT accepted for the device's shadow: the next one is sent only if it differs."""
        with self._tx():
            self._db.execute("INSERT INTO devices (device, shadow, reported) VALUES (?,?,?) ON CONFLICT(device)"
                             " DO UPDATE SET shadow=excluded.shadow, reported=excluded.reported",
                             (device, shadow, json.dumps(reported, sort_keys=True)))

    def set_transfer(self, key: TransferKey, **values: object) -> None:
        _check_columns("transfers", values, _TRANSFER_COLUMNS)
        cols = ", ".join(f"{k}=?" for k in values)
        with self._tx():
            self._db.execute(
                f"UPDATE transfers SET {cols}, updated=? WHERE thing=? AND job_id=? AND idx=? AND device=?",
                (*_plain(values), time.time(), key.thing, key.job_id, key.idx, key.device))


def _make_private(path: Path) -> None:
    """Create the database file DB_MODE whatever the umask (SQLite would make it 0644), and
    take group and others' access from one an older version left, and from its side files."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, DB_MODE)
    try:
        _restrict(fd, path)
    finally:
        os.close(fd)
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        try:
            fd = os.open(side, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            _restrict(fd, side)
        finally:
            os.close(fd)


def _restrict(fd: int, path: Path) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & ~DB_MODE:
        os.fchmod(fd, DB_MODE)
        log.info("%s was mode %04o (it holds presigned URLs); now %04o", path, mode, DB_MODE)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _check_columns(table: str, values: dict[str, object], allowed: frozenset[str]) -> None:
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"{table} has no column(s) {', '.join(sorted(unknown))} to set")


def _plain(values: dict[str, object]) -> list[object]:
    """Enum members as the plain strings SQLite stores."""
    return [str(v) if isinstance(v, str) else v for v in values.values()]


def _job(row: sqlite3.Row) -> JobRecord:
    d = dict(row)
    return JobRecord(
        thing=d["thing"], job_id=d["job_id"], kind=JobKind(d["kind"]), document=json.loads(d["document"]),
        phase=Word(d["phase"]), reason=d["reason"], final_status=_status(d["final_status"]),
        final_sent=bool(d["final_sent"]), cloud_status=_status(d["cloud_status"]),
        version_number=d["version_number"], execution_number=d["execution_number"])


def _status(value: str | None) -> CloudStatus | None:
    """A stored AWS status; None for one this version does not know (never a reason not to start)."""
    try:
        return None if value is None else CloudStatus(value)
    except ValueError:
        return None


def _file(row: sqlite3.Row) -> FileRecord:
    d = dict(row)
    d["phase"] = FilePhase(d["phase"])
    return FileRecord(**d)


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _transfer(row: sqlite3.Row) -> TransferRecord:
    d = dict(row)
    d.pop("updated")
    d["phase"] = TransferPhase(d["phase"])
    return TransferRecord(**d)
