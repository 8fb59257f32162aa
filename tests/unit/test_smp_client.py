"""SmpClient against a small in-test fake device that follows Zephyr img_mgmt / MCUboot recovery rules.

The fake parses requests with struct + cbor2 and builds answers by hand (smp.md §1.2, §1.4),
so it shares no code with the client under test.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
import pytest

from transports.link import LinkTimeout
from transports.smp import ImageSlot, SmpClient, SmpError, SmpMalformed

MAGIC = bytes.fromhex("3db8f396")
IMAGE = MAGIC + random.Random(1).randbytes(9000)
Request = tuple[int, int, int, int, dict[str, Any]]  # op, group, cmd, seq, body


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return run


class FakeDevice:
    """A Link whose other end is an SMP server with one upload slot."""

    name = "fake0"
    framing_overhead = 4  # like the serial console

    def __init__(self, *, mode: str = "zephyr", buf_size: int | None = 384, max_packet: int | None = None) -> None:
        self.mode = mode
        self.buf_size = buf_size
        self.max_packet = max_packet
        self.packets: list[bytes] = []
        self.requests: list[Request] = []
        self.timeouts: list[float] = []
        self.slot = bytearray()
        self.session: dict[str, Any] | None = None  # RAM upload state: len, sha, off
        self.fault: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        self.answers: dict[tuple[int, int], Any] = {}  # (group, cmd) -> canned body or exception
        self.outbox: list[bytes | Exception] = []  # what receive() hands out next
        self.in_flight = 0  # requests sent whose answers were not read yet
        self.most_in_flight = 0
        self.lose_answer: Callable[[dict[str, Any]], bool] = lambda body: False  # the answer to it never comes

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, packet: bytes) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)
        limit = min(x for x in (self.buf_size and self.buf_size - 4, self.max_packet, 8 + 0xFFFF) if x)
        assert len(packet) <= limit, f"request of {len(packet)} bytes exceeds {limit}"
        byte0, _, length, group, seq, cmd = struct.unpack_from("!BBHHBB", packet)
        assert byte0 >> 3 == 1 and length == len(packet) - 8
        body = cbor2.loads(packet[8:])
        self.packets.append(packet)
        self.requests.append((byte0 & 7, group, cmd, seq, body))
        answer = self.answer(group, cmd, body)
        if isinstance(answer, Exception):
            self.outbox.append(answer)
            return
        if self.lose_answer(body):
            self.in_flight -= 1
            return
        payload = cbor2.dumps(answer)
        self.outbox.append(self.response(byte0 & 7, group, cmd, seq, payload))

    @staticmethod
    def response(op: int, group: int, cmd: int, seq: int, payload: bytes) -> bytes:
        return struct.pack("!BBHHBB", 1 << 3 | op + 1, 0, len(payload), group, seq, cmd) + payload

    async def receive(self, timeout: float) -> bytes:
        self.timeouts.append(round(timeout, 1))
        await asyncio.sleep(0)
        if not self.outbox:
            await asyncio.sleep(timeout)
            raise TimeoutError
        self.in_flight -= 1
        item = self.outbox.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def answer(self, group: int, cmd: int, body: dict[str, Any]) -> Any:
        if (group, cmd) in self.answers:
            return self.answers[(group, cmd)]
        if (group, cmd) == (0, 6):
            return {"rc": 8} if self.buf_size is None else {"buf_size": self.buf_size, "buf_count": 4}
        if (group, cmd) == (1, 1):
            faulty = self.fault(body) if self.fault else None
            return faulty or (self.recovery(body) if self.mode == "recovery" else self.zephyr(body))
        raise AssertionError(f"unexpected request group {group} cmd {cmd}")

    def zephyr(self, req: dict[str, Any]) -> dict[str, Any]:
        off, data = req["off"], req["data"]
        if off == 0:
            sha = req.get("sha")
            if sha and self.session and self.session["sha"][: len(sha)] == sha:
                return {"off": self.session["off"]}
            if sha and len(sha) == 32 and hashlib.sha256(self.slot).digest() == sha:
                return {"off": len(self.slot)}  # identical image already in the slot
            if len(data) < 32 or data[:4] != MAGIC:
                return {"err": {"group": 1, "rc": 22}}
            self.session = {"len": req["len"], "sha": sha, "off": 0}
            self.slot = bytearray()
        elif self.session is None or off != self.session["off"]:
            return {"off": self.session["off"] if self.session else 0}
        self.slot += data
        self.session["off"] += len(data)
        if self.session["off"] < self.session["len"]:
            return {"off": self.session["off"]}
        session, self.session = self.session, None
        return {"off": session["off"], "match": hashlib.sha256(self.slot).digest() == session["sha"]}

    def recovery(self, req: dict[str, Any]) -> dict[str, Any]:
        off, data = req["off"], req["data"]
        if off == 0:
            self.session = {"len": req["len"], "off": 0}
            self.slot = bytearray()
        elif self.session is None or off != self.session["off"]:
            return {"rc": 0, "off": self.session["off"] if self.session else 0}
        self.slot += data
        self.session["off"] += len(data)
        return {"rc": 0, "off": self.session["off"]}

    def uploads(self) -> list[dict[str, Any]]:
        return [body for _, group, cmd, _, body in self.requests if (group, cmd) == (1, 1)]


class Abort(Exception):
    pass


def abort_at(offset: int) -> Callable[[int, int], None]:
    def progress(off: int, total: int) -> None:
        if off >= offset:
            raise Abort(off)

    return progress


FIRST_FIELDS = {"len", "sha", "image", "upgrade"}


def assert_first_chunk(req: dict[str, Any], image: bytes = IMAGE) -> None:
    assert req["off"] == 0 and len(req["data"]) >= 32
    assert (req["len"], req["image"], req["upgrade"]) == (len(image), 0, False)
    assert req["sha"] == hashlib.sha256(image).digest()


@async_test
async def test_full_upload_fills_every_packet() -> None:
    device = FakeDevice()
    seen: list[tuple[int, int]] = []
    await SmpClient(device).upload(IMAGE, progress=lambda off, total: seen.append((off, total)))
    assert device.slot == IMAGE
    uploads = device.uploads()
    assert_first_chunk(uploads[0])
    assert all(set(req) == {"off", "data"} for req in uploads[1:])
    upload_packets = device.packets[1:]
    assert all(376 <= len(p) <= 380 for p in upload_packets[:-1])  # exact to the 380-byte limit
    assert [req["off"] for req in uploads] == [0] + [off for off, _ in seen[:-1]]
    assert seen[-1] == (len(IMAGE), len(IMAGE)) and all(total == len(IMAGE) for _, total in seen)
    assert [seq for *_, seq, _ in device.requests] == list(range(len(device.requests)))
    assert device.timeouts[1] == 20.0 and set(device.timeouts[2:]) == {5.0}


@async_test
async def test_one_request_at_a_time_unless_a_window_is_asked_for() -> None:
    device = FakeDevice()
    await SmpClient(device).upload(IMAGE)
    assert device.slot == IMAGE and device.most_in_flight == 1


@async_test
async def test_a_window_keeps_that_many_upload_requests_in_flight_after_the_first() -> None:
    device = FakeDevice()
    seen: list[int] = []
    client = SmpClient(device)
    await client.upload(IMAGE, window=3, progress=lambda off, total: seen.append(off))
    assert device.slot == IMAGE and device.most_in_flight == 3
    assert client.pipeline_fallbacks == 0
    uploads = device.uploads()
    assert_first_chunk(uploads[0])
    assert [req["off"] for req in uploads] == [0] + seen[:-1]  # in order, each right after the last
    assert seen == sorted(seen) and seen[-1] == len(IMAGE)


@async_test
async def test_a_chunk_the_device_did_not_take_ends_the_window_and_the_rest_goes_one_at_a_time() -> None:
    device = FakeDevice()
    skipped: list[int] = []

    def skip_one(body: dict[str, Any]) -> dict[str, Any] | None:
        if body["off"] >= 4000 and not skipped and device.session is not None:
            skipped.append(body["off"])
            return {"off": device.session["off"]}  # dropped by the device: it still expects this offset
        return None

    device.fault = skip_one
    client = SmpClient(device)
    await client.upload(IMAGE, window=3)
    assert device.slot == IMAGE and skipped and client.pipeline_fallbacks == 1


@async_test
async def test_a_lost_answer_ends_the_window_without_waiting_for_it() -> None:
    device = FakeDevice()
    lost: list[int] = []

    def lose_one(body: dict[str, Any]) -> bool:
        if body.get("off", 0) >= 4000 and not lost:
            lost.append(body["off"])
            return True
        return False

    device.lose_answer = lose_one
    client = SmpClient(device, timeout=5.0)
    started = asyncio.get_running_loop().time()
    await client.upload(IMAGE, window=3)
    assert device.slot == IMAGE and lost and client.pipeline_fallbacks == 1
    assert asyncio.get_running_loop().time() - started < 1.0  # the next answer told, no timeout


@async_test
async def test_resume_continues_from_device_offset() -> None:
    device = FakeDevice()
    with pytest.raises(Abort):
        await SmpClient(device).upload(IMAGE, progress=abort_at(4000))
    stored = device.session["off"]
    device.requests.clear()
    await SmpClient(device).upload(IMAGE)
    uploads = device.uploads()
    assert_first_chunk(uploads[0])
    assert uploads[1]["off"] == stored  # the device's offset, not a local guess
    assert sum(len(r["data"]) for r in uploads[1:]) == len(IMAGE) - stored
    assert device.slot == IMAGE


@async_test
async def test_off_zero_mid_upload_resends_every_first_field() -> None:
    device = FakeDevice()
    calls = 0

    def reboot_once(req: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 6:
            device.session = None  # the device rebooted: its RAM upload state is gone

    device.fault = reboot_once
    await SmpClient(device).upload(IMAGE)
    uploads = device.uploads()
    assert uploads[5]["off"] > 0 and set(uploads[5]) == {"off", "data"}
    assert_first_chunk(uploads[6])
    assert device.slot == IMAGE


@async_test
async def test_offset_mismatch_is_healed_by_the_device_offset() -> None:
    device = FakeDevice()
    calls = 0

    def lose_previous_chunk(req: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal calls
        calls += 1
        if calls == 4:
            del device.slot[-100:]
            device.session["off"] -= 100
            return {"off": device.session["off"]}
        return None

    device.fault = lose_previous_chunk
    await SmpClient(device).upload(IMAGE)
    uploads = device.uploads()
    assert uploads[4]["off"] == uploads[3]["off"] - 100
    assert device.slot == IMAGE


@async_test
async def test_identical_image_already_on_device_is_one_request() -> None:
    device = FakeDevice()
    await SmpClient(device).upload(IMAGE)
    device.requests.clear()
    await SmpClient(device).upload(IMAGE)
    assert len(device.uploads()) == 1


@async_test
async def test_match_false_fails() -> None:
    device = FakeDevice()

    def flip_a_bit(req: dict[str, Any]) -> None:
        if req["off"] <= 5000 < req["off"] + len(req["data"]):
            data = bytearray(req["data"])
            data[5000 - req["off"]] ^= 1
            req["data"] = bytes(data)  # the device stores a corrupted chunk

    device.fault = flip_a_bit
    with pytest.raises(SmpError, match="does not match") as info:
        await SmpClient(device).upload(IMAGE)
    assert info.value.rc is None and info.value.group == 1


@async_test
async def test_probe_offset_resumes_mcuboot_recovery() -> None:
    device = FakeDevice(mode="recovery", buf_size=1024)
    with pytest.raises(Abort):
        await SmpClient(device).upload(IMAGE, progress=abort_at(3000))
    stored = device.session["off"]
    device.requests.clear()
    await SmpClient(device).upload(IMAGE, probe_offset=stored)
    uploads = device.uploads()
    assert uploads[0]["off"] == stored and set(uploads[0]) == {"off", "data"}
    assert sum(len(r["data"]) for r in uploads) == len(IMAGE) - stored
    assert device.slot == IMAGE
    assert all(len(p) <= 1020 for p in device.packets)


@async_test
async def test_probe_at_a_wrong_offset_continues_where_the_device_is() -> None:
    device = FakeDevice(mode="recovery")
    with pytest.raises(Abort):
        await SmpClient(device).upload(IMAGE, progress=abort_at(3000))
    stored = device.session["off"]
    device.requests.clear()
    await SmpClient(device).upload(IMAGE, probe_offset=stored + 500)
    uploads = device.uploads()
    assert [r["off"] for r in uploads[:2]] == [stored + 500, stored]
    assert device.slot == IMAGE


@async_test
async def test_probe_on_a_rebooted_bootloader_starts_over() -> None:
    device = FakeDevice(mode="recovery")
    await SmpClient(device).upload(IMAGE, probe_offset=1234)
    uploads = device.uploads()
    assert uploads[0]["off"] == 1234
    assert_first_chunk(uploads[1])
    assert device.slot == IMAGE


@async_test
async def test_buf_size_override_skips_params() -> None:
    device = FakeDevice(buf_size=128)
    await SmpClient(device, buf_size_override=128).upload(IMAGE)
    assert all(group == 1 for _, group, *_ in device.requests)
    assert max(len(p) for p in device.packets) == 124
    assert device.slot == IMAGE


@async_test
async def test_params_unsupported_uses_the_default_buffer() -> None:
    device = FakeDevice(buf_size=None)
    client = SmpClient(device)
    assert await client.params() is None
    assert await client.packet_limit() == 380
    device.max_packet = 200
    assert await client.packet_limit() == 200


@async_test
async def test_link_max_packet_limits_chunks() -> None:
    device = FakeDevice(buf_size=2048, max_packet=251)
    await SmpClient(device).upload(IMAGE)
    assert max(len(p) for p in device.packets) == 251
    assert device.slot == IMAGE


@async_test
async def test_limit_too_small_for_the_first_chunk() -> None:
    device = FakeDevice()
    with pytest.raises(ValueError, match="leaves only"):
        await SmpClient(device, buf_size_override=50).upload(IMAGE)
    assert device.uploads() == []


@async_test
async def test_upload_argument_checks() -> None:
    client = SmpClient(FakeDevice())
    with pytest.raises(ValueError):
        await client.upload(b"")
    with pytest.raises(ValueError):
        await client.upload(IMAGE, probe_offset=len(IMAGE))


@async_test
async def test_upload_device_error() -> None:
    device = FakeDevice()
    device.answers[(1, 1)] = {"err": {"group": 1, "rc": 9}}
    with pytest.raises(SmpError, match=r"image group error 9 \(NO_FREE_SLOT\)") as info:
        await SmpClient(device).upload(IMAGE)
    assert (info.value.rc, info.value.group) == (9, 1)


@async_test
async def test_upload_that_makes_no_progress_stops() -> None:
    device = FakeDevice()
    device.answers[(1, 1)] = {"off": 0}
    with pytest.raises(SmpError, match="not progressing"):
        await SmpClient(device).upload(IMAGE)
    assert len(device.uploads()) == 3


@pytest.mark.parametrize("answer", [{}, {"off": "x"}, {"off": len(IMAGE) + 1}, {"off": -1}])
@async_test
async def test_upload_bad_answers(answer: dict[str, Any]) -> None:
    device = FakeDevice()
    device.answers[(1, 1)] = answer
    with pytest.raises(SmpMalformed):
        await SmpClient(device).upload(IMAGE)


@async_test
async def test_image_commands() -> None:
    device = FakeDevice()
    digest = bytes(range(32))
    listing = {"images": [{"slot": 0, "version": "1.0.0", "hash": digest, "active": True, "confirmed": True}]}
    device.answers[(1, 0)] = listing
    device.answers[(1, 5)] = {}
    client = SmpClient(device)
    expected = [ImageSlot(0, 0, "1.0.0", digest, confirmed=True, active=True)]
    assert await client.image_list() == expected
    assert await client.test_image(digest) == expected
    assert await client.confirm() == expected
    assert await client.confirm(hash=digest) == expected
    await client.erase()
    await client.erase(1)
    device.answers[(1, 0)] = {"rc": 0}
    assert await client.confirm() == []
    assert [(op, body) for op, _, _, _, body in device.requests] == [
        (0, {}),
        (2, {"hash": digest, "confirm": False}),
        (2, {"confirm": True}),
        (2, {"hash": digest, "confirm": True}),
        (2, {}),
        (2, {"slot": 1}),
        (2, {"confirm": True}),
    ]
    assert device.timeouts[4:6] == [20.0, 20.0]


@async_test
async def test_os_commands() -> None:
    device = FakeDevice()
    client = SmpClient(device, timeout=1.5)
    device.answers[(0, 0)] = {"r": "hello"}
    assert await client.echo("hello") == "hello"
    assert await client.params() == (384, 4)
    device.answers[(0, 5)] = {}
    assert await client.reset() is True
    assert await client.reset(force=True) is True
    device.answers[(0, 5)] = LinkTimeout("fake0: no answer")
    assert await client.reset() is False
    assert [body for *_, body in device.requests] == [{"d": "hello"}, {}, {}, {"force": 1}, {}]
    assert set(device.timeouts) == {1.5}
    device.answers[(0, 0)] = {"rc": 8}
    with pytest.raises(SmpError, match=r"SMP error 8 \(ENOTSUP\)"):
        await client.echo("x")
    device.answers[(0, 0)] = {"x": 1}
    with pytest.raises(SmpMalformed):
        await client.echo("x")
    device.answers[(0, 6)] = {"rc": 3}
    with pytest.raises(SmpError):
        await client.params()


@async_test
async def test_requests_are_serialized_and_sequences_wrap() -> None:
    device = FakeDevice()
    device.answers[(0, 0)] = {"r": ""}
    client = SmpClient(device)
    await asyncio.gather(*(client.echo("") for _ in range(300)))
    assert [seq for *_, seq, _ in device.requests] == [i % 256 for i in range(300)]


@async_test
async def test_answer_for_another_command_is_rejected() -> None:
    class Confused(FakeDevice):
        async def receive(self, timeout: float) -> bytes:
            rsp = bytearray(await super().receive(timeout))
            rsp[7] ^= 1  # the same sequence number, another command
            return bytes(rsp)

    device = Confused()
    device.answers[(0, 0)] = {"r": ""}
    with pytest.raises(SmpMalformed, match="does not match"):
        await SmpClient(device).echo("")


@async_test
async def test_an_answer_with_our_sequence_number_but_the_wrong_op_is_malformed() -> None:
    class Muddled(FakeDevice):
        async def receive(self, timeout: float) -> bytes:
            rsp = bytearray(await super().receive(timeout))
            rsp[0] = rsp[0] & ~0x7 | 1  # READ_RSP to a WRITE
            return bytes(rsp)

    device = Muddled()
    device.answers[(0, 0)] = {"r": ""}
    with pytest.raises(SmpMalformed, match="does not match"):
        await SmpClient(device).echo("")


@async_test
async def test_stale_answers_and_echoed_requests_are_skipped_by_sequence_number() -> None:
    class Noisy(FakeDevice):
        async def send(self, packet: bytes) -> None:
            await super().send(packet)
            answer = self.outbox.pop()
            seq = packet[6]
            self.outbox += [self.response(0, 0, 0, (seq - 1) & 0xFF, cbor2.dumps({"r": "late"})),  # an older answer
                            packet,  # our own request, echoed by a loopback port
                            answer]

    device = Noisy()
    device.answers[(0, 0)] = {"r": "now"}
    client = SmpClient(device)
    assert [await client.echo("x"), await client.echo("y")] == ["now", "now"]
    assert client.stale_discarded == 4


@async_test
async def test_no_answer_in_time_is_a_link_timeout_naming_the_link() -> None:
    class Silent(FakeDevice):
        async def receive(self, timeout: float) -> bytes:
            self.outbox.clear()  # the answer is lost
            await asyncio.sleep(timeout)
            raise TimeoutError

    device = Silent()
    device.answers[(0, 0)] = {"r": ""}
    with pytest.raises(LinkTimeout, match="fake0: no answer within 0.05 s"):
        await SmpClient(device, timeout=0.05).echo("")
