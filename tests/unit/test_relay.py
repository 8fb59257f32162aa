"""DeviceRelay's two phase machines (`_step`, `_recovery_step`), branch by branch, in milliseconds.

Each test runs one transfer with the real `DeviceRelay` on a real state database against the
SMP device emulator, reached in memory (`memory_link.MemoryLink`: the emulator's own SMP core
and MCUboot rules, no pty, no framing). The device's state and the stored phase set up the
branch; the transfer's final phase and reason, and what the device holds, are the result. The
same situations run end to end with the daemon process in tests/e2e/test_relay_faults.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gatewayd.config import (BleConfig, Config, DeviceConfig, GatewayConfig, MqttConfig, OtaConfig, RelayConfig,
                             SigningConfig)
from gatewayd.emulators.signing import build_mcuboot_image
from gatewayd.emulators.smp_device import EmulatedDevice
from gatewayd.mcuboot import inspect_image
from gatewayd.relay import MAX_UPLOAD_LOSSES, DeviceRelay, RelayImage, RelayManager, Retired
from gatewayd.state import StateDB, TransferKey, TransferRecord
from gatewayd.vocab import FilePhase, JobKind, TransferPhase
from memory_link import MemoryLink
from transports.link import LinkSettings
from transports.smp import Header, Op, encode_request

KEY = TransferKey("pump", "job-2", 0, "pump")
RELAY = RelayConfig(max_parallel=1, device_timeout=30.0, reset_timeout=3.0, retry_interval=0.05,
                    request_timeout=0.5)


def make_image(version: tuple[int, int, int], size: int = 8 * 1024) -> bytes:
    payload = random.Random(f"{version}-{size}").randbytes(size)
    return build_mcuboot_image(payload, version=(*version, 0))


OLD = make_image((1, 0, 0))
NEW = make_image((1, 2, 0))
OLDER = make_image((0, 9, 0))
OTHER = make_image((1, 5, 0))


def tlv_hash(image: bytes) -> bytes:
    return EmulatedDevice("probe", slot0=image).slots[0].hash


class Bench:
    """One emulated device, a memory link to it, and a DeviceRelay with its state database."""

    def __init__(self, tmp_path: Path, *, running: bytes = OLD, image: bytes = NEW, recovery: bool = False,
                 allow_downgrade: bool = False, relay: RelayConfig = RELAY, max_packet: int | None = None,
                 pipelining: bool = False, window: int | None = None, **device: Any) -> None:
        device.setdefault("reset_delay", 0.02)
        device.setdefault("reset_grace", 0.01)
        self.device = EmulatedDevice("pump", slot0=running, **device)
        self.link = MemoryLink(self.device, max_packet=max_packet, pipelining=pipelining)
        self.state = StateDB(tmp_path / "state.db")
        self.state.add_job(KEY.job, JobKind.PROXIED, {})
        self.state.add_file(KEY.file, len(image))
        self.state.add_transfer(KEY)
        path = tmp_path / "image.bin"
        path.write_bytes(image)
        info = inspect_image(path)
        self.image = RelayImage(path, hashlib.sha256(image).hexdigest(), info.hash, info.version_text)
        self.state.set_file(KEY.file, phase=FilePhase.VERIFIED, image_hash=info.hash.hex())
        config = DeviceConfig(name="pump", transport="uart", port="memory", allow_downgrade=allow_downgrade,
                              mode="recovery" if recovery else "zephyr", window=window)
        self.phases: list[TransferPhase] = []
        self.relay = DeviceRelay(config, self.link, relay, self.state, asyncio.Semaphore(1), self._changed)

    def _changed(self, key: TransferKey) -> None:
        phase = self.state.transfer(key).phase
        if not self.phases or self.phases[-1] is not phase:
            self.phases.append(phase)

    def stored(self, **values: Any) -> None:
        """Where an earlier run of the daemon left the transfer."""
        self.state.set_transfer(KEY, **values)

    def sent_earlier(self, image: bytes) -> None:
        """An earlier job of this gateway took `image` to the device."""
        earlier = TransferKey("pump", "job-1", 0, "pump")
        self.state.add_job(earlier.job, JobKind.PROXIED, {})
        self.state.add_file(earlier.file, len(image))
        self.state.set_file(earlier.file, image_hash=tlv_hash(image).hex())
        self.state.add_transfer(earlier)

    async def smp(self, op: Op, group: int, cmd: int, body: dict[str, Any]) -> dict[str, Any]:
        """One request to the device from another tool (not the relay)."""
        assert self.link.opens == 0, "another tool's requests come before the relay's"
        answers: asyncio.Queue[bytes] = asyncio.Queue()
        request = await self.device.serve_memory(answers.put_nowait)
        request(encode_request(op, group, cmd, body, seq=200))
        answer = await asyncio.wait_for(answers.get(), 2)
        await self.device.stop()
        return cbor2.loads(answer[8:])

    async def run(self) -> TransferRecord:
        try:
            async with asyncio.timeout(20):
                return await self.relay.run(KEY, self.image)
        finally:
            await self.relay.disconnect()
            await self.device.stop()

    def uploads(self) -> int:
        return self.device.upload_requests


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def answer(request: bytes, body: dict[str, Any]) -> bytes:
    """The device's answer to `request`, made up by a test that plays a lying device."""
    header = Header.unpack(request)
    payload = cbor2.dumps(body)
    return Header(header.op + 1, header.group, header.cmd, header.seq, len(payload)).pack() + payload


def is_request(packet: bytes, group: int, cmd: int, op: Op = Op.WRITE) -> bool:
    header = Header.unpack(packet)
    return (header.op, header.group, header.cmd) == (op, group, cmd)


async def mark_for_test(bench: Bench, image: bytes) -> None:
    """Another tool set the test mark on `image` (in slot 1) and did not reset the device."""
    await bench.smp(Op.WRITE, 1, 0, {"hash": tlv_hash(image), "confirm": False})


# --- Zephyr application: _step ---------------------------------------------------------------


def test_upload_test_boot_and_confirm(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    record = run(bench.run())
    assert (record.phase, record.reason, record.version) == (TransferPhase.SUCCEEDED, None, "1.2.0")
    assert bench.device.active_image() == NEW and bench.device.confirmed
    assert bench.phases == [TransferPhase.UPLOADING, TransferPhase.TESTING, TransferPhase.REBOOTING,
                            TransferPhase.CONFIRMING, TransferPhase.SUCCEEDED]
    assert (record.done, record.total) == (len(NEW), len(NEW))


def test_a_link_that_pipelines_keeps_as_many_uploads_in_flight_as_the_device_has_spare_buffers(
        tmp_path: Path) -> None:
    bench = Bench(tmp_path, pipelining=True, buf_count=4, response_delay=0.002)
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert bench.device.most_buffers_in_use == 3  # buf_count 4: three requests in flight, one buffer spare
    assert bench.device.frames_dropped == 0


def test_a_pipelined_upload_that_meets_an_unexpected_answer_goes_on_one_at_a_time_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bench = Bench(tmp_path, pipelining=True, buf_count=4, response_delay=0.002)
    uploads = 0

    def lose_fifth_chunk(packet: bytes) -> bytes | None:
        nonlocal uploads
        if is_request(packet, 1, 1):
            uploads += 1
            if uploads == 5:  # the device's buffer was gone: it did not take the chunk
                return answer(packet, {"off": cbor2.loads(packet[8:])["off"]})
        return None

    bench.link.intercept = lose_fifth_chunk
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("unexpected answer to a pipelined upload at offset" in w for w in warnings), warnings


def test_the_configured_window_caps_the_requests_in_flight(tmp_path: Path) -> None:
    bench = Bench(tmp_path, pipelining=True, buf_count=4, response_delay=0.002, window=1)
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert bench.device.most_buffers_in_use == 1


def test_a_device_that_confirms_itself_is_not_confirmed_again(tmp_path: Path) -> None:
    bench = Bench(tmp_path, confirm_policy="self", self_confirm_delay=0.0)
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.confirmed
    assert TransferPhase.CONFIRMING not in bench.phases


def test_already_running_and_confirmed_needs_no_upload(tmp_path: Path) -> None:
    bench = Bench(tmp_path, running=NEW)
    record = run(bench.run())
    assert (record.phase, record.reason) == (TransferPhase.SUCCEEDED, "already running 1.2.0")
    assert bench.uploads() == 0


def test_already_running_on_trial_is_confirmed_without_an_upload(tmp_path: Path) -> None:
    bench = Bench(tmp_path, slot1=NEW)

    async def scenario() -> TransferRecord:
        await mark_for_test(bench, NEW)
        bench.device.power_cycle()  # MCUboot swaps: NEW runs on trial
        return await bench.run()

    record = run(scenario())
    assert (record.phase, record.reason) == (TransferPhase.SUCCEEDED, "already running 1.2.0")
    assert bench.uploads() == 0 and bench.device.confirmed and bench.device.active_image() == NEW


def test_a_confirm_the_device_does_not_keep_fails(tmp_path: Path) -> None:
    bench = Bench(tmp_path)

    def forget_confirm(packet: bytes) -> bytes | None:
        if is_request(packet, 1, 0) and cbor2.loads(packet[8:]).get("confirm") is True:
            return answer(packet, {})  # "done", and nothing was done
        return None

    bench.link.intercept = forget_confirm
    record = run(bench.run())
    assert (record.phase, record.reason) == (TransferPhase.FAILED, "pump did not confirm 1.2.0")
    assert not bench.device.confirmed


def test_a_rollback_after_the_test_boot_fails_naming_what_runs(tmp_path: Path) -> None:
    bench = Bench(tmp_path, confirm_policy="never")
    record = run(bench.run())
    assert (record.phase, record.reason) == (TransferPhase.FAILED, "rolled back to 1.0.0 after the test boot of 1.2.0")
    assert bench.device.active_image() == OLD


def test_a_rollback_while_confirming_fails_saying_so(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.stored(phase=TransferPhase.CONFIRMING)  # the daemon died after the test boot, the device reverted
    record = run(bench.run())
    assert (record.phase, record.reason) == (TransferPhase.FAILED,
                                             "rolled back to 1.0.0 before 1.2.0 was confirmed")
    assert bench.uploads() == 0


def test_a_test_mark_whose_reset_never_happened_is_reset_again(tmp_path: Path) -> None:
    bench = Bench(tmp_path, slot1=NEW)
    bench.stored(phase=TransferPhase.REBOOTING)

    async def scenario() -> TransferRecord:
        await mark_for_test(bench, NEW)
        return await bench.run()

    record = run(scenario())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert bench.uploads() == 0 and bench.device.boot_count == 1


def test_an_image_already_uploaded_goes_straight_to_the_test_boot(tmp_path: Path) -> None:
    bench = Bench(tmp_path, slot1=NEW)
    bench.stored(phase=TransferPhase.UPLOADING, done=len(NEW), total=len(NEW))  # cut before the test mark
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert bench.uploads() == 0


def drop_link_at_upload(bench: Bench, nth: int) -> list[int]:
    """The link drops just after the `nth` upload request went out (once); returns [the offset
    the device has once it took that request]."""
    uploads = 0
    dropped_at: list[int] = []

    def drop(packet: bytes) -> bytes | None:
        nonlocal uploads
        if is_request(packet, 1, 1):
            uploads += 1
            if uploads == nth:
                request = cbor2.loads(packet[8:])
                dropped_at.append(request["off"] + len(request["data"]))
                bench.link.drop()
        return None

    bench.link.intercept = drop
    return dropped_at


def test_a_dropped_link_resumes_from_the_device_offset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bench = Bench(tmp_path, image=NEW)
    dropped_at = drop_link_at_upload(bench, 10)
    caplog.set_level(logging.INFO, "gatewayd.relay")
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert bench.link.opens >= 2
    assert bench.device.upload_bytes_received - len(NEW) <= bench.device.upload_chunk_max  # one chunk again
    assert dropped_at[0] > 0 and resume_offsets(caplog) == dropped_at  # the log names where it went on


def resume_offsets(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The offsets in the relay's "resumed the upload at offset N of M" lines."""
    found = [re.search(r"resumed the upload at offset (\d+) of (\d+)", r.getMessage()) for r in caplog.records]
    return [int(m.group(1)) for m in found if m]


def test_an_image_our_ended_update_left_pending_is_settled_before_the_upload(tmp_path: Path) -> None:
    bench = Bench(tmp_path, slot1=OTHER)
    bench.sent_earlier(OTHER)

    async def scenario() -> TransferRecord:
        await mark_for_test(bench, OTHER)
        return await bench.run()

    record = run(scenario())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert "mcuboot: swapped to 1.5.0 (test)" in bench.device.events  # MCUboot settled it


def test_an_image_another_tool_left_pending_is_left_alone(tmp_path: Path) -> None:
    bench = Bench(tmp_path, slot1=OTHER)

    async def scenario() -> TransferRecord:
        await mark_for_test(bench, OTHER)
        return await bench.run()

    record = run(scenario())
    assert record.phase is TransferPhase.FAILED
    assert record.reason == ("pump: slot 1 holds 1.5.0 marked for a test boot, which this gateway did not send; "
                             "it is left alone: confirm it or reset the device, then retry")
    assert bench.uploads() == 0 and bench.device.boot_count == 0


def test_a_pending_image_that_survives_the_settling_resets_fails(tmp_path: Path) -> None:
    bench = Bench(tmp_path, slot1=OTHER, reset_veto="silent")
    bench.sent_earlier(OTHER)

    async def scenario() -> TransferRecord:
        await mark_for_test(bench, OTHER)
        return await bench.run()

    record = run(scenario())
    assert (record.phase, record.reason) == (TransferPhase.FAILED,
                                             "pump still holds 1.5.0 marked for a test boot after 2 resets")


@pytest.mark.parametrize("allowed", [False, True])
def test_an_older_image_is_rejected_unless_downgrades_are_allowed(tmp_path: Path, allowed: bool) -> None:
    bench = Bench(tmp_path, image=OLDER, allow_downgrade=allowed)
    record = run(bench.run())
    if allowed:
        assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == OLDER
    else:
        assert (record.phase, record.reason) == (
            TransferPhase.REJECTED,
            "image 0.9.0 is older than 1.0.0 running on pump and the device does not allow downgrades "
        "(allow_downgrade = true in its [[device]] entry)")
        assert bench.uploads() == 0


def test_a_link_too_small_for_an_upload_request_fails_saying_why(tmp_path: Path) -> None:
    bench = Bench(tmp_path, max_packet=24)
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED
    assert record.reason.startswith("cannot upload to pump: a 24-byte packet limit leaves only")


def test_a_device_that_never_boots_the_image_fails_after_three_resets(tmp_path: Path) -> None:
    bench = Bench(tmp_path, reset_veto="silent")
    record = run(bench.run())
    assert (record.phase, record.reason) == (TransferPhase.FAILED, "pump did not boot 1.2.0 after 3 resets")
    assert bench.device.active_image() == OLD


def test_a_device_that_refuses_to_reset_fails_with_its_answer(tmp_path: Path) -> None:
    bench = Bench(tmp_path, reset_veto="error")
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED
    assert record.reason.startswith("pump refused to reset: SMP error 10 (EBUSY)")


def test_a_request_the_device_refuses_fails_naming_the_phase(tmp_path: Path) -> None:
    bench = Bench(tmp_path, image=make_image((1, 2, 0), size=64 * 1024), slot_size=48 * 1024)
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED
    assert record.reason.startswith("device pump refused uploading: image group error")


def test_an_absent_device_waits_and_is_updated_once_it_appears(tmp_path: Path) -> None:
    bench = Bench(tmp_path)

    async def scenario() -> TransferRecord:
        await bench.device.set_absent(True)
        running = asyncio.ensure_future(bench.run())
        await asyncio.sleep(0.3)
        assert bench.state.transfer(KEY).phase is TransferPhase.WAITING
        await bench.device.set_absent(False)
        return await running

    record = run(scenario())
    assert record.phase is TransferPhase.SUCCEEDED and bench.phases[0] is TransferPhase.WAITING
    assert record.unreachable_since is None


def test_an_absent_device_fails_once_device_timeout_has_passed(tmp_path: Path) -> None:
    bench = Bench(tmp_path, relay=RelayConfig(device_timeout=0.3, retry_interval=0.05, request_timeout=0.2))

    async def scenario() -> TransferRecord:
        await bench.device.set_absent(True)
        return await bench.run()

    record = run(scenario())
    assert record.phase is TransferPhase.FAILED
    assert record.reason.startswith("device pump unreachable since ")
    assert "No such file or directory" in record.reason


def test_an_image_changed_on_disk_after_it_was_verified_never_reaches_the_device(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    tampered = bytearray(NEW)
    tampered[100] ^= 0xFF
    bench.image.path.write_bytes(tampered)
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED
    assert record.reason.startswith("the verified image image.bin changed on disk (sha256 now ")
    assert record.reason.endswith("): not sending it to pump")
    assert bench.uploads() == 0 and not bench.image.path.exists()


@pytest.mark.parametrize("silent_on", ["test", "confirm"])
def test_a_device_that_never_answers_the_test_mark_or_the_confirm_runs_out_of_device_timeout(
        tmp_path: Path, silent_on: str) -> None:
    """It answers its image list, so it is reached every time; taking the same step again is
    no progress, and device_timeout ends it."""
    bench = Bench(tmp_path, relay=RelayConfig(device_timeout=1.0, retry_interval=0.05, request_timeout=0.2))
    confirm = silent_on == "confirm"

    def swallow(packet: bytes) -> bytes | None:
        if is_request(packet, 1, 0) and cbor2.loads(packet[8:]).get("confirm", False) is confirm:
            return b""  # the device stays silent: the request times out
        return None

    bench.link.intercept = swallow
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED, record
    assert record.reason.startswith("device pump unreachable since "), record.reason
    assert "no answer within 0.2 s" in record.reason


# --- devices that lose the upload: the high-water mark ----------------------------------------

BIG = make_image((1, 3, 0), size=40 * 1024)
CRASHES_AT = 20_000  # the crash_at fault: the firmware resets each time an upload writes there


def test_a_device_that_crashes_at_the_same_offset_every_time_fails_saying_so(tmp_path: Path) -> None:
    """Each attempt makes progress past where it resumed (0), never past the high-water mark:
    the losses are counted in the database and end the transfer (issue 11, item 1)."""
    bench = Bench(tmp_path, image=BIG, crash_at=CRASHES_AT, buf_size=2048)
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED, record
    assert record.reason == (f"device pump lost the upload {MAX_UPLOAD_LOSSES + 1} times, each time after at most "
                             f"about {record.high_water / 1024:.0f} KiB of {len(BIG)} bytes (does it crash or reset "
                             "while writing there?)")
    assert bench.device.crashes == MAX_UPLOAD_LOSSES + 1
    assert record.restarts == MAX_UPLOAD_LOSSES + 1 and CRASHES_AT - 2048 < record.high_water <= CRASHES_AT


def test_no_new_progress_for_device_timeout_fails_even_between_losses(tmp_path: Path, monkeypatch) -> None:
    """With losses not counted, device_timeout still ends it: progress below the high-water mark
    is not progress, so unreachable_since stays from the first loss on."""
    monkeypatch.setattr("gatewayd.relay.MAX_UPLOAD_LOSSES", 1000)
    bench = Bench(tmp_path, image=BIG, crash_at=CRASHES_AT, buf_size=2048,
                  relay=RelayConfig(device_timeout=1.5, retry_interval=0.05, request_timeout=0.2))
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED, record
    assert record.reason.startswith("device pump unreachable since ")
    assert bench.device.crashes >= 2


def test_losses_counted_by_an_earlier_run_of_the_daemon_still_count(tmp_path: Path) -> None:
    bench = Bench(tmp_path, image=BIG, crash_at=CRASHES_AT, buf_size=2048)
    bench.stored(phase=TransferPhase.UPLOADING, total=len(BIG), done=18_000, high_water=18_000,
                 restarts=MAX_UPLOAD_LOSSES)
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED and "lost the upload" in record.reason
    assert bench.device.crashes == 0  # the first answer (a new session at 0) was one loss too many


def test_a_device_power_cycled_once_mid_upload_is_updated(tmp_path: Path) -> None:
    bench = Bench(tmp_path, image=BIG, buf_size=2048, response_delay=0.005)

    async def scenario() -> TransferRecord:
        async def cut() -> None:
            while (bench.device.upload_offset or 0) < 20_000:
                await asyncio.sleep(0.01)
            bench.device.power_cycle(down_for=0.1)

        cutter = asyncio.ensure_future(cut())
        try:
            return await bench.run()
        finally:
            cutter.cancel()

    record = run(scenario())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == BIG
    assert record.restarts == 1


# --- MCUboot serial recovery: _recovery_step -------------------------------------------------


def test_recovery_uploads_to_the_primary_slot_and_boots_it(tmp_path: Path) -> None:
    bench = Bench(tmp_path, recovery=True, mode="recovery")
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert bench.device.mode == "zephyr"  # the new application runs
    assert bench.phases[-2:] == [TransferPhase.REBOOTING, TransferPhase.SUCCEEDED]


def test_recovery_that_stays_in_the_bootloader_after_our_reset_counts(tmp_path: Path) -> None:
    bench = Bench(tmp_path, recovery=True, mode="recovery", stay_in_recovery=True)
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.mode == "recovery"
    assert bench.device.active_image() == NEW


def test_recovery_holding_the_image_already_only_boots_it(tmp_path: Path) -> None:
    bench = Bench(tmp_path, running=NEW, recovery=True, mode="recovery")
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.uploads() == 0
    assert bench.device.boot_count == 1


def test_recovery_resumes_an_upload_through_the_offset_probe(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gatewayd.relay")
    bench = Bench(tmp_path, recovery=True, mode="recovery")
    drop_link_at_upload(bench, 10)
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert bench.device.upload_bytes_received - len(NEW) <= 2 * bench.device.upload_chunk_max
    restarts = [e for e in bench.device.events if e.startswith("recovery: upload restarted")]
    assert len(restarts) == 1  # the first chunk; the probe after the drop continued the upload
    assert len(resume_offsets(caplog)) == 1 and 0 < resume_offsets(caplog)[0] < len(NEW)


def test_recovery_that_loses_the_image_at_the_reset_fails(tmp_path: Path) -> None:
    bench = Bench(tmp_path, recovery=True, mode="recovery", stay_in_recovery=True)
    reset = False

    def wipe_after_reset(packet: bytes) -> bytes | None:
        nonlocal reset
        if is_request(packet, 0, 5):
            reset = True
        if reset and is_request(packet, 1, 0, Op.READ):  # a bootloader that lost slot 0
            return answer(packet, {"images": [{"slot": 0, "version": "0.0.0", "hash": bytes(32)}]})
        return None

    bench.link.intercept = wipe_after_reset
    record = run(bench.run())
    assert (record.phase, record.reason) == (TransferPhase.FAILED, "pump does not hold 1.2.0 after the reset")


def test_recovery_device_running_its_application_is_reset_into_the_bootloader(tmp_path: Path) -> None:
    bench = Bench(tmp_path, recovery=True)  # configured for recovery, found running its application
    record = run(bench.run())
    assert record.phase is TransferPhase.SUCCEEDED and bench.device.active_image() == NEW
    assert "reset requested into serial recovery" in bench.device.events


def test_recovery_device_that_will_not_enter_the_bootloader_fails(tmp_path: Path) -> None:
    bench = Bench(tmp_path, recovery=True, reset_veto="silent")
    record = run(bench.run())
    assert record.phase is TransferPhase.FAILED
    assert record.reason.startswith("pump runs its application and did not enter MCUboot serial recovery")
    assert bench.uploads() == 0


def test_recovery_refuses_a_downgrade(tmp_path: Path) -> None:
    bench = Bench(tmp_path, image=OLDER, recovery=True, mode="recovery")
    record = run(bench.run())
    assert record.phase is TransferPhase.REJECTED and bench.uploads() == 0


# --- stopping, with a link that swallows cancellation ---------------------------------------


class SwallowingLink:
    """A device link that answers every request after 1 ms and swallows a cancellation that
    arrives meanwhile, as Python 3.11's `asyncio.wait_for` does when its answer is ready."""

    name = "swallowing"
    max_packet = None
    framing_overhead = 4
    release_when_idle = False
    pipelining = False

    def __init__(self) -> None:
        self.requests = 0
        self.swallowed = 0
        self._answers: list[bytes] = []

    def present(self) -> bool:
        return True

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, packet: bytes) -> None:
        self.requests += 1
        request = Header.unpack(packet)
        body = cbor2.loads(packet[8:])
        if (request.group, request.cmd) == (1, 1):
            reply: dict[str, Any] = {"off": body["off"] + len(body["data"])}
        elif (request.group, request.cmd) == (0, 6):
            reply = {"buf_size": 384, "buf_count": 4}
        else:
            reply = {"images": [{"slot": 0, "version": "1.0.0", "hash": b"\x01" * 32, "active": True,
                                 "confirmed": True}]}
        self._answers.append(answer(packet, reply))

    async def receive(self, timeout: float) -> bytes:
        try:
            await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            self.swallowed += 1
        return self._answers.pop(0)


@pytest.mark.parametrize("how", ["cancel", "retire"])
def test_a_stopped_transfer_sends_nothing_more_even_if_the_cancel_is_swallowed(tmp_path: Path, how: str) -> None:
    link = SwallowingLink()
    state = StateDB(tmp_path / "state.db")
    state.add_transfer(KEY)
    path = tmp_path / "image.bin"
    path.write_bytes(make_image((2, 0, 0), size=256 * 1024))
    image = RelayImage(path, hashlib.sha256(path.read_bytes()).hexdigest(), b"\x02" * 32, "2.0.0")
    device = DeviceConfig(name="pump", transport="uart", port=str(tmp_path / "tty"))
    relay = DeviceRelay(device, link, RelayConfig(), state, asyncio.Semaphore(1), lambda _key: None)
    expected: type[BaseException] = asyncio.CancelledError if how == "cancel" else Retired

    async def scenario() -> tuple[int, int, int]:
        task = asyncio.ensure_future(relay.run(KEY, image))
        async with asyncio.timeout(5):
            while link.requests < 20:
                assert not task.done(), task
                await asyncio.sleep(0.005)
        asked_at = link.requests
        task.cancel() if how == "cancel" else relay.retire()
        async with asyncio.timeout(2):
            with pytest.raises(expected):
                await task
        stopped_at = link.requests
        await asyncio.sleep(0.2)
        return asked_at, stopped_at, link.requests

    asked_at, stopped_at, later = asyncio.run(scenario())
    state.close()
    assert link.swallowed >= 1
    assert stopped_at - asked_at <= 1, "the transfer went on after it was asked to stop"
    assert later == stopped_at, "requests went on after the transfer was stopped"


def test_a_changed_device_gets_the_port_its_idle_relay_held(tmp_path: Path) -> None:
    """A serial link stays open between transfers (and locks its port): when a reload changes
    the device, the retired relay lets go of it for the relay that takes over."""
    device = EmulatedDevice("pump", slot0=OLD, reset_delay=0.02, reset_grace=0.01)
    links: list[MemoryLink] = []

    def build(settings: LinkSettings) -> MemoryLink:
        links.append(MemoryLink(device))
        return links[-1]

    def config(baudrate: int) -> Config:
        pump = DeviceConfig(name="pump", transport="uart", port="memory", baudrate=baudrate)
        return Config(tmp_path / "gateway.toml", GatewayConfig("gw-01"),
                      MqttConfig("localhost", tmp_path, tmp_path, tmp_path, "gw-01"), OtaConfig(), SigningConfig(),
                      RELAY, BleConfig(), (pump,))

    bench = Bench(tmp_path)  # the state and the image

    async def scenario() -> None:
        relays = RelayManager(config(115200), bench.state, lambda _key: None, build)
        assert (await relays.run(KEY, bench.image)).phase is TransferPhase.SUCCEEDED
        assert links[0].is_open  # held between transfers
        relays.update_devices(config(9600))
        await asyncio.sleep(0.01)
        assert not links[0].is_open and relays.relay("pump").link is links[1]
        await relays.disconnect_all()
        await device.stop()

    run(scenario())
