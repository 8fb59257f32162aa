"""Devices that would keep a job from ever ending (issue 11), with the real daemon.

One gateway job for five devices on ptys: three of them hostile in one way each (the emulator's
faults: a crash at the same offset on every attempt, offsets that go forward, back to 0 and
forward again, offsets beyond what it received), one whose console babbles log text without a
newline at 512 KB/s, one honest. Each hostile device's transfer must end failed with a reason
that says what it did; the honest one and the babbler (its frames still come whole, only never
at a line start) must be updated, and the daemon's memory must stay flat.
"""

from __future__ import annotations

import time
from pathlib import Path

from gatewayd.emulators.lab import Lab

IMAGE_SIZE = 64 * 1024
DEVICE_TIMEOUT = 15
CRASH_AT = 16 * 1024
BABBLE = 512 * 1024  # bytes per second the babbling console prints


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _device_word(lab: Lab, device: str) -> str:
    updates = lab.aws.all_updates("gw-01", "hostile")
    return updates[-1]["statusDetails"].get(f"dev:{device}", "") if updates else ""


def test_hostile_devices_end_failed_with_a_reason_and_the_honest_one_is_updated(lab):
    lab.add_device("honest", files="node-*.bin", response_delay=0.01)
    crash = lab.add_device("crashes", files="node-*.bin", crash_at=CRASH_AT, reset_delay=0.5)
    lab.add_device("forgets", files="node-*.bin", restart_every=12)
    lab.add_device("lies", files="node-*.bin", lie_ahead=100)
    lab.add_device("babbles", files="node-*.bin", babble=BABBLE)
    lab.config["relay"].update(max_parallel=5, device_timeout=DEVICE_TIMEOUT)
    lab.start()
    pid = lab.daemon.pid
    image = lab.make_image((2, 0, 0), size=IMAGE_SIZE)
    started = time.monotonic()
    lab.ota_update("hostile", "gw-01", image, filepath="node-2.0.0.bin")

    lab.wait_until("the upload to start", lambda: lab.device("honest").upload_requests > 0, 60)
    time.sleep(3)  # the babbler has had its say for a while
    rss_early = _rss_kib(pid)
    crash_failed_after = None
    while time.monotonic() - started < 120:
        if crash_failed_after is None and _device_word(lab, "crashes").startswith("failed"):
            crash_failed_after = time.monotonic() - started
        if lab.aws.execution("gw-01", "hostile").status in ("SUCCEEDED", "FAILED"):
            break
        time.sleep(0.2)
    rss_late = _rss_kib(pid)
    record = lab.wait("gw-01", "hostile", timeout=5)

    details = record.status_details
    print(f"\n[hostile devices] {details}; crash device failed after {crash_failed_after} s; "
          f"daemon RSS {rss_early} -> {rss_late} KiB")
    assert record.status == "FAILED", record
    for device in ("honest", "babbles"):
        assert details[f"dev:{device}"] == "succeeded 2.0.0", (device, details)
        assert lab.device(device).active_image() == image, device
    for device in ("crashes", "forgets", "lies"):
        assert details[f"dev:{device}"].startswith("failed"), (device, details)
        assert lab.device(device).active_image() != image, device
    log = lab.daemon_log()
    assert "device crashes lost the upload 4 times, each time after at most about 16 KiB" in log
    assert crash.crashes == 4
    assert crash_failed_after is not None and crash_failed_after < 60
    assert "uploading forgets stopped: upload is not progressing: the device went back to a lower offset" in log
    assert "uploading lies stopped: upload is not progressing: the device keeps answering offset" in log
    assert "Traceback" not in log
    # the babbler printed ~8 MB in that time: none of it may stay in the daemon
    assert rss_late - rss_early < 4 * 1024, (rss_early, rss_late)
