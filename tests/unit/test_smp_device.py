"""The SMP device emulator, driven by clients nobody here wrote (smpclient, smp's framing).

The emulator runs in an `EmulatorThread`; each test talks to it over its pty with
`smpclient` (asyncio, in the test's own loop) or with raw pyserial + `smp.packet`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st
from smp import packet as smppacket
from smpclient import SMPClient
from smpclient.generics import error, error_v2, success
from smpclient.requests.image_management import (
    ImageErase,
    ImageStatesRead,
    ImageStatesWrite,
    ImageUploadWrite,
)
from smpclient.requests.os_management import (
    BootloaderInformationRead,
    EchoWrite,
    MCUMgrParametersRead,
    ResetWrite,
)
from smpclient.transport.serial import SMPSerialTransport

from gatewayd.emulators.runner import EmulatorThread
from gatewayd.emulators.smp_device import (
    ConsoleReceiver,
    EmulatedDevice,
    ImageFormatError,
    parse_mcuboot_image,
)

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]

# --- a minimal MCUboot image builder (smp.md §4), independent of the emulator -----------------


def build_image(body: bytes, version: tuple[int, int, int, int] = (1, 0, 0, 0),
                hdr_size: int = 0x200, flags: int = 0) -> bytes:
    major, minor, revision, build = version
    header = struct.pack("<IIHHIIBBHII", 0x96F3B83D, 0, hdr_size, 0, len(body), flags,
                         major, minor, revision, build, 0)
    hashed = header + bytes(hdr_size - len(header)) + body
    tlv = struct.pack("<HH", 0x10, 32) + hashlib.sha256(hashed).digest()
    return hashed + struct.pack("<HH", 0x6907, 4 + len(tlv)) + tlv


def tlv_hash(image: bytes) -> bytes:
    return image[-32:]  # the builder puts the SHA-256 TLV last


OLD = build_image(os.urandom(3000), (1, 0, 0, 0))
NEW = build_image(os.urandom(20000), (2, 1, 3, 7))

# --- plumbing ----------------------------------------------------------------------------------


@pytest.fixture
def runner() -> Iterator[EmulatorThread]:
    with EmulatorThread() as r:
        yield r


@pytest.fixture
def serve(runner: EmulatorThread, tmp_path: Path) -> Iterator[Callable[..., tuple[EmulatedDevice, Path]]]:
    devices: list[EmulatedDevice] = []

    def start(**kwargs: Any) -> tuple[EmulatedDevice, Path]:
        kwargs.setdefault("slot0", OLD)
        kwargs.setdefault("reset_delay", 0.1)
        device = EmulatedDevice(f"dev{len(devices)}", **kwargs)
        link = tmp_path / f"dev{len(devices)}"
        runner.call(device.serve_pty(link))
        devices.append(device)
        return device, link

    yield start
    for device in devices:
        runner.call(device.stop())


def run(coro: Awaitable[T], timeout: float = 10.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


async def with_client(link: Path, fn: Callable[[SMPClient], Awaitable[T]]) -> T:
    async with SMPClient(SMPSerialTransport(), str(link), timeout_s=2.0) as client:
        return await fn(client)


def client_call(link: Path, fn: Callable[[SMPClient], Awaitable[T]]) -> T:
    return run(with_client(link, fn))


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def images(client_response: Any) -> dict[int, Any]:
    assert success(client_response), client_response
    return {entry.slot: entry for entry in client_response.images}


async def full_upload(client: SMPClient, image: bytes) -> list[int]:
    return [off async for off in client.upload(image)]


async def mark_test_and_reset(client: SMPClient, image: bytes) -> None:
    rsp = await client.request(ImageStatesWrite(hash=tlv_hash(image), confirm=False))
    assert images(rsp)[1].pending is True
    assert success(await client.request(ResetWrite()))


def raw_transact(link: Path, smp_packet: bytes, timeout: float = 1.0) -> bytes | None:
    """Send one packet framed by the `smp` package; return the answer's SMP packet or None."""
    with serial.Serial(str(link), timeout=0.05) as port:
        port.reset_input_buffer()
        for line in smppacket.encode(smp_packet):
            port.write(line)
        return read_smp_packet(port, timeout)


def read_smp_packet(port: serial.Serial, timeout: float) -> bytes | None:
    decoder = smppacket.decode()
    next(decoder)
    started = False
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        buffer += port.read(4096)
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line += b"\n"
            if not started and not line.startswith(b"\x06\x09"):
                continue  # console output (boot banner)
            started = True
            try:
                decoder.send(line)
            except StopIteration as done:
                return bytes(done.value)
    return None


def smp_request(op: int, group: int, cmd: int, body: bytes, seq: int = 1, version: int = 1) -> bytes:
    return struct.pack("!BBHHBB", (version << 3) | op, 0, len(body), group, seq, cmd) + body


# --- image parser ------------------------------------------------------------------------------


def test_builder_image_is_valid_for_imgtool(tmp_path: Path) -> None:
    from imgtool import image as imgtool_image

    path = tmp_path / "new.bin"
    path.write_bytes(NEW)
    result = imgtool_image.Image.verify(str(path), None)
    assert result[0] == imgtool_image.VerifyResult.OK
    assert result[1] == (2, 1, 3, 7)
    assert result[2] == tlv_hash(NEW)
    parsed = parse_mcuboot_image(NEW)
    assert (parsed.version_str, parsed.tlv_hash, parsed.hash_ok) == ("2.1.3.7", tlv_hash(NEW), True)
    assert parse_mcuboot_image(OLD).version_str == "1.0.0"


def test_parser_reads_imgtool_image_with_protected_tlvs(tmp_path: Path) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(os.urandom(1500))
    out = tmp_path / "signed.bin"
    subprocess.run(
        [str(REPO / ".venv/bin/imgtool"), "create", "--version", "3.4.5", "--header-size",
         "0x200", "--pad-header", "--slot-size", "0x10000", "--security-counter", "9",
         str(body), str(out)],
        check=True, capture_output=True,
    )
    data = out.read_bytes()
    parsed = parse_mcuboot_image(data + b"\xff" * 100)  # trailing padding is ignored
    assert parsed.protect_tlv_size > 0
    assert parsed.version_str == "3.4.5"
    assert parsed.hash_ok
    assert parsed.total_size == len(data)
    corrupted = bytearray(data)
    corrupted[0x300] ^= 1
    assert not parse_mcuboot_image(bytes(corrupted)).hash_ok
    with pytest.raises(ImageFormatError) as bad:
        parse_mcuboot_image(b"\x00" * 64)
    assert bad.value.code == 23


# --- framing receiver --------------------------------------------------------------------------


def test_receiver_accepts_smp_frames_and_drops_bad_ones() -> None:
    drops: list[str] = []
    rx = ConsoleReceiver(384, drops.append)
    echo = bytes.fromhex("06094142414b4141414741414142414b46685a474a6f616157760a")  # smp.md §8
    assert rx.feed(b"uart:~$ log line\r\n" + echo) == [bytes.fromhex("0a00000600000100a16164626869")]
    bad_crc = echo.replace(b"aaWv", b"aaWw")
    assert rx.feed(bad_crc) == [] and drops[-1] == "bad CRC"
    # byte by byte, split over lines: the §8 upload first chunk (2 lines)
    first_chunk = (
        b"\x06\x09AJQKAACKAAEHAaZjbGVuGRBPY29mZgBjc2hhWCBvjBNCVL+CYSGlAZTXlZVZvahZwce/sNR/GlT6QzPbcmRkYXRhWEA9uPOWAAAAAAACAAC4DQAAAAAAAAEC\n"
        b"\x04\x14AwAEAAAAAAAAAP//////////////////////////////////////////ZWltYWdlAGd1cGdyYWRl9P+z\n"
    )
    out = [p for b in first_chunk for p in rx.feed(bytes([b]))]
    assert len(out) == 1 and out[0][:8] == bytes.fromhex("0a00008a00010701")
    assert cbor2.loads(out[0][8:])["len"] == 4175


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=700), min_size=1, max_size=4), st.data())
def test_receiver_reassembles_any_split(bodies: list[bytes], data: st.DataObject) -> None:
    packets = [smp_request(2, 0, 0, b) for b in bodies if len(b) + 12 <= 1024]
    stream = b"".join(b"noise\r\n" + b"".join(smppacket.encode(p)) for p in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    rx = ConsoleReceiver(1024)
    out: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        out += rx.feed(stream[a:b])
    assert out == packets


# --- OS group and image list over the pty ------------------------------------------------------


def test_params_echo_bootloader_and_image_list(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(buf_size=512, buf_count=3)

    async def scenario(client: SMPClient) -> tuple[Any, ...]:
        return (
            await client.request(MCUMgrParametersRead()),
            await client.request(EchoWrite(d="hello gateway")),
            await client.request(BootloaderInformationRead()),
            await client.request(ImageStatesRead()),
        )

    params, echo, boot, state = client_call(link, scenario)
    assert success(params) and (params.buf_size, params.buf_count) == (512, 3)
    assert success(echo) and echo.r == "hello gateway"
    assert success(boot) and boot.bootloader == "MCUboot"
    slots = images(state)
    assert list(slots) == [0]
    assert slots[0].version == "1.0.0" and slots[0].hash == tlv_hash(OLD)
    assert (slots[0].active, slots[0].confirmed, slots[0].bootable, slots[0].pending) == (True, True, True, False)
    assert (1, 0, 0) in device.requests and (0, 0, 2) in device.requests


def test_echo_answer_matches_smp_md_vector_bytes(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    _, link = serve()
    echo_frame = bytes.fromhex("06094142414b4141414741414142414b46685a474a6f616157760a")  # §8
    with serial.Serial(str(link), timeout=0.05) as port:
        port.reset_input_buffer()
        port.write(echo_frame)
        deadline, data = time.monotonic() + 2, b""
        while b"\x06\x09" not in data or not data.endswith(b"\n"):
            assert time.monotonic() < deadline, data
            data += port.read(4096)
    line = data[data.index(b"\x06\x09"):]
    # Zephyr 4.4 answered exactly this packet (smp.md §1.1 / §8)
    packet = bytes.fromhex("0b00000700000100bf6172626869ff")
    assert b"".join(smppacket.encode(packet)) == line
    assert line == b"\x06\x09ABELAAAHAAABAL9hcmJoaf81Gg==\n"


def test_params_v1_definite_maps_matches_vector(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    _, definite = serve(indefinite_maps=False)
    _, zcbor = serve()
    request = bytes.fromhex("0800000100000206a0")  # params read, v1, seq 2 (§8)
    assert raw_transact(definite, request) == bytes.fromhex(
        "0900001800000206a2686275665f73697a65190180696275665f636f756e7404")
    assert raw_transact(zcbor, request) == bytes.fromhex(
        "0900001900000206bf686275665f73697a65190180696275665f636f756e7404ff")


def test_unknown_group_and_command_answer_enotsup(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    _, link = serve()
    for group, cmd in ((64, 0), (9, 0), (0, 42), (1, 9)):
        answer = raw_transact(link, smp_request(2, group, cmd, b"\xa0", seq=7))
        assert answer is not None
        assert answer[:8] == struct.pack("!BBHHBB", 0x0B, 0, len(answer) - 8, group, 7, cmd)
        assert cbor2.loads(answer[8:]) == {"rc": 8}
    query = raw_transact(link, smp_request(0, 0, 8, cbor2.dumps({"query": "mode"})))
    assert query is not None and cbor2.loads(query[8:]) == {"mode": 1}


def test_oversize_packets_and_long_lines_are_dropped(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(buf_size=128)

    def echo(n: int) -> bytes:
        return smp_request(2, 0, 0, b"\xa1\x61\x64" + cbor2.dumps("x" * n))

    assert len(echo(111)) == 124  # buf_size - 4: fits the reassembly buffer
    answer = raw_transact(link, echo(111))
    assert answer is not None and cbor2.loads(answer[8:]) == {"r": "x" * 111}
    assert raw_transact(link, echo(112), timeout=0.4) is None  # buf_size - 3: dropped
    assert any("reassembly buffer" in e for e in device.events)

    with serial.Serial(str(link), timeout=0.05) as port:
        port.write(b"\x06\x09" + b"A" * 128 + b"\n")  # 131-byte line: discarded by the device
        for line in smppacket.encode(echo(3)):
            port.write(line)
        answer = read_smp_packet(port, 1.0)
    assert answer is not None and cbor2.loads(answer[8:]) == {"r": "xxx"}
    assert any("line longer" in e for e in device.events)


# --- upload ------------------------------------------------------------------------------------


def test_upload_then_state_shows_slot1(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve()

    async def scenario(client: SMPClient) -> tuple[list[int], Any]:
        offsets = await full_upload(client, NEW)
        return offsets, await client.request(ImageStatesRead())

    offsets, state = client_call(link, scenario)
    assert offsets[-1] == len(NEW) and offsets == sorted(offsets)
    slots = images(state)
    assert slots[1].version == "2.1.3.7" and slots[1].hash == tlv_hash(NEW)
    assert (slots[1].active, slots[1].pending, slots[1].confirmed) == (False, False, False)
    assert slots[0].hash == tlv_hash(OLD) and slots[0].active
    assert device.slot_image(1) == NEW
    assert device.upload_bytes_written == len(NEW) == device.upload_bytes_received
    assert device.upload_requests == len(offsets)
    assert device.upload_offset is None  # session closed on completion


def test_upload_resumes_from_stored_offset_by_sha(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve()

    async def partial(client: SMPClient) -> int:
        async for off in client.upload(NEW):
            if off >= len(NEW) // 2:
                return off
        raise AssertionError("upload finished")

    stopped_at = client_call(link, partial)
    assert device.upload_offset == stopped_at
    offsets = client_call(link, lambda c: full_upload(c, NEW))
    assert offsets[0] == stopped_at  # the device answered the stored offset to the new first chunk
    assert offsets[-1] == len(NEW)
    assert device.slot_image(1) == NEW
    assert device.upload_bytes_written == len(NEW)
    assert len(NEW) < device.upload_bytes_received < len(NEW) + 400  # one chunk sent twice
    assert any("resume at off" in e for e in device.events)


def test_upload_checks_offsets_header_and_match(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve()
    wrong_sha = hashlib.sha256(b"something else").digest()

    async def scenario(client: SMPClient) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["no_magic"] = await client.request(
            ImageUploadWrite(off=0, len=5000, data=b"\x00" * 64, sha=wrong_sha))
        out["short"] = await client.request(ImageUploadWrite(off=0, len=5000, data=NEW[:16]))
        out["no_session"] = await client.request(ImageUploadWrite(off=256, data=NEW[256:512]))
        first = await client.request(
            ImageUploadWrite(off=0, len=len(NEW), data=NEW[:256], sha=wrong_sha, image=0))
        out["first"] = first
        out["gap"] = await client.request(ImageUploadWrite(off=1024, data=NEW[1024:1280]))
        off = 256
        while off < len(NEW):
            last = await client.request(ImageUploadWrite(off=off, data=NEW[off:off + 300]))
            assert success(last), last
            off = last.off
        out["last"] = last
        return out

    out = client_call(link, scenario)
    assert error_v2(out["no_magic"]) and (out["no_magic"].err.group, out["no_magic"].err.rc) == (1, 23)
    assert error_v2(out["short"]) and out["short"].err.rc == 22
    assert success(out["no_session"]) and out["no_session"].off == 0
    assert success(out["first"]) and out["first"].off == 256
    assert success(out["gap"]) and out["gap"].off == 256  # data dropped, expected offset answered
    assert out["last"].off == len(NEW) and out["last"].match is False
    assert device.upload_bytes_written == len(NEW)


def test_reupload_of_identical_data_is_a_noop(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve()
    client_call(link, lambda c: full_upload(c, NEW))
    written = device.upload_bytes_written

    async def again(client: SMPClient) -> Any:
        return await client.request(ImageUploadWrite(
            off=0, len=len(NEW), data=NEW[:200], sha=hashlib.sha256(NEW).digest()))

    answer = client_call(link, again)
    assert success(answer) and answer.off == len(NEW) and answer.match is True
    assert device.upload_bytes_written == written


def test_power_cycle_loses_the_upload_session(serve: Callable[..., tuple[EmulatedDevice, Path]],
                                              runner: EmulatorThread) -> None:
    device, link = serve()

    async def partial(client: SMPClient) -> int:
        async for off in client.upload(NEW):
            if off > 2000:
                return off
        raise AssertionError

    stopped_at = client_call(link, partial)
    device.power_cycle()  # from the test thread: hops onto the emulator loop
    assert device.upload_offset is None and device.boot_count == 1

    async def resume_attempt(client: SMPClient) -> Any:
        return await client.request(ImageUploadWrite(off=stopped_at, data=NEW[stopped_at:stopped_at + 100]))

    answer = client_call(link, resume_attempt)
    assert success(answer) and answer.off == 0  # client must start again with every field


# --- test / reset / confirm / revert -----------------------------------------------------------


def test_test_reset_then_gateway_confirms(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve()

    async def until_reset(client: SMPClient) -> Any:
        await full_upload(client, NEW)
        rsp = await client.request(ImageStatesWrite(hash=b"\x01" * 32, confirm=False))
        assert error_v2(rsp) and rsp.err.rc == 8  # HASH_NOT_FOUND
        await mark_test_and_reset(client, NEW)
        busy = await client.request(ImageUploadWrite(off=0, len=len(OLD), data=OLD[:200]))
        return busy

    busy = client_call(link, until_reset)
    assert error_v2(busy) and busy.err.rc == 9  # slot 1 pending: NO_FREE_SLOT
    wait_for(lambda: device.boot_count == 1 and not device.is_down)

    async def after_boot(client: SMPClient) -> tuple[Any, Any]:
        state = await client.request(ImageStatesRead())
        return state, await client.request(ImageStatesWrite(confirm=True))

    state, confirmed = client_call(link, after_boot)
    slots = images(state)
    assert slots[0].hash == tlv_hash(NEW) and slots[0].active and not slots[0].confirmed
    assert slots[1].hash == tlv_hash(OLD) and slots[1].confirmed and not slots[1].active
    slots = images(confirmed)
    assert slots[0].hash == tlv_hash(NEW) and slots[0].confirmed
    assert not slots[1].confirmed and not slots[1].pending
    assert device.confirmed and device.active_image() == NEW and device.slot_image(1) == OLD

    device.power_cycle()  # a confirmed image stays
    assert device.active_image() == NEW


def test_unconfirmed_trial_is_reverted_on_next_reset(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve()

    async def scenario(client: SMPClient) -> None:
        await full_upload(client, NEW)
        await mark_test_and_reset(client, NEW)

    client_call(link, scenario)
    wait_for(lambda: device.boot_count == 1 and not device.is_down)
    assert device.active_image() == NEW and not device.confirmed
    device.power_cycle()
    state = images(client_call(link, lambda c: c.request(ImageStatesRead())))
    assert state[0].hash == tlv_hash(OLD) and state[0].active and state[0].confirmed
    assert state[1].hash == tlv_hash(NEW) and not state[1].pending and not state[1].confirmed


def test_confirm_policy_never_reverts_after_reset(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(confirm_policy="never")

    async def scenario(client: SMPClient) -> None:
        await full_upload(client, NEW)
        await mark_test_and_reset(client, NEW)

    client_call(link, scenario)
    wait_for(lambda: device.boot_count == 2 and not device.is_down)
    state = images(client_call(link, lambda c: c.request(ImageStatesRead())))
    assert state[0].hash == tlv_hash(OLD) and state[0].active and state[0].confirmed
    assert state[1].hash == tlv_hash(NEW) and not (state[1].pending or state[1].confirmed)
    assert device.active_image() == OLD
    assert any("reverted" in e for e in device.events)


def test_confirm_policy_self_confirms_after_boot(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(confirm_policy="self")

    async def scenario(client: SMPClient) -> None:
        await full_upload(client, NEW)
        await mark_test_and_reset(client, NEW)

    client_call(link, scenario)
    wait_for(lambda: device.boot_count == 1 and device.confirmed)
    state = images(client_call(link, lambda c: c.request(ImageStatesRead())))
    assert state[0].hash == tlv_hash(NEW) and state[0].active and state[0].confirmed
    device.power_cycle()
    assert device.active_image() == NEW


def test_corrupt_image_in_slot1_is_not_booted(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    bad = bytearray(NEW)
    bad[0x400] ^= 0xFF  # body no longer matches the hash TLV
    device, link = serve(slot1=bytes(bad))

    async def scenario(client: SMPClient) -> None:
        rsp = await client.request(ImageStatesWrite(hash=tlv_hash(NEW), confirm=False))
        assert images(rsp)[1].pending

    client_call(link, scenario)
    device.power_cycle()
    assert device.active_image() == OLD and device.confirmed and len(device.slots) == 1


def test_erase_slot1(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(slot1=NEW)

    async def scenario(client: SMPClient) -> tuple[Any, Any, Any]:
        active = await client.request(ImageErase(slot=0))
        erased = await client.request(ImageErase())
        return active, erased, await client.request(ImageStatesRead())

    active, erased, state = client_call(link, scenario)
    assert error_v2(active) and active.err.rc == 9
    assert success(erased)
    assert list(images(state)) == [0] and device.slot_image(1) == b""


# --- MCUboot serial recovery -------------------------------------------------------------------


def test_recovery_offset_probe_and_upload(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(mode="recovery", buf_size=1024, buf_count=1)

    async def first_part(client: SMPClient) -> tuple[int, Any, Any]:
        echo = await client.request(EchoWrite(d="x"))
        async for off in client.upload(NEW):
            if off > 5000:
                return off, echo, await client.request(ImageStatesRead())
        raise AssertionError

    stopped_at, echo, listing = client_call(link, first_part)
    assert error(echo) and echo.rc == 8  # this recovery build has no echo
    assert success(listing) and listing.images == []  # slot 0 erased, half written

    async def resume(client: SMPClient) -> tuple[Any, Any, Any]:
        probe = await client.request(ImageUploadWrite(off=1, data=b"\x00"))
        assert success(probe)
        off = probe.off
        while off < len(NEW):
            rsp = await client.request(ImageUploadWrite(off=off, data=NEW[off:off + 900]))
            assert success(rsp) and rsp.rc == 0, rsp
            off = rsp.off
        state = await client.request(ImageStatesRead())
        return probe, state, await client.request(ResetWrite())

    probe, state, reset = client_call(link, resume)
    assert probe.off == stopped_at and probe.rc == 0
    assert success(state) and len(state.images) == 1
    entry = state.images[0]
    assert (entry.slot, entry.version, entry.hash) == (0, "2.1.3.7", tlv_hash(NEW))
    assert entry.active is None and entry.confirmed is None  # recovery lists no flags
    assert error(reset) and reset.rc == 0  # MCUboot answers {"rc": 0}
    assert device.upload_bytes_written == len(NEW)

    wait_for(lambda: device.boot_count == 1 and not device.is_down)
    assert device.mode == "zephyr"  # the new application booted
    app = images(client_call(link, lambda c: c.request(ImageStatesRead())))
    assert app[0].hash == tlv_hash(NEW) and app[0].active and app[0].confirmed


def test_recovery_restarts_on_offset_zero(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(mode="recovery", buf_size=1024, buf_count=1)

    async def scenario(client: SMPClient) -> list[Any]:
        sha = hashlib.sha256(NEW).digest()
        return [
            await client.request(ImageUploadWrite(off=0, len=len(NEW), data=NEW[:500], sha=sha)),
            await client.request(ImageUploadWrite(off=500, data=NEW[500:1000])),
            # same sha again: recovery ignores it and starts over
            await client.request(ImageUploadWrite(off=0, len=len(NEW), data=NEW[:300], sha=sha)),
            await client.request(ImageUploadWrite(off=7, data=b"zz")),
        ]

    answers = client_call(link, scenario)
    assert [a.off for a in answers] == [500, 1000, 300, 300]
    assert all(a.rc == 0 for a in answers)


def test_recovery_device_with_empty_slot0(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(mode="recovery", slot0=b"")

    async def scenario(client: SMPClient) -> tuple[Any, list[int]]:
        return await client.request(ImageStatesRead()), await full_upload(client, NEW)

    state, offsets = client_call(link, scenario)
    assert success(state) and state.images == [] and offsets[-1] == len(NEW)
    device.power_cycle()
    assert device.mode == "zephyr" and device.active_image() == NEW and device.confirmed


def test_reset_into_recovery_with_boot_mode(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve()
    assert success(client_call(link, lambda c: c.request(ResetWrite(boot_mode=1))))
    wait_for(lambda: device.boot_count == 1 and not device.is_down)
    assert device.mode == "recovery"


# --- faults and the transport ------------------------------------------------------------------


def test_absent_port_and_return(serve: Callable[..., tuple[EmulatedDevice, Path]],
                                runner: EmulatorThread) -> None:
    device, link = serve()
    request = smp_request(2, 0, 0, cbor2.dumps({"d": "ping"}))
    with serial.Serial(str(link), timeout=0.05) as port:
        runner.call(device.set_absent(True))
        assert not os.path.lexists(link)
        for line in smppacket.encode(request):
            port.write(line)
        assert read_smp_packet(port, 0.4) is None  # no answer while absent
    runner.call(device.set_absent(False))
    assert link.is_symlink()
    answer = raw_transact(link, request)
    assert answer is not None and cbor2.loads(answer[8:]) == {"r": "ping"}


def test_drop_link_makes_a_new_pty_behind_the_same_path(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve()
    old_tty = os.readlink(link)
    with serial.Serial(str(link), timeout=0.2) as port:
        device.drop_link()
        with pytest.raises(serial.SerialException):
            for _ in range(5):
                port.read(1)
    assert os.readlink(link) != old_tty and os.readlink(link) == device.tty_name
    echo = client_call(link, lambda c: c.request(EchoWrite(d="back")))
    assert success(echo) and echo.r == "back"


def test_silent_while_resetting(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    device, link = serve(reset_delay=1.0)
    assert success(client_call(link, lambda c: c.request(ResetWrite())))
    wait_for(lambda: device.is_down, timeout=1.0)
    assert raw_transact(link, smp_request(2, 0, 0, cbor2.dumps({"d": "a"})), timeout=0.3) is None
    wait_for(lambda: not device.is_down, timeout=2.0)
    answer = raw_transact(link, smp_request(2, 0, 0, cbor2.dumps({"d": "b"})))
    assert answer is not None and cbor2.loads(answer[8:]) == {"r": "b"}


def test_v1_request_gets_translated_error(serve: Callable[..., tuple[EmulatedDevice, Path]]) -> None:
    _, link = serve()
    body = cbor2.dumps({"hash": b"\x02" * 32, "confirm": False})
    v2 = raw_transact(link, smp_request(2, 1, 0, body, version=1))
    v1 = raw_transact(link, smp_request(2, 1, 0, body, version=0))
    assert v2 is not None and cbor2.loads(v2[8:]) == {"err": {"group": 1, "rc": 8}}
    assert v1 is not None and v1[0] == 0x03 and cbor2.loads(v1[8:]) == {"rc": 1}


# --- runner and CLI ----------------------------------------------------------------------------


def test_runner_calls_coroutines_and_callables() -> None:
    runner = EmulatorThread().start()
    try:
        async def add(a: int, b: int) -> int:
            await asyncio.sleep(0)
            return a + b

        async def boom() -> None:
            raise ValueError("boom")

        assert runner.call(add(2, 3)) == 5
        assert runner.call(lambda: threading_name()) == "emulators"
        with pytest.raises(ValueError):
            runner.call(boom())
        with pytest.raises(TimeoutError):
            runner.call(asyncio.sleep(5), timeout=0.05)
    finally:
        runner.stop()
    assert not runner.running


def threading_name() -> str:
    import threading

    return threading.current_thread().name


def test_cli_serves_until_terminated(tmp_path: Path) -> None:
    image = tmp_path / "app.bin"
    image.write_bytes(OLD)
    link = tmp_path / "cli-dev"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd.emulators.smp_device", "--link", str(link),
         "--image", str(image), "--buf-size", "256"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(f"READY {link}")
        params = client_call(link, lambda c: c.request(MCUMgrParametersRead()))
        assert success(params) and params.buf_size == 256
    finally:
        proc.terminate()
        proc.wait(5)
    assert proc.returncode == 0 and not os.path.lexists(link)
