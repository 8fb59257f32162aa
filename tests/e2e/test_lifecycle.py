"""Cancellation, reload and a full disk, with the real daemon, broker and devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest


@pytest.mark.cloud_may_refuse("TerminalStateReached", why="an update already on its way when AWS IoT cancels "
                              "the job is refused; the daemon then stops the job")
def test_force_cancel_mid_upload_stops_work_and_cleans_up(lab):
    dev = lab.add_device("pump", thing_name="pump", response_delay=0.01)
    lab.start()
    image = lab.make_image((1, 1, 0), size=96 * 1024)
    lab.ota_update("cancel-me", "pump", image)
    lab.wait_until("the upload to start", lambda: (dev.upload_offset or 0) > 16 * 1024, 30)

    lab.aws.cancel_job("cancel-me", force=True)
    lab.wait_until("the daemon to notice the cancellation",
                   lambda: "gone in the cloud" in lab.daemon_log() or "no longer pending" in lab.daemon_log(), 10)

    def pump_phase() -> str | None:
        devices = json.loads(lab.ctl("status", "--json").stdout).get("devices") or []
        return next((d.get("phase") for d in devices if d.get("name") == "pump"), None)

    # the daemon logs the cancellation before it stops the upload, and a request it wrote
    # before that may still be on its way through the pty: count from the stop, once those landed
    lab.wait_until("the upload to be stopped", lambda: pump_phase() == "cancelled", 10)
    time.sleep(0.3)
    received = dev.upload_bytes_received
    updates = len(lab.aws.all_updates("pump", "cancel-me"))
    time.sleep(2.5)
    assert dev.upload_bytes_received == received, "the upload went on after the cancellation"
    record = lab.aws.execution("pump", "cancel-me")
    assert record.status == "CANCELED"
    assert len(record.updates) == updates and len(record.rejections) <= 1  # the marker allows that one
    state = lab.root / "state"
    assert list((state / "partial").iterdir()) == []
    assert list((state / "images").iterdir()) == []

    # the device was left mid-upload; the next update starts from there without trouble
    second = lab.make_image((1, 2, 0), size=32 * 1024)
    lab.ota_update("after-cancel", "pump", second)
    assert lab.wait("pump", "after-cancel").status == "SUCCEEDED"
    assert dev.active_image() == second


def test_notify_next_without_execution_during_download_aborts_it(lab):
    """Conformance case 2: the head of the queue vanished; stop, keep nothing, publish nothing."""
    lab.add_device("pump", thing_name="pump")
    lab.start()
    image = lab.make_image((1, 1, 0), size=200 * 1024)
    doc = lab.ota_update("vanishes", "pump", image)
    stream = doc["afr_ota"]["streamname"]
    lab.aws.pause_streams(True)
    lab.wait_until("a stream request", lambda: lab.aws.requests(stream) > 0, 20)
    updates = len(lab.aws.all_updates("pump", "vanishes"))
    lab.aws.publish_raw("$aws/things/pump/jobs/notify-next", b'{"timestamp": 1}')
    lab.wait_until("the daemon to abort", lambda: "no longer pending" in lab.daemon_log(), 10)
    time.sleep(1)
    assert len(lab.aws.all_updates("pump", "vanishes")) == updates
    assert list((lab.root / "state" / "partial").iterdir()) == []


def test_sighup_reload_serves_a_new_device(lab):
    lab.add_device("pump", files="pump-*.bin")
    lab.start()
    fan_image = lab.make_image((3, 0, 0))
    lab.ota_update("fan-before", "gw-01", fan_image, filepath="fan-3.0.0.bin")
    before = lab.wait("gw-01", "fan-before")
    assert before.status == "REJECTED" and "matches no device" in before.status_details["reason"]

    lab.add_device("fan", files="fan-*.bin")
    lab.write_config()
    lab.daemon.send_signal(signal.SIGHUP)
    lab.wait_until("the reload", lambda: "reloaded configuration (2 devices): applied: devices (added fan)"
                   in lab.daemon_log(), 10)
    lab.ota_update("fan-after", "gw-01", fan_image, filepath="fan-3.0.0.bin")
    assert lab.wait("gw-01", "fan-after").status == "SUCCEEDED"
    assert lab.device("fan").active_image() == fan_image


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as the state folder needs root")
def test_full_disk_fails_that_job_removes_its_part_and_others_go_on(lab):
    state = lab.root / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(state)], check=True)
    try:
        lab.add_device("pump", thing_name="pump")
        lab.start()
        lab.ota_update("too-big", "pump", lab.make_image((2, 0, 0), size=900 * 1024))
        record = lab.wait("pump", "too-big", timeout=60)
        assert record.status == "FAILED", record
        assert "space" in record.status_details["reason"].lower(), record.status_details
        assert list((state / "partial").iterdir()) == []

        small = lab.make_image((2, 1, 0), size=32 * 1024)
        lab.ota_update("fits", "pump", small)
        assert lab.wait("pump", "fits").status == "SUCCEEDED"
        assert lab.device("pump").active_image() == small
        assert lab.daemon.poll() is None
    finally:
        lab.stop_daemon()
        subprocess.run(["umount", "-l", str(state)], check=False)
