"""The state database keeps jobs, download bitmaps and transfers across a reopen."""

import os
import sqlite3
import stat

import pytest

from gatewayd.state import FileKey, JobKey, MissingRecord, StateDB, TransferKey
from gatewayd.vocab import CloudStatus, FilePhase, JobKind, TransferPhase, Word


def test_everything_survives_a_reopen(tmp_path):
    db = StateDB(tmp_path / "state.db")
    job_key, file_key = JobKey("gw-01", "job1"), FileKey("gw-01", "job1", 0)
    transfer_key = TransferKey("gw-01", "job1", 0, "pump")
    db.add_job(job_key, JobKind.GATEWAY, {"afr_ota": {}}, 3, 1)
    db.add_file(file_key, 10240)
    db.save_download(file_key, b"\x05", 8192)
    db.add_transfer(transfer_key)
    db.set_transfer(transfer_key, phase=TransferPhase.UPLOADING, done=100, total=1000)
    db.close()

    db = StateDB(tmp_path / "state.db")
    job = db.job(job_key)
    assert (job.kind, job.document, job.version_number, job.execution_number) == ("gateway", {"afr_ota": {}}, 3, 1)
    assert job.kind is JobKind.GATEWAY and job.key == job_key
    assert [j.job_id for j in db.open_jobs()] == ["job1"]
    f = db.file(file_key)
    assert (f.received, f.done, f.phase) == (b"\x05", 8192, FilePhase.DOWNLOADING)
    t = db.transfer(transfer_key)
    assert (t.phase, t.done, t.total, t.final) == (TransferPhase.UPLOADING, 100, 1000, False)
    assert t.key == transfer_key and t.key.file == file_key and t.key.job == job_key


def test_a_final_decision_is_kept_until_it_is_sent(tmp_path):
    db = StateDB(tmp_path / "state.db")
    key = JobKey("pump", "j")
    db.add_job(key, JobKind.PROXIED, {}, 1, 1)
    db.decide_job(key, CloudStatus.SUCCEEDED, Word.SUCCEEDED, None)
    assert db.open_jobs()[0].final_status is CloudStatus.SUCCEEDED
    db.record_cloud_state(key, CloudStatus.SUCCEEDED, 4, final_sent=True)
    assert db.open_jobs() == []
    assert db.job(key).version_number == 4


def test_images_in_use_are_those_of_open_jobs(tmp_path):
    db = StateDB(tmp_path / "state.db")
    for job, sha in (("a", "aa"), ("b", "bb")):
        db.add_job(JobKey("gw", job), JobKind.GATEWAY, {}, 1, 1)
        db.add_file(FileKey("gw", job, 0), 1)
        db.set_file(FileKey("gw", job, 0), phase=FilePhase.VERIFIED, sha256=sha)
    db.close_job(JobKey("gw", "a"))
    assert db.images_in_use() == {"bb"}
    db.decide_job(JobKey("gw", "b"), CloudStatus.SUCCEEDED, Word.SUCCEEDED, None)  # decided: the relay is done with it
    assert db.images_in_use() == set()


def test_a_missing_record_is_named_and_an_unknown_column_refused(tmp_path):
    db = StateDB(tmp_path / "state.db")
    assert db.find_job(JobKey("gw", "nope")) is None
    with pytest.raises(MissingRecord, match="no job nope of thing 'gw'"):
        db.job(JobKey("gw", "nope"))
    with pytest.raises(MissingRecord, match=r"no transfer of files\[0\] of job nope to pump"):
        db.transfer(TransferKey("gw", "nope", 0, "pump"))
    db.add_job(JobKey("gw", "j"), JobKind.GATEWAY, {})
    db.add_file(FileKey("gw", "j", 0), 1)
    with pytest.raises(ValueError, match="files has no column"):
        db.set_file(FileKey("gw", "j", 0), bogus=1)


def test_database_is_in_wal_mode_with_full_sync(tmp_path):
    StateDB(tmp_path / "state.db").close()
    con = sqlite3.connect(tmp_path / "state.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_status_this_version_does_not_know_does_not_stop_it_reading_the_job(tmp_path):
    db = StateDB(tmp_path / "state.db")
    db.add_job(JobKey("pump", "j"), JobKind.PROXIED, {})
    db.close()
    con = sqlite3.connect(tmp_path / "state.db")
    con.execute("UPDATE jobs SET cloud_status='PAUSED'")
    con.commit()
    con.close()
    db = StateDB(tmp_path / "state.db")
    assert [(j.job_id, j.cloud_status) for j in db.open_jobs()] == [("j", None)]


@pytest.fixture
def umask():
    """Set the process umask for one test (outside systemd's UMask= it is the caller's)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def _modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o000], ids=lambda mask: f"umask {mask:03o}")
def test_the_database_and_its_wal_are_private_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    state_dir = tmp_path / "state"
    db = StateDB(state_dir / "state.db")
    db.add_job(JobKey("gw-01", "job1"), JobKind.GATEWAY, {"files": [{"url": "https://s3/presigned?X-Amz-Signature=1"}]})
    # while it is open, the write-ahead log and its index are on disk beside it
    assert _modes(state_dir) == {"state.db": 0o600, "state.db-shm": 0o600, "state.db-wal": 0o600}
    db.close()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o750


def test_an_older_readable_database_and_its_leftovers_are_made_private(tmp_path, caplog):
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x)")
    old.close()
    leftovers = [tmp_path / "state.db-wal", tmp_path / "state.db-journal"]  # an older daemon's crash
    for file in [path, *leftovers]:
        file.touch()
        os.chmod(file, 0o644)

    caplog.set_level("INFO", logger="gatewayd.state")
    db = StateDB(path)
    db.add_job(JobKey("gw-01", "job1"), JobKind.GATEWAY, {})
    assert {name: mode for name, mode in _modes(tmp_path).items() if name.startswith("state.db")} == {
        "state.db": 0o600, "state.db-journal": 0o600, "state.db-shm": 0o600, "state.db-wal": 0o600}
    db.close()
    assert f"{path} was mode 0644" in caplog.text
