"""An MCUboot/Zephyr SMP (mcumgr) device emulator served on a pseudo-terminal.

Written from /work/shared/protocols/smp.md (and the Zephyr `img_mgmt` / MCUboot `boot_serial`
behaviour it records), deliberately sharing no code with the gateway's `transports` package:
its own console framing, CBOR handling and MCUboot image parser, so a mistake in the gateway's
client is not mirrored here.

What it models:

* SMP over the console (smp.md §2.1): `06 09` / `04 14` lines, base64 per line, CRC16-XMODEM,
  a 128-byte device line buffer (longer lines are discarded), and a `buf_size` reassembly
  buffer: a frame whose decoded bytes (2-byte length + packet + CRC) exceed `buf_size`, i.e. a
  packet bigger than `buf_size - 4`, is dropped without an answer, as Zephyr's netbuf overflow
  does (smpclient's integration suite saw `buf_size - 3` dropped on real servers).
* Zephyr application (`mode="zephyr"`): img_mgmt upload with the RAM session (sha resume, offset
  mismatch answered with the expected offset, header/magic check on the first chunk, `match` on
  completion), image state read/write with the swap-type flag rules of `img_mgmt_state.c`,
  image erase, OS echo/reset/params/bootloader info, v2 `err` group errors (v1 requests get the
  translated `rc`), `{"rc": 8}` for anything not implemented. Responses use indefinite-length
  CBOR maps/arrays like zcbor unless `indefinite_maps=False`.
* MCUboot swap-scratch on reset: test -> swap, trial boot; unconfirmed trial -> revert on the
  next reset; permanent -> swap without trial. The emulated app can confirm itself
  (`confirm_policy="self"`), wait for the gateway (`"gateway"`) or crash before confirming
  (`"never"`, which makes MCUboot revert right away).
* MCUboot serial recovery (`mode="recovery"`, smp.md §1.4): upload straight into slot 0,
  `off==0` always restarts, a wrong offset gets `{"rc":0,"off":curr}`, replies carry `rc`,
  image list with slot/version/hash only. After a reset it boots the application in slot 0
  (mode becomes "zephyr") unless `stay_in_recovery=True` or slot 0 holds no valid image.

Hostile devices, for the gateway's bounds (issue 11): `crash_at` (the firmware crashes and
resets each time an upload reaches that offset), `restart_every` (img_mgmt loses its session
every N upload requests and answers `off: 0`, without a reset: offsets forward, back, forward),
`lie_ahead` (answers offsets beyond what it received) and `babble` (the console streams that
many bytes per second of log without a newline, so no SMP frame is ever seen at a line start).

Not modelled: signatures/encryption, multi-image, direct-XIP/RAM-load/overwrite-only modes, baud
rate (a pty moves bytes instantly), BLE/UDP transports.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import errno
import hashlib
import logging
import os
import signal
import struct
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import cbor2

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- SMP constants (smp.md §1.1, §1.3) -------------------------------------------------------

SMP_HEADER = struct.Struct("!BBHHBB")
BABBLE = b"<dbg> sensor: sample ready; " * 7  # the `babble` fault's bytes, no newline ever
OP_READ, OP_READ_RSP, OP_WRITE, OP_WRITE_RSP = 0, 1, 2, 3
SMP_V1, SMP_V2 = 0, 1
GROUP_OS, GROUP_IMAGE = 0, 1

OS_ECHO, OS_RESET, OS_PARAMS, OS_BOOTLOADER_INFO = 0, 5, 6, 8
IMG_STATE, IMG_UPLOAD, IMG_ERASE = 0, 1, 5

MGMT_ERR_EOK = 0
MGMT_ERR_EUNKNOWN = 1
MGMT_ERR_ENOMEM = 2
MGMT_ERR_EINVAL = 3
MGMT_ERR_ENOENT = 5
MGMT_ERR_EBADSTATE = 6
MGMT_ERR_ENOTSUP = 8
MGMT_ERR_EBUSY = 10
MGMT_ERR_UNSUPPORTED_TOO_NEW = 13

IMG_ERR_NO_IMAGE = 3
IMG_ERR_NO_TLVS = 4
IMG_ERR_TLV_MULTIPLE_HASHES_FOUND = 6
IMG_ERR_TLV_INVALID_SIZE = 7
IMG_ERR_HASH_NOT_FOUND = 8
IMG_ERR_NO_FREE_SLOT = 9
IMG_ERR_INVALID_SLOT = 14
IMG_ERR_INVALID_OFFSET = 20
IMG_ERR_INVALID_LENGTH = 21
IMG_ERR_INVALID_IMAGE_HEADER = 22
IMG_ERR_INVALID_IMAGE_HEADER_MAGIC = 23
IMG_ERR_INVALID_HASH = 24
IMG_ERR_CURRENT_VERSION_IS_NEWER = 27
IMG_ERR_IMAGE_ALREADY_PENDING = 28
IMG_ERR_INVALID_IMAGE_TOO_LARGE = 30
IMG_ERR_INVALID_IMAGE_DATA_OVERRUN = 31
IMG_ERR_IMAGE_SETTING_TEST_TO_ACTIVE_DENIED = 33

OS_ERR_QUERY_YIELDS_NO_ANSWER = 3

# Zephyr `img_mgmt_translate_error_code` (CONFIG_MCUMGR_SMP_SUPPORT_ORIGINAL_PROTOCOL): what an
# SMP v1 request gets instead of a group error. Anything not listed maps to EUNKNOWN.
_IMG_ERR_TO_V1 = {
    IMG_ERR_NO_IMAGE: MGMT_ERR_ENOENT,
    IMG_ERR_NO_TLVS: MGMT_ERR_ENOENT,
    IMG_ERR_NO_FREE_SLOT: MGMT_ERR_EBADSTATE,
    IMG_ERR_CURRENT_VERSION_IS_NEWER: MGMT_ERR_EBADSTATE,
    IMG_ERR_IMAGE_ALREADY_PENDING: MGMT_ERR_EBADSTATE,
    15: MGMT_ERR_ENOMEM,
    IMG_ERR_INVALID_SLOT: MGMT_ERR_EINVAL,
    19: MGMT_ERR_EINVAL,
    IMG_ERR_INVALID_OFFSET: MGMT_ERR_EINVAL,
    IMG_ERR_INVALID_LENGTH: MGMT_ERR_EINVAL,
    IMG_ERR_INVALID_IMAGE_HEADER: MGMT_ERR_EINVAL,
    IMG_ERR_INVALID_HASH: MGMT_ERR_EINVAL,
    25: MGMT_ERR_EINVAL,
}

MODES = ("zephyr", "recovery")
CONFIRM_POLICIES = ("gateway", "self", "never")
BOOTLOADER_MODE_SWAP_SCRATCH = 1

# Swap types as MCUboot/img_mgmt see them (active slot is always 0 in swap mode).
SWAP_NONE, SWAP_TEST, SWAP_PERM, SWAP_REVERT = "none", "test", "perm", "revert"

# --- console framing (smp.md §2.1) ---------------------------------------------------------

FRAME_START = b"\x06\x09"
FRAME_CONTINUE = b"\x04\x14"
DEVICE_LINE_BUFFER = 128  # UART_MCUMGR_RX_BUF_SIZE / BOOT_MAX_LINE_INPUT_LEN, newline included
TX_B64_PER_LINE = 124  # Zephyr packs 93 raw bytes per line: 2 + 124 + 1 = 127 bytes


def crc16_xmodem(data: bytes) -> int:
    return binascii.crc_hqx(data, 0)


def encode_console_frame(packet: bytes) -> bytes:
    """One SMP packet as console lines, the way a Zephyr device sends it."""
    body = struct.pack("!H", len(packet) + 2) + packet + struct.pack("!H", crc16_xmodem(packet))
    b64 = base64.b64encode(body)
    lines = []
    for i in range(0, len(b64), TX_B64_PER_LINE):
        marker = FRAME_START if i == 0 else FRAME_CONTINUE
        lines.append(marker + b64[i : i + TX_B64_PER_LINE] + b"\n")
    return b"".join(lines)


class ConsoleReceiver:
    """Device side of the console transport: bytes in, complete SMP packets out.

    Mirrors Zephyr `uart_mcumgr.c` + `serial_util.c`: lines are collected in a 128-byte buffer
    (an overlong line is discarded up to its newline), each SMP line is base64-decoded on its
    own, fragments are reassembled until the length prefix is satisfied, the CRC is checked.
    Non-SMP lines (console input) are ignored.
    """

    def __init__(self, buf_size: int, on_drop: Callable[[str], None] | None = None) -> None:
        self.buf_size = buf_size
        self._on_drop = on_drop or (lambda reason: None)
        self._line = bytearray()
        self._discarding = False
        self._frame: bytearray | None = None

    def reset(self) -> None:
        self._line.clear()
        self._discarding = False
        self._frame = None

    def feed(self, data: bytes) -> list[bytes]:
        packets: list[bytes] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline + 1
            chunk, start = data[start:end], end
            if self._discarding:
                self._discarding = newline < 0
                continue
            if len(self._line) + len(chunk) > DEVICE_LINE_BUFFER:
                self._line.clear()
                self._frame = None
                self._discarding = newline < 0
                self._on_drop(f"line longer than {DEVICE_LINE_BUFFER} bytes discarded")
                continue
            self._line += chunk
            if newline >= 0:
                packet = self._line_done(bytes(self._line))
                self._line.clear()
                if packet is not None:
                    packets.append(packet)
        return packets

    def _line_done(self, line: bytes) -> bytes | None:
        marker, payload = line[:2], line[2:].rstrip(b"\n")
        if marker == FRAME_START:
            self._frame = bytearray()
        elif marker != FRAME_CONTINUE or self._frame is None:
            return None  # console input, or a continuation without a start
        try:
            decoded = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self._frame = None
            self._on_drop("bad base64 in frame line")
            return None
        self._frame += decoded
        if len(self._frame) > self.buf_size:
            self._frame = None
            self._on_drop(f"frame exceeds reassembly buffer ({self.buf_size} bytes)")
            return None
        if len(self._frame) < 2:
            return None
        expected = struct.unpack_from("!H", self._frame)[0]
        have = len(self._frame) - 2
        if have < expected:
            return None
        frame, self._frame = bytes(self._frame), None
        if have > expected or expected < 2:
            self._on_drop("frame longer than its length field")
            return None
        body = frame[2:]
        if crc16_xmodem(body) != 0:  # CRC over packet + its big-endian CRC is 0
            self._on_drop("bad CRC")
            return None
        return body[:-2]


# --- CBOR ---------------------------------------------------------------------------------


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack("!H", n)
    return bytes([major << 5 | 26]) + struct.pack("!I", n)


def cbor_encode(obj: Any, *, indefinite: bool) -> bytes:
    """CBOR with zcbor's container style: `bf … ff` maps and `9f … ff` arrays if indefinite.

    Scalars go through cbor2 (5.4.6 and 6.x give the same bytes for them).
    """
    if isinstance(obj, dict):
        items = b"".join(
            cbor_encode(k, indefinite=indefinite) + cbor_encode(v, indefinite=indefinite)
            for k, v in obj.items()
        )
        return (b"\xbf" + items + b"\xff") if indefinite else _cbor_head(5, len(obj)) + items
    if isinstance(obj, (list, tuple)):
        items = b"".join(cbor_encode(v, indefinite=indefinite) for v in obj)
        return (b"\x9f" + items + b"\xff") if indefinite else _cbor_head(4, len(obj)) + items
    return cbor2.dumps(obj)


class _Crash(Exception):
    """The firmware crashed handling the request: no answer, and the device resets."""


class _BadRequest(Exception):
    """The request body does not decode as the command expects (Zephyr: MGMT_ERR_EINVAL)."""


def _field(body: dict, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    if key not in body:
        return default
    value = body[key]
    if isinstance(value, bool) and kind in (int, (int,)):
        raise _BadRequest(f"{key}: bool where an integer is expected")
    if not isinstance(value, kind):
        raise _BadRequest(f"{key}: unexpected type {type(value).__name__}")
    if kind is int and value < 0:
        raise _BadRequest(f"{key}: negative")
    return value


# --- MCUboot image parsing (smp.md §4) ------------------------------------------------------

IMAGE_MAGIC = 0x96F3B83D
IMAGE_HEADER = struct.Struct("<IIHHII BBHI 4x")
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_SHA256 = 0x10
IMAGE_F_NON_BOOTABLE = 0x10


class ImageFormatError(ValueError):
    """Not a readable MCUboot image; `code` is the img_mgmt error Zephyr would report."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class McubootImage:
    load_addr: int
    header_size: int
    protect_tlv_size: int
    image_size: int
    flags: int
    version: tuple[int, int, int, int]
    tlv_hash: bytes  # SHA-256 TLV value: what the device lists as `hash`
    computed_hash: bytes  # SHA-256 over header + body + protected TLVs
    total_size: int

    @property
    def version_str(self) -> str:
        major, minor, revision, build = self.version
        text = f"{major}.{minor}.{revision}"
        return f"{text}.{build}" if build else text

    @property
    def hash_ok(self) -> bool:
        return self.tlv_hash == self.computed_hash

    @property
    def bootable(self) -> bool:
        return not self.flags & IMAGE_F_NON_BOOTABLE


def parse_mcuboot_image(data: bytes) -> McubootImage:
    if len(data) < IMAGE_HEADER.size or data[:4] == b"\xff\xff\xff\xff":
        raise ImageFormatError(IMG_ERR_NO_IMAGE, "no image")
    (magic, load_addr, hdr_size, prot_size, img_size, flags,
     major, minor, revision, build) = IMAGE_HEADER.unpack_from(data)
    if magic != IMAGE_MAGIC:
        raise ImageFormatError(IMG_ERR_INVALID_IMAGE_HEADER_MAGIC, f"bad magic {magic:#x}")
    off = hdr_size + img_size
    info = _tlv_info(data, off)
    if info is not None and info[0] == TLV_PROT_INFO_MAGIC:
        off += info[1]
        info = _tlv_info(data, off)
    if info is None or info[0] != TLV_INFO_MAGIC:
        raise ImageFormatError(IMG_ERR_NO_TLVS, "no TLV area")
    hashed_end, end = off, off + info[1]
    if end > len(data):
        raise ImageFormatError(IMG_ERR_TLV_INVALID_SIZE, "TLV area runs past the data")
    tlv_hash = None
    pos = off + 4
    while pos + 4 <= end:
        tlv_type, tlv_len = struct.unpack_from("<HH", data, pos)
        if tlv_type == TLV_SHA256 and tlv_len == 32:
            if tlv_hash is not None:
                raise ImageFormatError(IMG_ERR_TLV_MULTIPLE_HASHES_FOUND, "two hash TLVs")
            if pos + 4 + 32 > end:
                raise ImageFormatError(IMG_ERR_TLV_INVALID_SIZE, "truncated hash TLV")
            tlv_hash = bytes(data[pos + 4 : pos + 36])
        pos += 4 + tlv_len
    if tlv_hash is None:
        raise ImageFormatError(IMG_ERR_HASH_NOT_FOUND, "no SHA-256 TLV")
    return McubootImage(
        load_addr=load_addr,
        header_size=hdr_size,
        protect_tlv_size=prot_size,
        image_size=img_size,
        flags=flags,
        version=(major, minor, revision, build),
        tlv_hash=tlv_hash,
        computed_hash=hashlib.sha256(data[:hashed_end]).digest(),
        total_size=end,
    )


def _tlv_info(data: bytes, off: int) -> tuple[int, int] | None:
    if off + 4 > len(data):
        return None
    magic, total = struct.unpack_from("<HH", data, off)
    return magic, total


def _try_parse(data: bytes) -> McubootImage | None:
    try:
        return parse_mcuboot_image(data)
    except ImageFormatError:
        return None


# --- the device ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotState:
    """One entry of the image list, as the device would report it."""

    slot: int
    version: str
    hash: bytes
    bootable: bool
    pending: bool
    confirmed: bool
    active: bool
    permanent: bool
    size: int


@dataclass
class _UploadSession:
    """Zephyr `g_img_mgmt_state`: RAM only."""

    size: int
    off: int
    sha: bytes


@dataclass
class _RecoveryUpload:
    """MCUboot `bs_upload` statics: RAM only."""

    size: int = 0
    off: int = 0


class EmulatedDevice:
    """An SMP device (Zephyr app with img_mgmt over MCUboot swap, or MCUboot serial recovery).

    Lives on one asyncio loop: the loop that runs `serve_pty`. The sync fault knobs
    (`drop_link`, `power_cycle`, `app_confirm`) may be called from another thread; they hop
    onto the device's loop.
    """

    def __init__(
        self,
        name: str,
        *,
        slot0: bytes,
        slot1: bytes = b"",
        buf_size: int = 384,
        buf_count: int = 4,
        mode: str = "zephyr",
        confirm_policy: str = "gateway",
        reset_delay: float = 0.3,
        indefinite_maps: bool = True,
        slot_size: int = 0x40000,
        reset_grace: float = 0.05,
        self_confirm_delay: float = 0.05,
        response_delay: float = 0.0,
        legacy_rc: bool = False,
        frugal_list: bool = False,
        recovery_echo: bool = False,
        stay_in_recovery: bool = False,
        boot_banner: bool = True,
        reset_veto: str | None = None,
        crash_at: int | None = None,
        restart_every: int | None = None,
        lie_ahead: int = 0,
        babble: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if confirm_policy not in CONFIRM_POLICIES:
            raise ValueError(f"confirm_policy must be one of {CONFIRM_POLICIES}")
        if buf_size < 16 or buf_count < 1:
            raise ValueError("buf_size must be >= 16 and buf_count >= 1")
        # An application device needs a valid slot 0; a device in serial recovery may be empty.
        image = parse_mcuboot_image(slot0) if mode == "zephyr" or slot0 else None
        if max(image.total_size if image else 0, len(slot1)) > slot_size:
            raise ValueError(f"image does not fit the {slot_size}-byte slot")
        self.name = name
        self.mode = mode
        self.confirm_policy = confirm_policy
        self._receiver = ConsoleReceiver(buf_size, self._frame_dropped)
        self.buf_count = buf_count
        self.reset_delay = reset_delay
        self.indefinite_maps = indefinite_maps
        self.slot_size = slot_size
        self.reset_grace = reset_grace
        self.self_confirm_delay = self_confirm_delay
        self.response_delay = response_delay
        self.legacy_rc = legacy_rc
        self.frugal_list = frugal_list
        self.recovery_echo = recovery_echo
        self.stay_in_recovery = stay_in_recovery
        self.boot_banner = boot_banner
        # fault knob, a CONFIG_MCUMGR_GRP_OS_RESET_HOOK that vetoes resets: "error" answers
        # `rc` EBUSY (MGMT_CB_ERROR_RC), "silent" answers success and does not reset
        self.reset_veto = reset_veto
        # hostile-device knobs (see the module docstring)
        self.crash_at = crash_at
        self.restart_every = restart_every
        self.lie_ahead = lie_ahead
        self.babble = babble
        self.crashes = 0

        self._flash = [bytearray(slot0[: image.total_size] if image else b""), bytearray(slot1)]
        self._swap = SWAP_NONE
        self._session: _UploadSession | None = None
        self._recovery = _RecoveryUpload()
        self._boot_to_recovery = False
        self._reset_after_reply = False

        # stats
        self.upload_requests = 0
        self.upload_bytes_written = 0
        self.upload_bytes_received = 0
        self.upload_chunk_max = 0  # the largest `data` of one upload request
        self.requests: list[tuple[int, int, int]] = []
        self.events: list[str] = []
        self.boot_count = 0
        self.frames_dropped = 0
        self.buffers_in_use = 0  # netbufs holding a request, waiting or being handled
        self.most_buffers_in_use = 0  # pipelined clients fill several

        # serving state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: Path | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._tty_name: str | None = None
        self._out = bytearray()
        self._writer_armed = False
        self._queue: asyncio.Queue[tuple[int, bytes]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._absent = False
        self._down = False
        self._memory: Callable[[bytes], None] | None = None  # serve_memory's answer sink
        self._generation = 0
        self._timers: list[asyncio.TimerHandle] = []
        self._babbler: asyncio.TimerHandle | None = None

    # --- public accessors -------------------------------------------------------------------

    @property
    def buf_size(self) -> int:
        """The reassembly buffer (MCUmgr params `buf_size`); frames above it are dropped."""
        return self._receiver.buf_size

    @buf_size.setter
    def buf_size(self, value: int) -> None:
        self._receiver.buf_size = value

    @property
    def link_path(self) -> Path | None:
        return self._link

    @property
    def tty_name(self) -> str | None:
        """The current pty slave (changes on `drop_link`)."""
        return self._tty_name

    @property
    def absent(self) -> bool:
        return self._absent

    @property
    def is_down(self) -> bool:
        """True while the device is resetting (silent)."""
        return self._down

    @property
    def swap_type(self) -> str:
        """MCUboot's view of the next boot: "none", "test", "perm" or "revert"."""
        return self._swap

    @property
    def confirmed(self) -> bool:
        """Whether the running image is confirmed (False while a trial boot is unconfirmed)."""
        return self._swap != SWAP_REVERT

    @property
    def slots(self) -> list[SlotState]:
        return self._slot_states()

    @property
    def upload_offset(self) -> int | None:
        """The offset of the open upload session (recovery: current offset), or None."""
        if self.mode == "recovery":
            return self._recovery.off
        return self._session.off if self._session else None

    def slot_image(self, n: int) -> bytes:
        """The bytes in slot `n`, trimmed to the image's size when it parses as an image."""
        data = bytes(self._flash[n])
        image = _try_parse(data)
        return data[: image.total_size] if image else data

    def slot(self, n: int) -> bytes:
        """Alias of `slot_image` (the name used in contracts.md)."""
        return self.slot_image(n)

    def active_image(self) -> bytes:
        """The image in the active slot (always slot 0 in swap mode), trimmed to its size."""
        return self.slot_image(0)

    # --- serving ----------------------------------------------------------------------------

    async def serve_pty(self, link_path: Path) -> None:
        """Start answering on a new pty whose slave is symlinked at `link_path`."""
        if self._loop is not None:
            raise RuntimeError(f"{self.name}: already serving")
        self._loop = asyncio.get_running_loop()
        self._link = Path(link_path)
        self._queue = asyncio.Queue()
        self._worker = self._loop.create_task(self._work(), name=f"smp-device-{self.name}")
        self._open_pty()
        self._publish_link()
        self._event(f"serving on {self._link} -> {self._tty_name}")
        if self.boot_banner:
            self._banner()
        if self.babble:
            self._babble_tick()

    async def serve_memory(self, deliver: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """Answer SMP packets handed over in memory, with no framing and no pty (fast tests of a
        client): returns the function that takes one request packet; each answer goes to
        `deliver`. Everything else behaves as on a pty: the netbuf limit, `response_delay`,
        resets during which requests are lost, `set_absent` and `power_cycle`."""
        if self._loop is not None:
            raise RuntimeError(f"{self.name}: already serving")
        self._loop = asyncio.get_running_loop()
        self._memory = deliver
        self._queue = asyncio.Queue()
        self._worker = self._loop.create_task(self._work(), name=f"smp-device-{self.name}")
        self._event("serving in memory")

        def request(packet: bytes) -> None:
            if not (self._absent or self._down):  # bytes sent to a device that is gone are lost
                self._accept(packet)

        return request

    async def stop(self) -> None:
        if self._babbler is not None:
            self._babbler.cancel()
            self._babbler = None
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._close_pty()
        self._unpublish_link()
        self._loop = None
        self._memory = None
        self._event("stopped")

    async def set_absent(self, absent: bool, *, hangup: bool = False) -> None:
        """Make the port disappear (symlink removed, no answers) or come back.

        With `hangup=True` the pty is also closed, so a client holding it open sees the port
        die (EIO/empty reads), as with a USB adapter pulled out; it is recreated on return.
        """
        if absent == self._absent:
            return
        self._absent = absent
        if self._memory is not None or self._loop is None:  # no pty to remove or bring back
            self._event("absent" if absent else "present again")
            return
        if absent:
            self._unpublish_link()
            if hangup:
                self._close_pty()
            self._event("port absent")
        else:
            if self._master is None:
                self._open_pty()
            self._publish_link()
            self._event(f"port present again ({self._tty_name})")

    def drop_link(self) -> None:
        """Close the pty and make a new one behind the same path (adapter replugged)."""
        self._in_loop(self._drop_link)

    def power_cycle(self, down_for: float = 0.0) -> None:
        """Reboot now (RAM upload session lost; MCUboot swap/revert rules apply)."""
        self._in_loop(lambda: self._begin_reset("power cycle", down_for))

    def app_confirm(self) -> None:
        """The running application confirms itself (`boot_write_img_confirmed()`)."""
        self._in_loop(self._app_confirm)

    # --- pty plumbing -----------------------------------------------------------------------

    def _open_pty(self) -> None:
        assert self._loop is not None
        master, slave = os.openpty()
        tty.setraw(master)  # termios of a pty master act on the slave: raw, no echo/CRLF
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._tty_name = os.ttyname(slave)
        self._out.clear()
        self._writer_armed = False
        self._receiver.reset()
        self._loop.add_reader(master, self._on_readable)

    def _close_pty(self) -> None:
        if self._master is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(self._master)
        if self._writer_armed:
            self._loop.remove_writer(self._master)
            self._writer_armed = False
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)  # type: ignore[arg-type]
        self._master = self._slave = None
        self._out.clear()

    def _publish_link(self) -> None:
        assert self._link is not None and self._tty_name is not None
        if self._link.exists() and not self._link.is_symlink():
            raise FileExistsError(f"{self._link} exists and is not a symlink")
        tmp = self._link.with_name(f".{self._link.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self._tty_name, tmp)
        os.replace(tmp, self._link)

    def _unpublish_link(self) -> None:
        if self._link is not None and self._link.is_symlink():
            if os.readlink(self._link) == self._tty_name:
                self._link.unlink()

    def _drop_link(self) -> None:
        self._close_pty()
        self._open_pty()
        if not self._absent:
            self._publish_link()
        self._event(f"link dropped, new pty {self._tty_name}")

    def _on_readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return  # no slave open at all (never happens while we hold ours)
        if not data or self._absent or self._down:
            return  # bytes on the wire while the device is gone or rebooting are lost
        for packet in self._receiver.feed(data):
            self._accept(packet)

    def _accept(self, packet: bytes) -> None:
        assert self._queue is not None
        if self.buffers_in_use >= self.buf_count:
            self._frame_dropped(f"no free netbuf ({self.buf_count} in use)")
            return
        self.buffers_in_use += 1
        self.most_buffers_in_use = max(self.most_buffers_in_use, self.buffers_in_use)
        self._queue.put_nowait((self._generation, packet))

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            generation, packet = await self._queue.get()
            try:
                await self._handle_queued(generation, packet)
            finally:
                self.buffers_in_use -= 1  # the netbuf is free once its request is handled

    async def _handle_queued(self, generation: int, packet: bytes) -> None:
        if self.response_delay:
            await asyncio.sleep(self.response_delay)
        if generation != self._generation or self._down or self._absent:
            return  # the device rebooted (or vanished) with the request in its buffer
        try:
            response = self._handle_packet(packet)
        except Exception:  # a bug in the emulator must not kill the device
            log.exception("%s: request handling failed", self.name)
            return
        if response is None:
            return
        if self._memory is not None:
            self._memory(response)
        else:
            # a babbling console never ends its line: the frame does not start one
            self._send((BABBLE if self.babble else b"") + encode_console_frame(response))

    def _send(self, data: bytes) -> None:
        if self._master is None:
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        assert self._loop is not None and self._master is not None
        while self._out:
            try:
                n = os.write(self._master, self._out)
            except BlockingIOError:
                break
            except OSError:
                self._out.clear()
                break
            del self._out[:n]
        if len(self._out) > 65536:
            # Nobody reads the port: a UART's bytes are simply gone.
            del self._out[: len(self._out) - 65536]
        want = bool(self._out)
        if want and not self._writer_armed:
            self._loop.add_writer(self._master, self._flush)
        elif not want and self._writer_armed:
            self._loop.remove_writer(self._master)
        self._writer_armed = want

    def _in_loop(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None or _running_loop() is loop:
            return fn()

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)

    # --- events -----------------------------------------------------------------------------

    def _event(self, text: str) -> None:
        self.events.append(text)
        log.info("%s: %s", self.name, text)

    def _frame_dropped(self, reason: str) -> None:
        self.frames_dropped += 1
        self._event(f"frame dropped: {reason}")

    def _babble_tick(self) -> None:
        """A log stuck in a loop, printing without a newline, `babble` bytes a second while up."""
        if self._master is not None and not (self._down or self._absent):
            self._send(BABBLE * max(1, self.babble // (100 * len(BABBLE))))
        if self._loop is not None:
            self._babbler = self._loop.call_later(0.01, self._babble_tick)

    def _banner(self) -> None:
        # Zephyr prints its banner on the console the SMP transport shares.
        self._send(f"*** Booting Zephyr OS ({self.name}, {self.mode}) ***\r\n".encode())

    # --- SMP dispatch -----------------------------------------------------------------------

    def _handle_packet(self, packet: bytes) -> bytes | None:
        if len(packet) < SMP_HEADER.size:
            self._frame_dropped("packet shorter than the SMP header")
            return None
        byte0, _flags, length, group, seq, cmd = SMP_HEADER.unpack_from(packet)
        op, version = byte0 & 0x07, (byte0 >> 3) & 0x03
        if length != len(packet) - SMP_HEADER.size:
            self._frame_dropped(f"header length {length} != payload {len(packet) - 8}")
            return None
        if op not in (OP_READ, OP_WRITE):
            self._frame_dropped(f"op {op} is not a request")
            return None
        self.requests.append((group, cmd, op))
        if version > SMP_V2:
            return self._reply(packet, SMP_V2, {"rc": MGMT_ERR_UNSUPPORTED_TOO_NEW})
        try:
            body = cbor2.loads(packet[SMP_HEADER.size :]) if length else {}
        except Exception:
            return self._reply(packet, version, {"rc": MGMT_ERR_EINVAL})
        if not isinstance(body, dict):
            return self._reply(packet, version, {"rc": MGMT_ERR_EINVAL})
        try:
            if self.mode == "recovery":
                answer = self._recovery_dispatch(group, cmd, op, body)
            else:
                answer = self._zephyr_dispatch(group, cmd, op, body)
        except _BadRequest as exc:
            self._event(f"bad request group {group} cmd {cmd}: {exc}")
            answer = {"rc": MGMT_ERR_EINVAL}
        except _Crash as exc:
            self.crashes += 1
            self._begin_reset(f"crash: {exc}", self.reset_delay)
            return None
        if isinstance(answer, _GroupError):
            answer = answer.encode(version)
        if self._reset_after_reply:
            self._reset_after_reply = False
            self._later(self.reset_grace, self._begin_reset, "SMP reset", self.reset_delay)
        return self._reply(packet, version, answer)

    def _reply(self, request: bytes, version: int, body: dict) -> bytes:
        byte0, _flags, _len, group, seq, cmd = SMP_HEADER.unpack_from(request)
        payload = cbor_encode(body, indefinite=self.indefinite_maps)
        op = (byte0 & 0x07) + 1
        header = SMP_HEADER.pack((version << 3) | op, 0, len(payload), group, seq, cmd)
        return header + payload

    # --- Zephyr application -----------------------------------------------------------------

    def _zephyr_dispatch(self, group: int, cmd: int, op: int, body: dict) -> Any:
        if group == GROUP_OS:
            if cmd == OS_ECHO:
                text = _field(body, "d", str)
                if text is None:
                    raise _BadRequest("echo without d")
                return {"r": text}
            if cmd == OS_RESET and op == OP_WRITE:
                return self._smp_reset(body)
            if cmd == OS_PARAMS and op == OP_READ:
                return {"buf_size": self.buf_size, "buf_count": self.buf_count}
            if cmd == OS_BOOTLOADER_INFO and op == OP_READ:
                query = _field(body, "query", str)
                if query is None:
                    return {"bootloader": "MCUboot"}
                if query == "mode":
                    return {"mode": BOOTLOADER_MODE_SWAP_SCRATCH}
                return _GroupError(GROUP_OS, OS_ERR_QUERY_YIELDS_NO_ANSWER)
        elif group == GROUP_IMAGE:
            if cmd == IMG_STATE:
                return self._state_read() if op == OP_READ else self._state_write(body)
            if cmd == IMG_UPLOAD and op == OP_WRITE:
                return self._zephyr_upload(body)
            if cmd == IMG_ERASE and op == OP_WRITE:
                return self._zephyr_erase(body)
        return {"rc": MGMT_ERR_ENOTSUP}

    def _smp_reset(self, body: dict) -> dict:
        _field(body, "force", int)
        boot_mode = _field(body, "boot_mode", int, 0)
        if self.reset_veto == "error":
            self._event("reset refused by the reset hook")
            return {"rc": MGMT_ERR_EBUSY}
        if self.reset_veto == "silent":
            self._event("reset answered but not done")
            return {"rc": 0} if self.mode == "recovery" else {}
        self._boot_to_recovery = boot_mode == 1
        self._event("reset requested" + (" into serial recovery" if boot_mode == 1 else ""))
        self._reset_after_reply = True
        return {"rc": 0} if self.mode == "recovery" else {}

    def _next_boot(self) -> tuple[int, str]:
        """img_mgmt_get_next_boot_slot for swap mode (active slot 0)."""
        if self._swap == SWAP_NONE:
            return 0, "normal"
        return 1, {SWAP_PERM: "normal", SWAP_REVERT: "revert", SWAP_TEST: "test"}[self._swap]

    def _slot_states(self) -> list[SlotState]:
        nbs, kind = self._next_boot()
        flags = {0: {"active"} if kind == "revert" else {"active", "confirmed"}, 1: set()}
        if nbs != 0:
            flags[1] = {"normal": {"pending", "permanent"}, "revert": {"confirmed"},
                        "test": {"pending"}}[kind]
        states = []
        for slot in (0, 1):
            image = _try_parse(bytes(self._flash[slot]))
            if image is None:
                continue
            f = flags[slot]
            states.append(SlotState(
                slot=slot, version=image.version_str, hash=image.tlv_hash,
                bootable=image.bootable, pending="pending" in f, confirmed="confirmed" in f,
                active="active" in f, permanent="permanent" in f, size=image.total_size,
            ))
        return states

    def _state_read(self) -> dict:
        images = []
        for s in self._slot_states():
            entry: dict[str, Any] = {"slot": s.slot, "version": s.version, "hash": s.hash}
            for key in ("bootable", "pending", "confirmed", "active", "permanent"):
                value = getattr(s, key)
                if value or not self.frugal_list:
                    entry[key] = value
            images.append(entry)
        answer: dict[str, Any] = {"images": images}
        if not self.frugal_list:
            answer["splitStatus"] = 0
        return answer

    def _state_write(self, body: dict) -> Any:
        digest = _field(body, "hash", bytes, b"")
        confirm = _field(body, "confirm", bool, False)
        if not digest:
            if not confirm:
                return _GroupError(GROUP_IMAGE, IMG_ERR_INVALID_HASH)
            slot = 0
        elif len(digest) != 32:
            return _GroupError(GROUP_IMAGE, IMG_ERR_INVALID_HASH)
        else:
            found = [s.slot for s in self._slot_states() if s.hash == digest]
            if not found:
                return _GroupError(GROUP_IMAGE, IMG_ERR_HASH_NOT_FOUND)
            slot = found[0]
        rc = self._set_next_boot_slot(slot, confirm)
        if rc:
            return _GroupError(GROUP_IMAGE, rc)
        return self._state_read()

    def _set_next_boot_slot(self, slot: int, confirm: bool) -> int:
        """Zephyr img_mgmt_set_next_boot_slot, swap mode, single image."""
        nbs, kind = self._next_boot()
        if not confirm and slot == 0:
            return IMG_ERR_IMAGE_SETTING_TEST_TO_ACTIVE_DENIED
        if kind == "test":
            return 0 if (not confirm and slot == nbs) else IMG_ERR_IMAGE_ALREADY_PENDING
        if kind == "normal":
            if confirm and slot == nbs:
                return 0
            if (slot == 0 and nbs != 0) or (not confirm and slot != 0 and slot == nbs):
                return IMG_ERR_IMAGE_ALREADY_PENDING
        if kind == "revert":
            if confirm and slot == nbs:
                return 0
            if not confirm:
                return IMG_ERR_IMAGE_ALREADY_PENDING
        if slot == 0:
            self._swap = SWAP_NONE
            self._event("running image confirmed")
        else:
            self._swap = SWAP_PERM if confirm else SWAP_TEST
            self._event(f"slot 1 marked {'permanent' if confirm else 'pending (test)'}")
        return 0

    def _slot_in_use(self, slot: int) -> bool:
        nbs, kind = self._next_boot()
        if slot == nbs and kind in ("revert", "test"):
            return True
        if nbs != 0 and kind == "normal":
            return True
        return slot == 0

    def _zephyr_upload(self, body: dict) -> Any:
        off = _field(body, "off", int)
        data = _field(body, "data", bytes, b"")
        size = _field(body, "len", int)
        sha = _field(body, "sha", bytes, b"")
        upgrade = _field(body, "upgrade", bool, False)
        _field(body, "image", int)
        self.upload_requests += 1
        self.upload_bytes_received += len(data)
        self.upload_chunk_max = max(self.upload_chunk_max, len(data))
        if off is None:
            return self._upload_failed(IMG_ERR_INVALID_OFFSET, "no off")
        if self.restart_every and self.upload_requests % self.restart_every == 0 and self._session is not None:
            self._event(f"upload: session lost at off {self._session.off} (restart_every fault)")
            self._session = None
        if off != 0:
            return self._zephyr_continue(off, data)
        if len(data) < IMAGE_HEADER.size:
            return self._upload_failed(IMG_ERR_INVALID_IMAGE_HEADER, "first chunk < 32 bytes")
        if size is None:
            return self._upload_failed(IMG_ERR_INVALID_LENGTH, "no len in first chunk")
        if struct.unpack_from("<I", data)[0] != IMAGE_MAGIC:
            return self._upload_failed(IMG_ERR_INVALID_IMAGE_HEADER_MAGIC, "bad image magic")
        if len(sha) > 32:
            return self._upload_failed(IMG_ERR_INVALID_HASH, "sha longer than 32 bytes")
        session = self._session
        if sha and session is not None and session.sha == sha:
            self._event(f"upload: same sha, resume at off {session.off}")
            return self._upload_ok(session.off)
        if self._slot_in_use(1):
            return self._upload_failed(IMG_ERR_NO_FREE_SLOT, "slot 1 in use")
        if size > self.slot_size:
            return self._upload_failed(IMG_ERR_INVALID_IMAGE_TOO_LARGE, f"len {size}")
        if upgrade:
            current = _try_parse(bytes(self._flash[0]))
            running = current.version[:3] if current else (0, 0, 0)
            offered = struct.unpack_from("<BBH", data, 20)
            if tuple(offered) <= running:
                return self._upload_failed(IMG_ERR_CURRENT_VERSION_IS_NEWER, "not newer")
        if len(sha) == 32 and hashlib.sha256(bytes(self._flash[1][:size])).digest() == sha \
                and len(self._flash[1]) >= size:
            self._event("upload: slot 1 already holds this file, nothing to do")
            self._session = None
            return self._upload_ok(size, match=True)
        if len(data) > size:
            return self._upload_failed(IMG_ERR_INVALID_IMAGE_DATA_OVERRUN, "chunk > len")
        self._session = _UploadSession(size=size, off=0, sha=bytes(sha))
        self._flash[1] = bytearray()  # erase
        self._event(f"upload: new session len={size} sha={sha.hex()[:16] or '-'}")
        return self._write_chunk(data)

    def _zephyr_continue(self, off: int, data: bytes) -> Any:
        session = self._session
        expected = session.off if session else 0
        if session is None or off != expected:
            self._event(f"upload: off {off} != expected {expected}, data dropped")
            return self._upload_ok(expected)
        if off + len(data) > session.size:
            return self._upload_failed(IMG_ERR_INVALID_IMAGE_DATA_OVERRUN, "data past len")
        return self._write_chunk(data)

    def _write_chunk(self, data: bytes) -> dict:
        session = self._session
        assert session is not None
        if self.crash_at is not None and session.off <= self.crash_at < session.off + len(data):
            raise _Crash(f"writing offset {self.crash_at}")
        self._flash[1] += data
        session.off += len(data)
        self.upload_bytes_written += len(data)
        if session.off < session.size:
            return self._upload_ok(session.off)
        self._session = None
        # CONFIG_IMG_ENABLE_IMAGE_CHECK: Zephyr compares with the stored sha padded with zeros to
        # 32 bytes, so a shortened or missing sha always gets `match: false` (img_mgmt.c)
        match = hashlib.sha256(bytes(self._flash[1])).digest() == session.sha.ljust(32, b"\0")
        self._event(f"upload: complete, {session.size} bytes, match={match}")
        return self._upload_ok(session.size, match=match)

    def _upload_ok(self, off: int, match: bool | None = None) -> dict:
        answer: dict[str, Any] = {"rc": 0} if self.legacy_rc else {}
        session = self._session
        answer["off"] = off + self.lie_ahead if session is not None and off < session.size else off
        if match is not None:
            answer["match"] = match
        return answer

    def _upload_failed(self, code: int, why: str) -> _GroupError:
        self._event(f"upload: rejected ({why}), img_mgmt error {code}")
        self._session = None
        return _GroupError(GROUP_IMAGE, code)

    def _zephyr_erase(self, body: dict) -> Any:
        slot = _field(body, "slot", int, 1)
        if slot not in (0, 1):
            return _GroupError(GROUP_IMAGE, IMG_ERR_INVALID_SLOT)
        if _try_parse(bytes(self._flash[slot])) is not None and self._slot_in_use(slot):
            return _GroupError(GROUP_IMAGE, IMG_ERR_NO_FREE_SLOT)
        self._flash[slot] = bytearray()
        self._session = None
        self._event(f"slot {slot} erased")
        return {"rc": 0} if self.legacy_rc else {}

    # --- MCUboot serial recovery ------------------------------------------------------------

    def _recovery_dispatch(self, group: int, cmd: int, op: int, body: dict) -> Any:
        if group == GROUP_IMAGE:
            if cmd == IMG_STATE and op == OP_READ:
                # bs_list only shows slots whose image validates.
                valid = {n for n in (0, 1) if (i := _try_parse(bytes(self._flash[n]))) and i.hash_ok}
                return {"images": [{"slot": s.slot, "version": s.version, "hash": s.hash}
                                   for s in self._slot_states() if s.slot in valid]}
            if cmd == IMG_UPLOAD:
                return self._recovery_upload(body)
            if cmd == IMG_ERASE:
                slot = _field(body, "slot", int, 0)
                if slot not in (0, 1):
                    return {"rc": MGMT_ERR_EINVAL}
                self._flash[slot] = bytearray()
                self._recovery = _RecoveryUpload()
                self._event(f"recovery: slot {slot} erased")
                return {"rc": 0}
        elif group == GROUP_OS:
            if cmd == OS_ECHO and self.recovery_echo:
                text = _field(body, "d", str)
                return {"r": text} if text is not None else {"rc": MGMT_ERR_EINVAL}
            if cmd == OS_RESET:
                return self._smp_reset(body)
            if cmd == OS_PARAMS:
                return {"buf_size": self.buf_size, "buf_count": self.buf_count}
        return {"rc": MGMT_ERR_ENOTSUP}

    def _recovery_upload(self, body: dict) -> dict:
        off = _field(body, "off", int)
        data = _field(body, "data", bytes)
        size = _field(body, "len", int)
        image = _field(body, "image", int, 0)
        self.upload_requests += 1
        self.upload_bytes_received += len(data or b"")
        self.upload_chunk_max = max(self.upload_chunk_max, len(data or b""))
        state = self._recovery
        if off is None or data is None or image != 0:
            return {"rc": MGMT_ERR_EINVAL}
        if off == 0:
            if size is None or size > self.slot_size:
                return {"rc": MGMT_ERR_EINVAL}
            state.size, state.off = size, 0
            self._flash[0] = bytearray()  # bs_upload erases the whole primary slot
            self._swap = SWAP_NONE
            self._event(f"recovery: upload restarted, len={size}, slot 0 erased")
        elif off != state.off:
            self._event(f"recovery: off {off} != current {state.off}")
            return {"rc": 0, "off": state.off}
        elif state.off + len(data) > state.size:
            return {"rc": MGMT_ERR_EINVAL}
        self._flash[0] += data
        state.off += len(data)
        self.upload_bytes_written += len(data)
        if state.off == state.size:
            self._event(f"recovery: upload complete, {state.size} bytes")
        return {"rc": 0, "off": state.off}

    # --- reset / boot -----------------------------------------------------------------------

    def _begin_reset(self, reason: str, down_for: float) -> None:
        self._generation += 1
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._down = True
        self._session = None
        self._recovery = _RecoveryUpload()
        self._receiver.reset()
        self._event(f"reset ({reason})")
        if down_for <= 0 or self._loop is None:
            self._boot()
        else:
            self._later(down_for, self._boot)

    def _boot(self) -> None:
        self.boot_count += 1
        self._mcuboot()
        if self._boot_to_recovery or (self.mode == "recovery" and self.stay_in_recovery):
            self.mode = "recovery"
        elif _try_parse(bytes(self._flash[0])) is None:
            self.mode = "recovery"  # nothing to boot: MCUboot stays in serial recovery
        else:
            self.mode = "zephyr"
        self._boot_to_recovery = False
        self._down = False
        if self.boot_banner:
            self._banner()
        running = _try_parse(bytes(self._flash[0]))
        version = running.version_str if running else "-"
        self._event(f"booted {self.mode} {version}" + (" (trial)" if not self.confirmed else ""))
        if self.mode != "zephyr" or self.confirmed:
            return
        if self.confirm_policy == "never":
            self._event("trial image crashed before confirming")
            self._begin_reset("crash in trial image", self.reset_delay)
        elif self.confirm_policy == "self":
            if self._loop is None or self.self_confirm_delay <= 0:
                self._app_confirm()
            else:
                self._later(self.self_confirm_delay, self._self_confirm, self._generation)

    def _later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > now]
        self._timers.append(self._loop.call_later(delay, fn, *args))

    def _self_confirm(self, generation: int) -> None:
        if generation == self._generation and not self._down:
            self._app_confirm()

    def _app_confirm(self) -> None:
        if self._swap == SWAP_REVERT:
            self._swap = SWAP_NONE
            self._event("application confirmed itself")

    def _mcuboot(self) -> None:
        if self._swap in (SWAP_TEST, SWAP_PERM):
            candidate = _try_parse(bytes(self._flash[1]))
            if candidate is None or not candidate.hash_ok:
                self._event("mcuboot: slot 1 image invalid, erased, no swap")
                self._flash[1] = bytearray()
                self._swap = SWAP_NONE
                return
            self._flash[0], self._flash[1] = self._flash[1], self._flash[0]
            trial = self._swap == SWAP_TEST
            self._swap = SWAP_REVERT if trial else SWAP_NONE
            self._event(f"mcuboot: swapped to {candidate.version_str}"
                        + (" (test)" if trial else " (permanent)"))
        elif self._swap == SWAP_REVERT:
            self._flash[0], self._flash[1] = self._flash[1], self._flash[0]
            self._swap = SWAP_NONE
            self._event("mcuboot: trial image not confirmed, reverted")


class _GroupError:
    """A group error; v2 requests get `{"err": {...}}`, v1 requests a translated `rc`."""

    def __init__(self, group: int, rc: int) -> None:
        self.group, self.rc = group, rc

    def encode(self, version: int) -> dict:
        if version == SMP_V1:
            if self.group == GROUP_IMAGE:
                return {"rc": _IMG_ERR_TO_V1.get(self.rc, MGMT_ERR_EUNKNOWN)}
            return {"rc": MGMT_ERR_EUNKNOWN}
        return {"err": {"group": self.group, "rc": self.rc}}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# --- CLI ------------------------------------------------------------------------------------


async def _serve_forever(args: argparse.Namespace) -> None:
    device = EmulatedDevice(
        args.name or Path(args.link).name,
        slot0=Path(args.image).read_bytes(),
        slot1=Path(args.slot1).read_bytes() if args.slot1 else b"",
        buf_size=args.buf_size,
        buf_count=args.buf_count,
        mode=args.mode,
        confirm_policy=args.confirm_policy,
        reset_delay=args.reset_delay,
        indefinite_maps=not args.definite_maps,
        response_delay=args.response_delay,
        boot_banner=not args.no_banner,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await device.serve_pty(Path(args.link))
    print(f"READY {args.link} -> {device.tty_name}", flush=True)
    await stop.wait()
    await device.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gatewayd.emulators.smp_device",
        description="Serve an emulated MCUboot/Zephyr SMP device on a pty until killed.",
    )
    parser.add_argument("--link", required=True, help="symlink path to create for the pty")
    parser.add_argument("--image", required=True, help="MCUboot image running in slot 0")
    parser.add_argument("--slot1", help="optional image preloaded in slot 1")
    parser.add_argument("--name")
    parser.add_argument("--mode", choices=MODES, default="zephyr")
    parser.add_argument("--confirm-policy", choices=CONFIRM_POLICIES, default="gateway")
    parser.add_argument("--buf-size", type=int, default=384)
    parser.add_argument("--buf-count", type=int, default=4)
    parser.add_argument("--reset-delay", type=float, default=0.3)
    parser.add_argument("--response-delay", type=float, default=0.0)
    parser.add_argument("--definite-maps", action="store_true",
                        help="answer with definite-length CBOR maps instead of zcbor's bf…ff")
    parser.add_argument("--no-banner", action="store_true", help="no boot banner on the console")
    parser.add_argument("-v", "--verbose", action="store_true", help="log device events")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s")
    asyncio.run(_serve_forever(args))


if __name__ == "__main__":
    main()
