"""Conformance cases of aws-iot-ota.md §6 against the running daemon.

Cases 1-15: each malformed document is its own job for the gateway thing. Each one must
end REJECTED with a reason naming what was wrong, the daemon must carry on, and a good job
sent after all of them must still succeed on the same daemon. Then the cases about jobs
that change under a transfer (2, 17, 38), a refused `$next/get` (40) and a stream that
refuses a version (46), and documents too deep to read (issue 11).
"""

from __future__ import annotations

import copy
import json


from gatewayd.emulators.awsiot import RawDocument
from gatewayd.emulators.lab import Lab


def _good_file(lab: Lab, image: bytes) -> dict:
    return {"filepath": "pump.bin", "filesize": len(image), "fileid": 0, "certfile": "ota_signer.pem",
            "update_data_url": None, "auth_scheme": None, "sig-sha256-ecdsa": lab.signer.sign(image)}


def _doc(file: dict, **afr) -> dict:
    return {"afr_ota": {"protocols": ["MQTT"], "streamname": "AFR_OTA-s1", "files": [file], **afr}}


def _without(d: dict, key: str) -> dict:
    d = copy.deepcopy(d)
    d.pop(key)
    return d


def _with(d: dict, **values) -> dict:
    return {**copy.deepcopy(d), **values}


def test_every_malformed_document_is_rejected_with_its_reason_and_a_good_job_still_succeeds(lab):
    lab.add_device("pump", files="pump*.bin")
    lab.start()
    image = lab.make_image((1, 3, 0))
    good = _good_file(lab, image)
    ecdsa_only = _without(good, "sig-sha256-ecdsa")

    # cases 1 and 3: "no job" and invalid JSON on the jobs topics are ignored without a status
    lab.aws.publish_raw("$aws/things/gw-01/jobs/notify-next", b'{"timestamp": 1}')
    lab.aws.publish_raw("$aws/things/gw-01/jobs/notify-next", b"{not json")
    lab.aws.publish_raw("$aws/things/gw-01/jobs/$next/get/accepted", b'{"clientToken": "x", "timestamp": 1}')

    cases = {
        "c04-filesize-missing": (_doc(_without(good, "filesize")), "filesize"),
        "c05-filesize-nan": (_doc(_with(good, filesize="NaN")), "filesize"),
        "c05-fileid-nan": (_doc(_with(good, fileid="NaN")), "fileid"),
        "c06-zero-size": (_doc(_with(good, filesize=0)), "empty"),
        "c07-too-big": (_doc(_with(good, filesize=64 * 1024 * 1024)), "max_file_size"),
        "c08-overflow": (_doc(_with(good, filesize="4294963220")), "filesize"),
        "c08-negative": (_doc(_with(good, filesize=-5)), "filesize"),
        "c09-bad-base64": (_doc(_with(good, **{"sig-sha256-ecdsa": "Zg==="})), "base64"),
        "c10-no-signature": (_doc(ecdsa_only), "signature"),
        "c10-wrong-algorithm": (_doc(_with(ecdsa_only, **{"sig-sha256-rsa": lab.signer.sign(image)})), "RSA"),
        "c11-bad-protocol": ({"afr_ota": {"protocols": ["XYZ"], "streamname": "s", "files": [good]}}, "protocols"),
        "c14-no-streamname": ({"afr_ota": {"protocols": ["MQTT"], "files": [good]}}, "streamname"),
        "c14-empty-streamname": (_doc(good, streamname=""), "streamname"),
        "c15-null-afr-files": ({"afr_ota": {"protocols": ["MQTT"], "streamname": "s", "files": None}}, "files"),
        "not-ota": ({"operation": "reboot"}, "afr_ota"),
    }
    for job_id, (document, _) in cases.items():
        lab.aws.create_job(job_id, ["gw-01"], document)
    # case 13: a job id longer than AWS allows cannot be a real job; the emulator refuses nothing,
    # so send it raw as a notify-next and check that nothing is published for it.
    long_id = "J" * 80
    lab.aws.publish_raw("$aws/things/gw-01/jobs/notify-next",
                        ('{"timestamp":1,"execution":{"jobId":"%s","status":"QUEUED","versionNumber":1,'
                         '"executionNumber":1,"jobDocument":{}}}' % long_id).encode())

    for job_id, (_, word) in cases.items():
        record = lab.wait("gw-01", job_id, timeout=30)
        assert record.status == "REJECTED", (job_id, record)
        reason = record.status_details["reason"]
        assert word.lower() in reason.lower(), (job_id, reason)

    # a good job after all of them still succeeds on the same daemon
    lab.ota_update("good-after-bad", "gw-01", image, filepath="pump.bin")
    record = lab.wait("gw-01", "good-after-bad", timeout=60)
    assert record.status == "SUCCEEDED", record
    assert lab.device("pump").active_image() == image
    assert lab.daemon.poll() is None


def test_a_hostile_filepath_is_only_a_label(lab):
    """Case 15: `../../etc/...` matches the device glob but never becomes a path on the gateway."""
    lab.add_device("pump", files="*pump.bin")
    lab.start()
    image = lab.make_image((1, 4, 0))
    lab.ota_update("c15-traversal", "gw-01", image, filepath="../../../../etc/pump.bin")
    record = lab.wait("gw-01", "c15-traversal", timeout=60)
    assert record.status == "SUCCEEDED", record
    assert lab.device("pump").active_image() == image
    written = {p.relative_to(lab.root).parts[0] for p in lab.root.rglob("*pump.bin")}
    assert written == set()
    assert not (lab.root.parent / "etc").exists()


def test_a_document_nested_too_deeply_is_rejected_and_the_next_job_runs(lab):
    """Issue 11 item 5: 1,200 levels of nesting (past what Python's json can recurse) must not
    leave the job QUEUED and asked for every 30 s: the gateway rejects it with its reason,
    and the job queued behind it runs."""
    lab.add_device("pump", files="pump*.bin")
    lab.start()
    depth = 1200
    lab.aws.create_job("too-deep", ["gw-01"], RawDocument('{"a":' * depth + "1" + "}" * depth))
    image = lab.make_image((1, 3, 0))
    lab.ota_update("behind-too-deep", "gw-01", image, filepath="pump.bin")

    record = lab.wait("gw-01", "too-deep", timeout=20)
    assert record.status == "REJECTED", record
    assert record.status_details["phase"] == "rejected"
    reason = record.status_details["reason"]
    assert "job document" in reason and "nested" in reason and "64" in reason, reason
    assert lab.wait("gw-01", "behind-too-deep", timeout=60).status == "SUCCEEDED"
    assert lab.device("pump").active_image() == image
    assert lab.daemon.poll() is None


def _stream(document: dict) -> str:
    return document["afr_ota"]["streamname"]


def _phases(lab: Lab, thing: str, job_id: str) -> list[str]:
    return [u.get("statusDetails", {}).get("phase") for u in lab.aws.all_updates(thing, job_id)]


def test_case_2_an_empty_notify_next_aborts_the_download_and_the_next_job_is_asked_for(lab):
    """The job being downloaded is cancelled and another one queued; the only notification
    that arrives is the late one saying the queue emptied. The gateway stops the download,
    publishes nothing more for that job, and asks which job is next instead of waiting."""
    dev = lab.add_device("pump", thing_name="pump")
    lab.start()
    stream = _stream(lab.ota_update("vanishes", "pump", lab.make_image((1, 1, 0), size=200 * 1024)))
    lab.aws.pause_streams(True)
    lab.wait_until("the download to start", lambda: lab.aws.requests(stream) > 0
                   and "downloading" in _phases(lab, "pump", "vanishes"), 20)
    updates = len(lab.aws.all_updates("pump", "vanishes"))

    lab.aws.lose_notifications(True)
    lab.aws.cancel_job("vanishes", force=True)
    image = lab.make_image((1, 2, 0), seed="next-one")
    lab.ota_update("next-one", "pump", image)
    lab.aws.lose_notifications(False)
    lab.aws.publish_raw("$aws/things/pump/jobs/notify-next", b'{"timestamp": 1}')
    lab.wait_until("the daemon to abort the download", lambda: "no longer pending" in lab.daemon_log(), 10)
    lab.aws.pause_streams(False)

    done = lab.wait("pump", "next-one", timeout=30)
    assert done.status == "SUCCEEDED", done
    assert dev.active_image() == image
    assert len(lab.aws.all_updates("pump", "vanishes")) == updates
    assert list((lab.root / "state" / "partial").iterdir()) == []


def test_case_17_a_different_job_mid_transfer_aborts_the_old_one_and_deletes_its_part_file(lab):
    """As FreeRTOS's test_OTA_ReceiveNewJobDocWhileInProgress: a notify-next names another job
    while a file is half downloaded. The old job is dropped locally (nothing more is said of
    it), its part file is deleted, and the new job runs."""
    dev = lab.add_device("pump", thing_name="pump")
    lab.start()
    old_stream = _stream(lab.ota_update("old", "pump", lab.make_image((1, 1, 0), size=200 * 1024)))
    lab.aws.drop_blocks(lambda ref: ref.stream_id == old_stream and ref.index >= 8)
    part = lab.root / "state" / "partial" / "pump__old__0.part"
    lab.wait_until("8 blocks of the old file on disk", lambda: part.exists() and part.stat().st_size >= 8 * 1024
                   and "downloading" in _phases(lab, "pump", "old"), 20)
    updates = len(lab.aws.all_updates("pump", "old"))

    image = lab.make_image((1, 2, 0), seed="new")
    document = lab.ota_update("new", "pump", image)  # queued behind "old": no notify-next from AWS
    new = lab.aws.execution("pump", "new")
    execution = {"jobId": "new", "thingName": "pump", "jobDocument": document, "status": "QUEUED",
                 "queuedAt": new.queued_at, "lastUpdatedAt": new.last_updated_at,
                 "versionNumber": new.version_number, "executionNumber": new.execution_number}
    lab.aws.publish_raw("$aws/things/pump/jobs/notify-next",
                        json.dumps({"timestamp": new.queued_at, "execution": execution}).encode())

    done = lab.wait("pump", "new", timeout=30)
    assert done.status == "SUCCEEDED", done
    assert dev.active_image() == image
    assert not part.exists()
    assert list((lab.root / "state" / "partial").iterdir()) == []
    old = lab.aws.execution("pump", "old")
    assert len(old.updates) == updates and old.status == "IN_PROGRESS"  # aborted locally only


def test_case_38_a_plain_cancel_while_in_progress_lets_the_job_finish_and_report(lab):
    """A CancelJob without --force leaves IN_PROGRESS executions alone (aws-iot-ota.md §1.3):
    the download in progress goes on, and the job ends SUCCEEDED like any other."""
    dev = lab.add_device("pump", thing_name="pump")
    lab.start()
    image = lab.make_image((1, 1, 0), size=96 * 1024)
    stream = _stream(lab.ota_update("plain-cancel", "pump", image))
    lab.aws.pause_streams(True, hold=True)
    lab.wait_until("the download to start", lambda: lab.aws.requests(stream) > 0
                   and lab.aws.execution("pump", "plain-cancel").status == "IN_PROGRESS", 20)

    lab.aws.cancel_job("plain-cancel")
    assert lab.aws.job("plain-cancel").status == "CANCELED"
    lab.aws.pause_streams(False)

    done = lab.wait("pump", "plain-cancel", timeout=60)
    assert done.status == "SUCCEEDED", done
    assert done.status_details["phase"] == "succeeded"
    assert dev.active_image() == image and dev.confirmed
    assert {"downloading", "uploading", "succeeded"} <= set(_phases(lab, "pump", "plain-cancel"))


def test_case_46_a_stream_that_says_it_changed_gets_one_fresh_look(lab):
    """A GetStream rejected with ETagMismatch: the gateway describes the stream and reads the
    job again, once; the download then goes on. If the stream keeps refusing, the job fails
    with a reason naming the stream and the code."""
    dev = lab.add_device("pump", thing_name="pump")
    lab.start()

    lab.aws.pause_streams(True, hold=True)
    image = lab.make_image((1, 1, 0), seed="once")
    stream = _stream(lab.ota_update("etag-once", "pump", image))
    lab.aws.reject_stream_requests(stream, "ETagMismatch", message="The S3 object changed")
    lab.aws.pause_streams(False)
    done = lab.wait("pump", "etag-once", timeout=30)
    assert done.status == "SUCCEEDED", done
    assert dev.active_image() == image
    stats = lab.aws.stream_stats(stream)
    assert stats.describes == 1 and [code for code, _ in stats.rejections] == ["ETagMismatch"]
    requests = lab.aws.stream_requests(stream)
    assert "s" not in requests[0] and all(r.get("s") == 1 for r in requests[1:])

    lab.aws.pause_streams(True, hold=True)
    stream = _stream(lab.ota_update("etag-always", "pump", lab.make_image((1, 2, 0), seed="always")))
    lab.aws.reject_stream_requests(stream, "ETagMismatch", count=10, message="The S3 object changed")
    lab.aws.pause_streams(False)
    done = lab.wait("pump", "etag-always", timeout=30)
    assert done.status == "FAILED", done
    reason = done.status_details["reason"]
    assert stream in reason and "ETagMismatch" in reason and "again" in reason, reason
    assert lab.aws.stream_stats(stream).describes == 1 and lab.aws.requests(stream) == 2
    assert dev.active_image() == image
    assert list((lab.root / "state" / "partial").iterdir()) == []
