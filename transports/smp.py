"""SMP (mcumgr) codec and client: header, CBOR bodies, errors and image upload (smp.md §1, §9)."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeGuard

import cbor2

from transports.framing import SMP_HEADER_SIZE
from transports.link import Link, LinkTimeout

HEADER = struct.Struct("!BBHHBB")
HEADER_SIZE = SMP_HEADER_SIZE
SMP_V1, SMP_V2 = 0, 1

DEFAULT_BUF_SIZE = 384  # Zephyr's default netbuf; used when the device has no params command
MIN_FIRST_CHUNK = 32  # Zephyr checks the MCUboot header magic in the first chunk
FULL_SHA = 32  # bytes of the upload's sha256 session id when nothing forces it shorter
MAX_STALLS = 3  # upload answers in a row that accept nothing before we give up
MAX_PACKET = HEADER_SIZE + 0xFFFF  # the header's length field is 16 bits
MAX_WINDOW = 8  # upload requests in flight at most, whatever the device's buffers
MAX_UPLOAD_RESTARTS = 3  # times one upload may go back to a lower offset than the device gave before
UPLOAD_BYTES_FACTOR = 3  # one upload sends at most this many times the image (plus a window of chunks)


class Op(IntEnum):
    READ = 0
    READ_RSP = 1
    WRITE = 2
    WRITE_RSP = 3


class Group(IntEnum):
    OS = 0
    IMAGE = 1


class OsCmd(IntEnum):
    ECHO = 0
    RESET = 5
    PARAMS = 6


class ImageCmd(IntEnum):
    STATE = 0
    UPLOAD = 1
    ERASE = 5


MGMT_ENOTSUP = 8
MGMT_ERR_NAMES = (
    "EOK", "EUNKNOWN", "ENOMEM", "EINVAL", "ETIMEOUT", "ENOENT", "EBADSTATE", "EMSGSIZE",
    "ENOTSUP", "ECORRUPT", "EBUSY", "EACCESSDENIED", "UNSUPPORTED_TOO_OLD", "UNSUPPORTED_TOO_NEW",
)  # fmt: skip
GROUP_ERR_NAMES: dict[int, tuple[str, ...]] = {
    Group.OS: ("OK", "UNKNOWN", "INVALID_FORMAT", "QUERY_YIELDS_NO_ANSWER", "RTC_NOT_SET",
               "RTC_COMMAND_FAILED"),
    Group.IMAGE: (
        "OK", "UNKNOWN", "FLASH_CONFIG_QUERY_FAIL", "NO_IMAGE", "NO_TLVS", "INVALID_TLV",
        "TLV_MULTIPLE_HASHES_FOUND", "TLV_INVALID_SIZE", "HASH_NOT_FOUND", "NO_FREE_SLOT",
        "FLASH_OPEN_FAILED", "FLASH_READ_FAILED", "FLASH_WRITE_FAILED", "FLASH_ERASE_FAILED",
        "INVALID_SLOT", "NO_FREE_MEMORY", "FLASH_CONTEXT_ALREADY_SET", "FLASH_CONTEXT_NOT_SET",
        "FLASH_AREA_DEVICE_NULL", "INVALID_PAGE_OFFSET", "INVALID_OFFSET", "INVALID_LENGTH",
        "INVALID_IMAGE_HEADER", "INVALID_IMAGE_HEADER_MAGIC", "INVALID_HASH",
        "INVALID_FLASH_ADDRESS", "VERSION_GET_FAILED", "CURRENT_VERSION_IS_NEWER",
        "IMAGE_ALREADY_PENDING", "INVALID_IMAGE_VECTOR_TABLE", "INVALID_IMAGE_TOO_LARGE",
        "INVALID_IMAGE_DATA_OVERRUN", "IMAGE_CONFIRMATION_DENIED",
        "IMAGE_SETTING_TEST_TO_ACTIVE_DENIED",
    ),
}  # fmt: skip
GROUP_NAMES = {0: "OS", 1: "image", 2: "stat", 3: "settings", 8: "fs", 9: "shell", 10: "enum",
               11: "transport", 63: "zephyr"}  # fmt: skip


class SmpError(Exception):
    """The device refused a request, or answered something we cannot use.

    `group` is None for SMP's generic return codes (the v1 `rc` form), else the group of an
    SMP v2 `err`. `rc` is None for failures without a return code (malformed answer, image
    hash mismatch); `reason` is the device's `rsn` text or our explanation.
    """

    def __init__(self, rc: int | None, group: int | None = None, reason: str | None = None) -> None:
        self.rc = rc
        self.group = group
        self.reason = reason
        super().__init__(self._describe())

    def _describe(self) -> str:
        if self.rc is None:
            return self.reason or "SMP error"
        if self.group is None:
            names: tuple[str, ...] = MGMT_ERR_NAMES
            text = f"SMP error {self.rc}"
        else:
            names = GROUP_ERR_NAMES.get(self.group, ())
            group = GROUP_NAMES.get(self.group)
            text = f"{group} group error {self.rc}" if group else f"group {self.group} error {self.rc}"
        name = names[self.rc] if 0 <= self.rc < len(names) else "user-defined" if self.rc >= 256 else "unknown"
        text = f"{text} ({name})"
        return f"{text}: {self.reason}" if self.reason else text


class SmpMalformed(SmpError):
    """The response is not a valid SMP packet or lacks a field we need."""

    def __init__(self, why: str) -> None:
        super().__init__(None, None, f"malformed SMP response: {why}")


@dataclass(frozen=True)
class Header:
    op: int
    group: int
    cmd: int
    seq: int
    length: int = 0
    version: int = SMP_V2
    flags: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.version << 3 | self.op, self.flags, self.length, self.group, self.seq, self.cmd)

    @classmethod
    def unpack(cls, packet: bytes) -> Header:
        if len(packet) < HEADER_SIZE:
            raise SmpMalformed(f"{len(packet)} bytes, shorter than the 8-byte header")
        byte0, flags, length, group, seq, cmd = HEADER.unpack_from(packet)
        return cls(byte0 & 0x7, group, cmd, seq, length, (byte0 >> 3) & 0x3, flags)


@dataclass(frozen=True)
class ImageSlot:
    image: int
    slot: int
    version: str
    hash: bytes | None
    bootable: bool = False
    pending: bool = False
    confirmed: bool = False
    active: bool = False
    permanent: bool = False


def encode_request(op: int, group: int, cmd: int, body: dict[str, Any], seq: int, version: int = SMP_V2) -> bytes:
    """One SMP request packet; the body is a definite-length CBOR map in canonical key order."""
    payload = cbor2.dumps(body, canonical=True)
    return Header(op, group, cmd, seq, len(payload), version).pack() + payload


def decode_response(packet: bytes) -> tuple[Header, dict[str, Any]]:
    """Header and CBOR map of a response; raises SmpError for a v1 `rc` or v2 `err` error."""
    header = Header.unpack(packet)
    if len(packet) != HEADER_SIZE + header.length:
        raise SmpMalformed(f"header announces {header.length} bytes of CBOR, packet has {len(packet) - HEADER_SIZE}")
    try:
        body = cbor2.loads(packet[HEADER_SIZE:])
    except Exception as e:
        # Garbage makes cbor2 raise assorted types, varying by version (5.4.6: MemoryError for a
        # huge announced length, SystemError for a bad tag 30; 6.x: CBORError, no ValueError).
        raise SmpMalformed(f"bad CBOR: {e!r}") from e
    if not isinstance(body, dict):
        raise SmpMalformed(f"CBOR body is {type(body).__name__}, not a map")
    _raise_for_error(body)
    return header, body


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _raise_for_error(body: dict[str, Any]) -> None:
    err = body.get("err")
    if err is not None:
        if not isinstance(err, dict) or not _is_int(err.get("rc")) or not _is_int(err.get("group")):
            raise SmpMalformed(f"bad 'err' value {err!r}")
        if err["rc"] != 0:
            raise SmpError(err["rc"], err["group"])
    rc = body.get("rc")
    if rc is not None:
        if not _is_int(rc):
            raise SmpMalformed(f"bad 'rc' value {rc!r}")
        if rc != 0:
            rsn = body.get("rsn")
            raise SmpError(rc, None, rsn if isinstance(rsn, str) else None)


def _decode_answer(raw: bytes, op: Op, group: int, cmd: int, seq: int) -> dict[str, Any]:
    header = Header.unpack(raw)
    if (header.op, header.group, header.cmd) != (op + 1, group, cmd):
        raise SmpMalformed(f"answer {header} does not match request op {op} group {group} cmd {cmd} seq {seq}")
    return decode_response(raw)[1]


def _chunk(fields: dict[str, Any], limit: int, remaining: int, off: int) -> int:
    """The data bytes the request at `off` can carry; ValueError if too few to be of use."""
    n = chunk_size(fields, limit, remaining)
    if n < (min(MIN_FIRST_CHUNK, remaining) if off == 0 else 1):
        raise ValueError(f"a {limit}-byte packet limit leaves only {n} bytes for data at offset {off}")
    return n


def _upload_answer(rsp: dict[str, Any], total: int, first: dict[str, Any]) -> int:
    """The offset an upload answer gives, checked."""
    answered = _int_field(rsp, "off")
    if not 0 <= answered <= total:
        raise SmpMalformed(f"upload answer off {answered} is outside the {total}-byte image")
    # Zephyr checks `match` against the stored sha padded with zeros: meaningful only for a full one
    if rsp.get("match") is False and len(first.get("sha", b"")) == FULL_SHA:
        raise SmpError(None, Group.IMAGE, "the uploaded image does not match its sha256 (match: false)")
    return answered


def _int_field(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not _is_int(value):
        raise SmpMalformed(f"expected an integer '{key}', got {body!r}")
    return value


def parse_image_list(body: dict[str, Any]) -> list[ImageSlot]:
    """The `images` of an image state response; flags a device leaves out are False."""
    images = body.get("images")
    if not isinstance(images, list):
        raise SmpMalformed(f"no 'images' list in {body!r}")
    slots = []
    for entry in images:
        if not isinstance(entry, dict):
            raise SmpMalformed(f"image entry {entry!r} is not a map")
        image, slot, version, digest = entry.get("image", 0), entry.get("slot"), entry.get("version"), entry.get("hash")
        if not (_is_int(image) and _is_int(slot) and isinstance(version, str)) or not isinstance(digest, bytes | None):
            raise SmpMalformed(f"bad image entry {entry!r}")
        flags = {f: bool(entry.get(f, False)) for f in ("bootable", "pending", "confirmed", "active", "permanent")}
        slots.append(ImageSlot(image, slot, version, digest, **flags))
    return slots


def _bstr_head(n: int) -> int:
    return 1 if n < 24 else 2 if n < 0x100 else 3 if n < 0x10000 else 5


def chunk_size(fields: dict[str, Any], limit: int, remaining: int) -> int:
    """The most data bytes an upload request with `fields` can carry in a `limit`-byte packet."""
    empty = len(cbor2.dumps({**fields, "data": b""}, canonical=True))
    room = limit - HEADER_SIZE - empty + 1  # what the data's bstr head and bytes may use
    n = min(remaining, room - 1)
    while n > 0 and n + _bstr_head(n) > room:
        n -= 1
    return max(n, 0)


def first_chunk_fields(total: int, sha: bytes, image: int, limit: int) -> dict[str, Any]:
    """The fields of a request at offset 0, cut down only as far as a small packet limit needs.

    A BLE device without SMP reassembly takes one write per request: with Zephyr's default
    ATT MTU of 65 the full fields leave no room for the 32 header bytes of the first chunk.
    In order: `upgrade: false` and `image: 0` are the defaults and can go; Zephyr matches a
    shortened `sha` over the length sent (smp.md §1.4); without `sha` an interrupted upload
    starts again from 0 instead of resuming.
    """
    candidates = [{"len": total, "sha": sha, "image": image, "upgrade": False},
                  {"len": total, "sha": sha, "image": image},
                  {"len": total, "sha": sha[:16], "image": image},
                  {"len": total, "sha": sha[:8], "image": image}]
    if image == 0:
        candidates += [{"len": total, "sha": sha[:8]}, {"len": total}]
    need = min(MIN_FIRST_CHUNK, total)
    return next((c for c in candidates if chunk_size({"off": 0, **c}, limit, total) >= need), candidates[0])


ProgressCallback = Callable[[int, int], None]


@dataclass
class UploadGuard:
    """Ends an upload that the device keeps from ending. Offsets that go forward, back to 0
    and forward again would otherwise never stall it: a device's answer below one it gave
    before is a restart, and both the restarts and the bytes sent are bounded."""

    total: int
    byte_budget: int
    sent: int = 0
    restarts: int = 0
    high_water: int = 0  # the most the device has acknowledged in this upload
    last: int | None = None  # the device's last answer

    @classmethod
    def for_image(cls, total: int, packet_limit: int) -> UploadGuard:
        return cls(total, UPLOAD_BYTES_FACTOR * total + MAX_WINDOW * packet_limit)

    def sending(self, n: int) -> None:
        self.sent += n
        if self.sent > self.byte_budget:
            raise SmpError(None, Group.IMAGE, f"upload is not progressing: {self.sent} bytes sent for a "
                                              f"{self.total}-byte image, and the device has acknowledged "
                                              f"{self.high_water}")

    def answered(self, off: int) -> None:
        if self.last is not None and off < self.last:
            self.restarts += 1
            if self.restarts > MAX_UPLOAD_RESTARTS:
                raise SmpError(None, Group.IMAGE, f"upload is not progressing: the device went back to a lower "
                                                  f"offset {self.restarts} times (last from {self.last} to {off}; "
                                                  f"the most it acknowledged was {self.high_water} of {self.total})")
        self.last = off
        self.high_water = max(self.high_water, off)


class _NotAsked:
    """The device has not been asked yet (None is an answer: the command is not supported)."""


NOT_ASKED = _NotAsked()


class SmpClient:
    """SMP requests to one device over a Link, one at a time, with their own sequence numbers.

    An answer is the packet with the request's sequence number and response op; anything
    else the link delivers (a late answer to a request that timed out, our own request
    echoed back) is stale and discarded (`stale_discarded`). `buf_size_override` replaces
    the device's `buf_size` (then params is not asked). Each request waits `timeout` seconds
    for its answer; upload chunks at offset 0 and erase wait `first_chunk_timeout`, since the
    device may erase a whole slot first.
    """

    def __init__(
        self,
        link: Link,
        *,
        buf_size_override: int | None = None,
        timeout: float = 5.0,
        first_chunk_timeout: float = 20.0,
    ) -> None:
        self.link = link
        self.buf_size_override = buf_size_override
        self.timeout = timeout
        self.first_chunk_timeout = first_chunk_timeout
        self._lock = asyncio.Lock()
        self._seq = 0
        self.stale_discarded = 0
        self.pipeline_fallbacks = 0  # uploads that went on one request at a time after trouble
        self.pipeline_fallback_at = 0  # the device's offset when the last one did
        self.resumed_at: int | None = None  # where the last upload's device took it up (0: from the start)
        # the device's answer to params: (buf_size, buf_count), None if it has no such command
        self._params: tuple[int, int] | None | _NotAsked = NOT_ASKED

    async def request(
        self, op: Op, group: int, cmd: int, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request, return the response map; raises SmpError, LinkError."""
        limit = self.timeout if timeout is None else timeout
        async with self._lock:
            seq, deadline = await self._send(op, group, cmd, body, limit)
            _, raw = await self._receive({seq}, deadline, limit)
        return _decode_answer(raw, op, group, cmd, seq)

    async def _send(self, op: Op, group: int, cmd: int, body: dict[str, Any], limit: float) -> tuple[int, float]:
        """Send one request (the caller holds the lock): its sequence number, and the loop time
        by which its answer must have come (`limit` after the link was up)."""
        seq = self._seq
        self._seq = (seq + 1) & 0xFF
        packet = encode_request(op, group, cmd, body, seq)
        # connecting (a BLE connection slot, discovery) has bounds of its own: the request's
        # time starts once the link is up
        await self.link.open()
        deadline = asyncio.get_running_loop().time() + limit
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel racing the answer
            async with asyncio.timeout(limit):
                await self.link.send(packet)
        except TimeoutError:
            raise LinkTimeout(f"{self.link.name}: no answer within {limit:g} s") from None
        return seq, deadline

    async def _receive(self, seqs: set[int], deadline: float, limit: float) -> tuple[int, bytes]:
        """The next response (an odd op: not our own request echoed back) to one of `seqs`."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                raw = await self.link.receive(max(0.0, deadline - loop.time()))
                if len(raw) >= HEADER_SIZE and raw[0] & 1 and raw[6] in seqs:
                    return raw[6], raw
                self.stale_discarded += 1
        except TimeoutError:
            raise LinkTimeout(f"{self.link.name}: no answer within {limit:g} s") from None

    async def params(self) -> tuple[int, int] | None:
        """(buf_size, buf_count), or None if the device does not support the command."""
        try:
            rsp = await self.request(Op.READ, Group.OS, OsCmd.PARAMS, {})
        except SmpError as e:
            if e.rc == MGMT_ENOTSUP and e.group is None:
                self._params = None
                return None
            raise
        params = self._params = (_int_field(rsp, "buf_size"), _int_field(rsp, "buf_count"))
        return params

    async def upload_window(self) -> int:
        """How many upload requests may be in flight: one, unless the link carries answers in
        order to several requests (`link.pipelining`) and the device said how many buffers it
        has; one of them holds the request being handled, the rest may wait their turn."""
        if not self.link.pipelining:
            return 1
        params = await self.params() if isinstance(self._params, _NotAsked) else self._params
        if params is None:
            return 1
        return max(1, min(params[1] - 1, MAX_WINDOW))

    async def image_list(self) -> list[ImageSlot]:
        return parse_image_list(await self.request(Op.READ, Group.IMAGE, ImageCmd.STATE, {}))

    async def test_image(self, hash: bytes) -> list[ImageSlot]:
        """Mark the image with this TLV hash for a test boot (pending) at the next reset."""
        return await self._state_write({"hash": hash, "confirm": False})

    async def confirm(self, hash: bytes | None = None) -> list[ImageSlot]:
        """Confirm the running image (no hash), or make the image with `hash` permanent (avoid)."""
        return await self._state_write({"confirm": True} if hash is None else {"hash": hash, "confirm": True})

    async def _state_write(self, body: dict[str, Any]) -> list[ImageSlot]:
        rsp = await self.request(Op.WRITE, Group.IMAGE, ImageCmd.STATE, body)
        return parse_image_list(rsp) if "images" in rsp else []

    async def reset(self, *, force: bool = False, boot_mode: int | None = None) -> bool:
        """Ask the device to reset. False if it did not answer: it often resets before it does.
        `boot_mode=1` asks Zephyr >= 4.2 to start MCUboot serial recovery (smp.md §1)."""
        body: dict[str, Any] = {"force": 1} if force else {}
        if boot_mode is not None:
            body["boot_mode"] = boot_mode
        try:
            await self.request(Op.WRITE, Group.OS, OsCmd.RESET, body)
        except LinkTimeout:
            return False
        return True

    async def echo(self, text: str) -> str:
        rsp = await self.request(Op.WRITE, Group.OS, OsCmd.ECHO, {"d": text})
        if not isinstance(rsp.get("r"), str):
            raise SmpMalformed(f"echo answer without text: {rsp!r}")
        return rsp["r"]

    async def erase(self, slot: int | None = None) -> None:
        """Erase an image slot (the device's default is the inactive one)."""
        body = {} if slot is None else {"slot": slot}
        await self.request(Op.WRITE, Group.IMAGE, ImageCmd.ERASE, body, timeout=self.first_chunk_timeout)

    async def packet_limit(self) -> int:
        """The largest request packet (header + CBOR) both the link and the device accept."""
        buf_size = self.buf_size_override
        if buf_size is None:
            params = await self.params()
            buf_size = params[0] if params else DEFAULT_BUF_SIZE
        limits = [buf_size - self.link.framing_overhead, MAX_PACKET]
        if self.link.max_packet is not None:
            limits.append(self.link.max_packet)
        return min(limits)

    async def upload(
        self,
        data: bytes,
        *,
        image: int = 0,
        progress: ProgressCallback | None = None,
        probe_offset: int | None = None,
        window: int = 1,
    ) -> None:
        """Upload an image, always continuing from the offset the device reports.

        Every request at offset 0 carries len, sha (sha256 of `data`, the resume session id),
        image and upgrade, also when the device restarts the upload with `off: 0` (fewer of
        them only when the packet limit is too small, see `first_chunk_fields`).
        `probe_offset` (MCUboot serial recovery resume) sends the first chunk at that offset;
        the device accepts it or answers the offset it expects. `progress(off, len)` is called
        after each answer; an exception raised from it aborts the upload.

        `window` > 1 keeps that many requests in flight once the first one is answered (the
        device may erase the slot first): each answer must be the offset right after its own
        chunk. At the first that is not (an answer lost, a chunk the device did not take),
        the rest of the upload goes one request at a time from the offset the device gave.
        """
        total = len(data)
        if total == 0:
            raise ValueError("nothing to upload")
        if probe_offset is not None and not 0 <= probe_offset < total:
            raise ValueError(f"probe_offset {probe_offset} is outside the {total}-byte image")
        limit = await self.packet_limit()
        first = first_chunk_fields(total, hashlib.sha256(data).digest(), image, limit)
        view = memoryview(data)
        off = probe_offset or 0
        stalls = 0
        guard = UploadGuard.for_image(total, limit)
        self.resumed_at = None
        while True:
            if window > 1 and off > 0:
                off, done = await self._pipelined(view, off, limit, window, first, progress, guard)
                if done:
                    return
                self.pipeline_fallbacks += 1
                self.pipeline_fallback_at = off
                window = 1
            fields: dict[str, Any] = {"off": off, **first} if off == 0 else {"off": off}
            n = _chunk(fields, limit, total - off, off)
            fields["data"] = bytes(view[off : off + n])
            timeout = self.first_chunk_timeout if off == 0 else self.timeout
            guard.sending(n)
            rsp = await self.request(Op.WRITE, Group.IMAGE, ImageCmd.UPLOAD, fields, timeout=timeout)
            answered = _upload_answer(rsp, total, first)
            guard.answered(answered)
            if self.resumed_at is None:  # the first answer: the device took our chunk, or says what it has
                self.resumed_at = off if answered == off + n else answered
            stalls = stalls + 1 if answered <= off else 0
            if stalls >= MAX_STALLS:
                raise SmpError(None, Group.IMAGE, f"upload is not progressing: the device keeps answering offset "
                                                  f"{answered}, taking none of the data sent there")
            if progress is not None:
                progress(answered, total)
            off = answered
            if off == total:
                return

    async def _pipelined(self, view: memoryview, off: int, limit: int, window: int, first: dict[str, Any],
                         progress: ProgressCallback | None, guard: UploadGuard) -> tuple[int, bool]:
        """Chunks from `off` on, `window` requests in flight; (the device's offset, whether the
        upload is complete). Returns early, with the device's offset, at the first answer that
        is not the one expected."""
        total = len(view)
        in_flight: deque[tuple[int, int, float]] = deque()  # seq, offset after the chunk, deadline
        sent = off
        async with self._lock:
            while True:
                while len(in_flight) < window and sent < total:
                    fields: dict[str, Any] = {"off": sent}
                    n = _chunk(fields, limit, total - sent, sent)
                    fields["data"] = bytes(view[sent : sent + n])
                    guard.sending(n)
                    seq, deadline = await self._send(Op.WRITE, Group.IMAGE, ImageCmd.UPLOAD, fields, self.timeout)
                    in_flight.append((seq, sent + n, deadline))
                    sent += n
                seq, expected, deadline = in_flight[0]
                got, raw = await self._receive({s for s, _, _ in in_flight}, deadline, self.timeout)
                answered = _upload_answer(_decode_answer(raw, Op.WRITE, Group.IMAGE, ImageCmd.UPLOAD, got), total,
                                          first)
                guard.answered(answered)
                if got != seq or answered != expected:
                    return answered, False
                in_flight.popleft()
                if progress is not None:
                    progress(answered, total)
                if answered == total:
                    return answered, True
