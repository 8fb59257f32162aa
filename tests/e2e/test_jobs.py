"""End to end: AWS IoT OTA jobs become confirmed images on an SMP device over UART.

Real mosquitto with mutual TLS, the AWS IoT emulator on it, an emulated MCUboot device on
a pseudo-terminal, and the real `ota-gatewayd` as a subprocess with a generated config.
"""

from __future__ import annotations

import hashlib

from gatewayd.emulators.lab import Lab


def _assert_running(lab: Lab, device: str, image: bytes) -> None:
    dev = lab.device(device)
    assert dev.active_image() == image
    assert dev.confirmed


def test_gateway_job_and_proxied_thing_job_both_succeed(lab):
    lab.add_device("pump", thing_name="pump", files="pump-*.bin")
    lab.start()

    first = lab.make_image((1, 1, 0), seed="first")
    lab.ota_update("gw-job-1", "gw-01", first, filepath="pump-1.1.0.bin")
    done = lab.wait("gw-01", "gw-job-1")
    assert done.status == "SUCCEEDED", done
    assert done.status_details["dev:pump"] == "succeeded 1.1.0"
    _assert_running(lab, "pump", first)

    second = lab.make_image((1, 2, 0), seed="second")
    lab.ota_update("pump-job-1", "pump", second)
    done = lab.wait("pump", "pump-job-1")
    assert done.status == "SUCCEEDED", done
    assert done.status_details["device"] == "pump"
    assert done.status_details["version"] == "1.2.0"
    _assert_running(lab, "pump", second)

    # no open work needs an image; the store keeps the one pump runs, and only that one, for the
    # inventory to put back after a swap or a factory reset
    kept = [p.name for p in (lab.root / "state" / "images").iterdir()]
    assert kept == [hashlib.sha256(second).hexdigest()]
    assert list((lab.root / "state" / "partial").iterdir()) == []

    in_progress = [u for u in lab.aws.all_updates("pump", "pump-job-1") if u["status"] == "IN_PROGRESS"]
    assert {"uploading", "testing"} <= {u["statusDetails"]["phase"] for u in in_progress}


def test_tampered_file_and_untrusted_certfile_never_reach_the_device(lab):
    lab.add_device("pump", thing_name="pump")
    lab.start()
    image = lab.make_image((2, 0, 0))

    lab.ota_update("tampered", "pump", image, signed_data=image + b"x")
    done = lab.wait("pump", "tampered")
    assert done.status in ("FAILED", "REJECTED")
    assert "signature" in done.status_details["reason"]

    lab.ota_update("untrusted", "pump", image, certfile="someone_else.pem")
    done = lab.wait("pump", "untrusted")
    assert done.status == "REJECTED"
    assert "someone_else.pem" in done.status_details["reason"]
    assert "certificate" in done.status_details["reason"] or "certfile" in done.status_details["reason"]

    assert lab.device("pump").upload_requests == 0


def test_device_that_reverts_after_the_test_boot_fails_with_rollback_reason(lab):
    lab.add_device("pump", thing_name="pump", confirm_policy="never")
    lab.start()
    old = lab.device("pump").active_image()
    lab.ota_update("reverts", "pump", lab.make_image((1, 5, 0)))
    done = lab.wait("pump", "reverts")
    assert done.status == "FAILED"
    assert "rolled back" in done.status_details["reason"]
    assert lab.device("pump").active_image() == old


def test_device_already_running_the_image_succeeds_without_transfer(lab):
    lab.add_device("pump", thing_name="pump")
    image = lab.device("pump").active_image()
    lab.start()
    lab.ota_update("same", "pump", image)
    done = lab.wait("pump", "same")
    assert done.status == "SUCCEEDED"
    assert lab.device("pump").upload_requests == 0
