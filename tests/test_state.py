"""The state database keeps jobs, download bitmaps and transfers across a reopen."""

import sqlite3

from gatewayd.state import StateDB


def test_everything_survives_a_reopen(tmp_path):
    db = StateDB(tmp_path / "state.db")
    db.add_job("gw-01", "job1", "gateway", {"afr_ota": {}}, 3, 1)
    db.add_file("gw-01", "job1", 0, 10240)
    db.save_download("gw-01", "job1", 0, b"\x05", 8192)
    db.add_transfer("gw-01", "job1", 0, "pump")
    db.set_transfer("gw-01", "job1", 0, "pump", phase="uploading", done=100, total=1000)
    db.close()

    db = StateDB(tmp_path / "state.db")
    job = db.job("gw-01", "job1")
    assert (job.kind, job.document, job.version_number, job.execution_number) == ("gateway", {"afr_ota": {}}, 3, 1)
    assert [j.job_id for j in db.open_jobs()] == ["job1"]
    f = db.file("gw-01", "job1", 0)
    assert (f.received, f.done, f.phase) == (b"\x05", 8192, "downloading")
    t = db.transfer("gw-01", "job1", 0, "pump")
    assert (t.phase, t.done, t.total, t.final) == ("uploading", 100, 1000, False)


def test_a_final_decision_is_kept_until_it_is_sent(tmp_path):
    db = StateDB(tmp_path / "state.db")
    db.add_job("pump", "j", "proxied", {}, 1, 1)
    db.decide_job("pump", "j", "SUCCEEDED", "succeeded", None)
    assert db.open_jobs()[0].final_status == "SUCCEEDED"
    db.record_cloud_state("pump", "j", "SUCCEEDED", 4, final_sent=True)
    assert db.open_jobs() == []
    assert db.job("pump", "j").version_number == 4


def test_images_in_use_are_those_of_open_jobs(tmp_path):
    db = StateDB(tmp_path / "state.db")
    for job, sha in (("a", "aa"), ("b", "bb")):
        db.add_job("gw", job, "gateway", {}, 1, 1)
        db.add_file("gw", job, 0, 1)
        db.set_file("gw", job, 0, phase="verified", sha256=sha)
    db.close_job("gw", "a")
    assert db.images_in_use() == {"bb"}
    db.decide_job("gw", "b", "SUCCEEDED", "succeeded", None)  # decided: the relay is done with it
    assert db.images_in_use() == set()


def test_database_is_in_wal_mode_with_full_sync(tmp_path):
    StateDB(tmp_path / "state.db").close()
    con = sqlite3.connect(tmp_path / "state.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
