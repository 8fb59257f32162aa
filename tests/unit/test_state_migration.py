"""A state.db written by an older release is brought up to the current schema, in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gatewayd.state import SCHEMA_VERSION, StateDB, StateTooNew, TransferKey

KEY = TransferKey("pump", "job-1", 0, "pump")

# transfers as schema version 1 (release 0.1.0) made it
V1_TRANSFERS = """
CREATE TABLE transfers (
    thing TEXT NOT NULL, job_id TEXT NOT NULL, idx INTEGER NOT NULL, device TEXT NOT NULL,
    phase TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT, version TEXT, reason TEXT, unreachable_since REAL, updated REAL NOT NULL,
    PRIMARY KEY (thing, job_id, idx, device)
);
INSERT INTO transfers (thing, job_id, idx, device, phase, done, total, updated)
    VALUES ('pump', 'job-1', 0, 'pump', 'uploading', 4096, 65536, 0);
PRAGMA user_version=1;
"""


def test_a_version_1_database_keeps_its_transfers_and_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(V1_TRANSFERS)
    state = StateDB(path)
    record = state.transfer(KEY)
    assert (record.done, record.total, record.high_water, record.restarts) == (4096, 65536, 0, 0)
    state.set_transfer(KEY, high_water=8192, restarts=1)
    assert state.transfer(KEY).high_water == 8192
    state.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    StateDB(path).close()  # opening it again changes nothing


def test_a_database_from_a_newer_release_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StateTooNew, match=f"{path} has schema version {SCHEMA_VERSION + 1}, newer than"):
        StateDB(path)
