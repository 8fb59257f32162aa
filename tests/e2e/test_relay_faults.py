"""Relay fault injection with the real daemon: kills, dropped links, reboots, absent devices.

Each test runs the real `ota-gatewayd` as a subprocess against the real broker, the AWS IoT
emulator and emulated SMP devices (Lab), breaks something in the middle of the device upload,
and checks the end of the story: the job's final status, the device's active image bytes, and
how much was sent to the device twice. A "chunk" is the largest `data` of one upload request
the device saw.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import re
import signal
import time

import pytest

from gatewayd.emulators.lab import Lab
from gatewayd.emulators.smp_device import EmulatedDevice

IMAGE_SIZE = 64 * 1024
SLOW = 0.02  # device response delay: a 64 KiB upload takes a few seconds


def _wait_for_upload(lab: Lab, dev: EmulatedDevice, image: bytes, fraction: float = 0.5) -> int:
    lab.wait_until(f"{fraction:.0%} of the upload", lambda: (dev.upload_offset or 0) >= len(image) * fraction, 30)
    return dev.upload_offset or 0


def _phases(lab: Lab, thing: str, job_id: str) -> list[str]:
    return [u["statusDetails"].get("phase") for u in lab.aws.all_updates(thing, job_id)]


def _resent(dev: EmulatedDevice, image: bytes) -> int:
    return dev.upload_bytes_received - len(image)


def _sessions(dev: EmulatedDevice) -> list[str]:
    """Device events of uploads started at offset 0 (Zephyr: a new sha session)."""
    return [e for e in dev.events if e.startswith("upload: new session") or e.startswith("recovery: upload restarted")]


def _assert_succeeded(lab: Lab, thing: str, job_id: str, dev: EmulatedDevice, image: bytes) -> None:
    done = lab.wait(thing, job_id, timeout=40)
    assert done.status == "SUCCEEDED", done
    assert dev.active_image() == image
    assert dev.confirmed
    assert "Traceback" not in lab.daemon_log()


def _report(name: str, **numbers: object) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


@pytest.mark.cloud_may_refuse("VersionMismatch", why="stopped mid-job: an update AWS IoT accepted just before may "
                              "not be recorded yet, so the next run sends it once more on the old version")
def test_sigkill_mid_upload_resumes_from_the_device_offset(lab):
    dev = lab.add_device("pump", thing_name="pump", response_delay=SLOW)
    lab.start()
    image = lab.make_image((1, 1, 0), size=IMAGE_SIZE)
    lab.ota_update("kill-upload", "pump", image)

    at_kill = _wait_for_upload(lab, dev, image)
    lab.kill_daemon()
    lab.start_daemon()

    _assert_succeeded(lab, "pump", "kill-upload", dev, image)
    _report("sigkill", image=len(image), killed_at=at_kill, chunk=dev.upload_chunk_max, resent=_resent(dev, image))
    assert _resent(dev, image) <= 2 * dev.upload_chunk_max
    assert len(_sessions(dev)) == 1  # resumed through the sha session, never restarted at 0
    resumed = re.findall(r"pump resumed the upload at offset (\d+) of (\d+)", lab.daemon_log())
    assert len(resumed) == 1 and at_kill <= int(resumed[0][0]) < len(image) == int(resumed[0][1])


@pytest.mark.parametrize("fault", ["absent-3s", "drop-link"])
def test_link_lost_mid_upload_continues_where_the_device_is(lab, fault):
    dev = lab.add_device("pump", thing_name="pump", response_delay=SLOW)
    lab.start()
    image = lab.make_image((1, 2, 0), size=IMAGE_SIZE)
    lab.ota_update("link-lost", "pump", image)

    at_fault = _wait_for_upload(lab, dev, image)
    if fault == "absent-3s":
        lab.on_device_loop(dev.set_absent(True))
        time.sleep(3)
        lab.on_device_loop(dev.set_absent(False))
    else:
        dev.drop_link()

    _assert_succeeded(lab, "pump", "link-lost", dev, image)
    _report(fault, image=len(image), fault_at=at_fault, chunk=dev.upload_chunk_max, resent=_resent(dev, image))
    assert _resent(dev, image) <= 2 * dev.upload_chunk_max
    assert len(_sessions(dev)) == 1
    assert dev.upload_bytes_written == len(image)


def test_device_rebooted_mid_upload_restarts_with_every_first_chunk_field(lab):
    dev = lab.add_device("pump", thing_name="pump", response_delay=SLOW)
    lab.start()
    image = lab.make_image((1, 3, 0), size=IMAGE_SIZE)
    lab.ota_update("rebooted", "pump", image)

    at_reboot = _wait_for_upload(lab, dev, image)
    dev.power_cycle()

    _assert_succeeded(lab, "pump", "rebooted", dev, image)
    _report("reboot", image=len(image), rebooted_at=at_reboot, chunk=dev.upload_chunk_max,
            resent=_resent(dev, image))
    sha = hashlib.sha256(image).hexdigest()[:16]
    sessions = _sessions(dev)
    assert len(sessions) == 2, dev.events
    assert all(f"len={len(image)} sha={sha}" in s for s in sessions), sessions
    # the RAM session was lost: what the device had is sent again, but nothing beyond that
    assert _resent(dev, image) <= at_reboot + 3 * dev.upload_chunk_max


def test_device_absent_at_the_start_is_waiting_then_updated_when_it_appears(lab):
    # with a 2 s retry interval, backoff alone would try at 2, 6, 14 and 30 s: only noticing
    # the port appear gets the update going at once
    lab.config["relay"].update(retry_interval=2.0)
    dev = lab.add_device("pump", thing_name="pump")
    lab.on_device_loop(dev.set_absent(True))
    lab.start()
    image = lab.make_image((1, 4, 0), size=32 * 1024)
    started = time.monotonic()
    lab.ota_update("absent", "pump", image)

    def phases() -> list[str]:
        return _phases(lab, "pump", "absent")

    lab.wait_until("a waiting status", lambda: "waiting" in phases(), 15)
    time.sleep(max(0.0, started + 15 - time.monotonic()))
    appeared = time.monotonic()
    lab.on_device_loop(dev.set_absent(False))
    lab.wait_until("the first upload request", lambda: dev.upload_requests > 0, 30)
    first_request = time.monotonic() - appeared

    _assert_succeeded(lab, "pump", "absent", dev, image)
    took = time.monotonic() - appeared
    _report("absent-15s", first_request_after_s=round(first_request, 2), succeeded_after_s=round(took, 1),
            resent=_resent(dev, image))
    waiting = [u for u in lab.aws.all_updates("pump", "absent") if u["statusDetails"].get("phase") == "waiting"]
    assert waiting[0]["status"] == "IN_PROGRESS"
    assert waiting[0]["statusDetails"]["device"] == "pump"
    seen = phases()
    assert "uploading" in seen[seen.index("waiting"):]
    assert first_request < 1.5, "the update started late after the device appeared"
    assert _resent(dev, image) == 0


@pytest.mark.cloud_may_refuse("VersionMismatch", why="stopped mid-job: an update AWS IoT accepted just before may "
                              "not be recorded yet, so the next run sends it once more on the old version")
def test_device_absent_past_device_timeout_fails_saying_since_when(lab):
    timeout = 6
    lab.config["relay"].update(device_timeout=timeout)
    dev = lab.add_device("pump", thing_name="pump")
    lab.on_device_loop(dev.set_absent(True))
    lab.start()
    image = lab.make_image((1, 5, 0), size=32 * 1024)
    before = time.time()
    lab.ota_update("gone", "pump", image)

    # a restart while waiting does not start the clock again: unreachable_since is in the database
    lab.wait_until("a waiting status", lambda: "waiting" in _phases(lab, "pump", "gone"), 15)
    time.sleep(max(0.0, before + 3 - time.time()))
    lab.kill_daemon()
    lab.start_daemon()

    done = lab.wait("pump", "gone", timeout=30)
    failed_after = time.time() - before
    _report("device-timeout", failed_after_s=round(failed_after, 1), reason=done.status_details.get("reason"))
    assert done.status == "FAILED", done
    reason = done.status_details["reason"]
    stamp = re.search(r"unreachable since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", reason)
    assert stamp, reason
    since = calendar.timegm(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S"))
    assert before - 1 <= since <= before + 2.5, "the stamp is not when the device was first found missing"
    assert failed_after < timeout + 3, "failed late: the deadline counts from the first miss, not the restart"
    assert dev.upload_requests == 0
    assert dev.active_image() != image


@pytest.mark.cloud_may_refuse("VersionMismatch", why="stopped mid-job: an update AWS IoT accepted just before may "
                              "not be recorded yet, so the next run sends it once more on the old version")
def test_recovery_device_sigkill_mid_upload_continues_through_the_offset_probe(lab):
    dev = lab.add_device("boot", thing_name="boot", mode="recovery", response_delay=SLOW)
    lab.devices["boot"].settings["mode"] = "recovery"
    lab.start()
    image = lab.make_image((2, 0, 0), size=IMAGE_SIZE)
    lab.ota_update("recovery", "boot", image)

    at_kill = _wait_for_upload(lab, dev, image)
    lab.kill_daemon()
    lab.start_daemon()

    _assert_succeeded(lab, "boot", "recovery", dev, image)
    _report("recovery-sigkill", image=len(image), killed_at=at_kill, chunk=dev.upload_chunk_max,
            resent=_resent(dev, image))
    assert _resent(dev, image) <= 2 * dev.upload_chunk_max
    assert len(_sessions(dev)) == 1  # the probe found the offset: slot 0 was not erased again
    assert dev.mode == "zephyr"  # the new image boots


@pytest.mark.cloud_may_refuse("VersionMismatch", why="stopped mid-job: an update AWS IoT accepted just before may "
                              "not be recorded yet, so the next run sends it once more on the old version")
def test_recovery_device_rebooted_while_gateway_was_down_restarts_at_zero(lab):
    dev = lab.add_device("boot", thing_name="boot", mode="recovery", stay_in_recovery=True, response_delay=SLOW)
    lab.devices["boot"].settings["mode"] = "recovery"
    lab.start()
    image = lab.make_image((2, 1, 0), size=IMAGE_SIZE)
    lab.ota_update("recovery-reboot", "boot", image)

    at_kill = _wait_for_upload(lab, dev, image)
    lab.kill_daemon()
    dev.power_cycle()  # the bootloader forgets its offset: a stored offset must not be trusted
    lab.start_daemon()

    done = lab.wait("boot", "recovery-reboot", timeout=40)
    assert done.status == "SUCCEEDED", done
    assert dev.active_image() == image
    _report("recovery-reboot", image=len(image), killed_at=at_kill, chunk=dev.upload_chunk_max,
            resent=_resent(dev, image))
    assert len(_sessions(dev)) == 2
    assert _resent(dev, image) <= at_kill + 3 * dev.upload_chunk_max


@pytest.mark.cloud_may_refuse("VersionMismatch", why="stopped mid-job: an update AWS IoT accepted just before may "
                              "not be recorded yet, so the next run sends it once more on the old version")
def test_sigterm_mid_relay_exits_promptly_and_a_restart_completes(lab):
    dev = lab.add_device("pump", thing_name="pump", response_delay=2 * SLOW)
    lab.start()
    image = lab.make_image((1, 6, 0), size=IMAGE_SIZE)
    lab.ota_update("sigterm", "pump", image)

    at_stop = _wait_for_upload(lab, dev, image, 0.3)
    t0 = time.monotonic()
    code = lab.stop_daemon(signal.SIGTERM)
    stop_took = time.monotonic() - t0
    assert code == 0, lab.daemon_log()[-4000:]
    assert stop_took < 10
    after_stop = dev.upload_offset
    assert after_stop is not None and after_stop < len(image), "the upload was not interrupted"
    time.sleep(0.5)
    assert dev.upload_offset == after_stop, "the device was still sent data after the daemon exited"
    lab.start_daemon()

    _assert_succeeded(lab, "pump", "sigterm", dev, image)
    _report("sigterm", stop_s=round(stop_took, 2), image=len(image), signalled_at=at_stop, stopped_at=after_stop,
            chunk=dev.upload_chunk_max, resent=_resent(dev, image))
    assert _resent(dev, image) <= 2 * dev.upload_chunk_max
    assert len(_sessions(dev)) == 1


def _reload_without(lab: Lab, name: str) -> None:
    """Rewrite the config without device `name` and SIGHUP the daemon (the emulator keeps running)."""
    removed = lab.devices.pop(name)
    try:
        lab.write_config()
    finally:
        lab.devices[name] = removed
    lab.daemon.send_signal(signal.SIGHUP)


def test_sighup_removing_a_device_mid_upload_ends_its_work(lab):
    fast = lab.add_device("pump-a", files="pump*.bin")
    slow = lab.add_device("pump-b", files="pump*.bin", response_delay=2 * SLOW)
    lab.start()
    image = lab.make_image((1, 7, 0), size=IMAGE_SIZE)
    lab.ota_update("hup", "gw-01", image, filepath="pump.bin")

    _wait_for_upload(lab, slow, image, 0.25)
    hup = time.monotonic()
    _reload_without(lab, "pump-b")

    done = lab.wait("gw-01", "hup", timeout=30)
    ended_after = time.monotonic() - hup
    at_end = slow.upload_offset
    time.sleep(0.5)
    _report("sighup-remove", ended_after_s=round(ended_after, 1), removed_device_offset=at_end,
            reason=done.status_details.get("reason"))
    assert done.status == "FAILED", done
    assert "pump-b" in done.status_details["reason"] and "no longer configured" in done.status_details["reason"]
    assert done.status_details["dev:pump-a"] == "succeeded 1.7.0"
    assert fast.active_image() == image
    assert slow.active_image() != image
    assert at_end is not None and at_end < len(image), "the removed device's upload went on"
    assert slow.upload_offset == at_end, "the removed device was still sent data"
    assert ended_after < 5


def test_sighup_changing_a_device_mid_upload_hands_the_upload_on(lab):
    dev = lab.add_device("pump", thing_name="pump", response_delay=SLOW)
    lab.start()
    image = lab.make_image((1, 8, 0), size=IMAGE_SIZE)
    lab.ota_update("changed", "pump", image)

    at_change = _wait_for_upload(lab, dev, image, 0.3)
    lab.devices["pump"].settings["line_delay"] = 0.0001
    lab.write_config()
    lab.daemon.send_signal(signal.SIGHUP)

    _assert_succeeded(lab, "pump", "changed", dev, image)
    _report("sighup-change", changed_at=at_change, chunk=dev.upload_chunk_max, resent=_resent(dev, image))
    assert _resent(dev, image) <= 2 * dev.upload_chunk_max
    assert len(_sessions(dev)) == 1


@pytest.mark.parametrize("veto", ["error", "silent"])
def test_device_that_will_not_reset_fails_without_looping(lab, veto):
    dev = lab.add_device("pump", thing_name="pump", reset_veto=veto)
    old = dev.active_image()
    lab.start()
    image = lab.make_image((1, 9, 0), size=32 * 1024)
    lab.ota_update("no-reset", "pump", image)

    done = lab.wait("pump", "no-reset", timeout=30)
    resets = sum(1 for group, cmd, _op in dev.requests if (group, cmd) == (0, 5))
    _report(f"reset-veto-{veto}", resets=resets, reason=done.status_details.get("reason"))
    assert done.status == "FAILED", done
    reason = done.status_details["reason"]
    assert ("refused to reset" in reason) if veto == "error" else ("after 3 resets" in reason), reason
    assert resets == (1 if veto == "error" else 3)
    assert dev.active_image() == old
    assert _resent(dev, image) == 0


@pytest.mark.parametrize("confirm_policy", ["gateway", "self"])
def test_an_image_left_pending_by_an_ended_update_does_not_block_the_next(lab, confirm_policy):
    """A job that ends after the test mark (here: the device ignores resets) leaves slot 1 pending;
    Zephyr then refuses every upload (NO_FREE_SLOT). The next update has MCUboot settle it first."""
    dev = lab.add_device("pump", thing_name="pump", reset_veto="silent", confirm_policy=confirm_policy)
    lab.start()
    stuck = lab.make_image((1, 1, 0))
    lab.ota_update("stuck", "pump", stuck)
    record = lab.wait("pump", "stuck")
    assert record.status == "FAILED" and "did not boot 1.1.0" in record.status_details["reason"]
    assert any(s.pending and not s.active for s in dev.slots), "the failed update should leave slot 1 pending"

    dev.reset_veto = None
    image = lab.make_image((1, 2, 0))
    lab.ota_update("next", "pump", image)

    record = lab.wait("pump", "next")
    assert record.status == "SUCCEEDED", record.status_details
    assert dev.active_image() == image and next(s for s in dev.slots if s.active).confirmed
    assert "slot 1 holds 1.1.0 marked for a test boot" in lab.daemon_log()


def test_the_downgrade_check_looks_past_an_image_left_pending(lab):
    """1.1.0 is left pending by a failed update; 1.0.5 is newer than the 1.0.0 that really runs."""
    dev = lab.add_device("pump", thing_name="pump", reset_veto="silent")
    lab.start()
    lab.ota_update("stuck", "pump", lab.make_image((1, 1, 0)))
    assert lab.wait("pump", "stuck").status == "FAILED"
    dev.reset_veto = None
    image = lab.make_image((1, 0, 5))
    lab.ota_update("next", "pump", image)
    record = lab.wait("pump", "next")
    assert record.status == "SUCCEEDED", record.status_details
    assert dev.active_image() == image


def test_an_image_someone_else_marked_for_a_test_boot_is_left_alone(lab):
    """Settling resets the device: done only for images this gateway sent, never for another tool's."""
    from transports.smp import SmpClient
    from transports.uart import UartLink

    foreign = lab.make_image((1, 5, 0), seed="someone else")
    dev = lab.add_device("pump", thing_name="pump", slot1=foreign)
    mark = SmpClient(UartLink(str(lab.devices["pump"].link), 115200))

    async def mark_for_test() -> None:
        await mark.link.open()
        try:
            slot = next(s for s in await mark.image_list() if not s.active)
            await mark.test_image(slot.hash)
        finally:
            await mark.link.close()

    asyncio.run(mark_for_test())
    assert any(s.pending and not s.active for s in dev.slots)
    boots = dev.boot_count
    lab.start()
    lab.ota_update("next", "pump", lab.make_image((1, 2, 0)))

    record = lab.wait("pump", "next")
    assert record.status == "FAILED"
    assert "holds 1.5.0 marked for a test boot, which this gateway did not send" in record.status_details["reason"]
    assert dev.boot_count == boots and dev.upload_requests == 0
    assert any(s.pending and not s.active for s in dev.slots)  # still there for its owner


def test_a_recovery_device_running_its_application_is_reset_into_serial_recovery(lab):
    """After one update the device runs its application; the next one needs MCUboot serial
    recovery again, which Zephyr >= 4.2 enters on a reset with boot_mode 1."""
    dev = lab.add_device("boot", thing_name="boot", mode="recovery")
    lab.devices["boot"].settings["mode"] = "recovery"
    lab.start()
    first = lab.make_image((2, 0, 0))
    lab.ota_update("first", "boot", first)
    _assert_succeeded(lab, "boot", "first", dev, first)
    assert dev.mode == "zephyr"  # its application runs

    second = lab.make_image((2, 1, 0))
    lab.ota_update("second", "boot", second)

    _assert_succeeded(lab, "boot", "second", dev, second)
    assert "reset requested into serial recovery" in dev.events
    assert dev.mode == "zephyr"


def test_a_recovery_device_that_cannot_enter_recovery_fails_with_a_reason(lab):
    dev = lab.add_device("boot", thing_name="boot", mode="recovery")
    lab.devices["boot"].settings["mode"] = "recovery"
    lab.start()
    first = lab.make_image((2, 0, 0))
    lab.ota_update("first", "boot", first)
    _assert_succeeded(lab, "boot", "first", dev, first)
    dev.reset_veto = "silent"  # answers the reset and stays in its application

    lab.ota_update("second", "boot", lab.make_image((2, 1, 0)))

    record = lab.wait("boot", "second")
    assert record.status == "FAILED"
    assert "did not enter MCUboot serial recovery" in record.status_details["reason"]
    assert dev.active_image() == first
