"""The link a device is reached over: SMP packets out, SMP packets back.

A link only moves packets; which answer belongs to which request (the sequence number) is
the SMP client's business (`transports.smp.SmpClient`). A device's link is described by
its settings (`UartSettings`, `BleSettings`), from which `transports.factory` builds it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Protocol

INBOX_PACKETS = 16  # received packets kept for the client; older ones are dropped
DEFAULT_CONNECT_TIMEOUT = 20.0  # seconds for a BLE connection with service discovery


@dataclass(frozen=True)
class UartSettings:
    port: str  # a device path or a pyserial URL (socket://, rfc2217://)
    baudrate: int = 115200
    line_delay: float = 0.0  # pause after each console line, for small receive buffers


@dataclass(frozen=True)
class BleSettings:
    address: str | None  # None: found by scanning for advertised_name
    adapter: str = "hci0"
    # whether the device reassembles a request from several writes
    # (CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY); None: unknown, so every request fits one write
    reassembly: bool | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    mtu: int | None = None  # the ATT MTU to write with; None: as negotiated
    passkey: int | None = None  # what the device displays when pairing; None: Just Works
    advertised_name: str | None = None


LinkSettings = UartSettings | BleSettings


class LinkError(Exception):
    """The link cannot be opened, dropped, or the device is not answering.

    The message names the port, e.g. "cannot open /dev/ttyACM0: [Errno 2] ...".
    """


class LinkTimeout(LinkError):
    """The device did not answer a request in time."""


class Link(Protocol):
    """A transport to one device.

    `send` opens the link first if it is closed, so a caller can simply retry after a
    LinkError. `receive(timeout)` returns the next packet the device sent; it raises
    TimeoutError when none arrives within `timeout` seconds, and LinkError when the link
    drops (or is closed) with nothing left to read.

    `max_packet` is the largest SMP packet (header + CBOR) the link itself can carry, or None
    if only the device's buffer limits it. `framing_overhead` is how many bytes of the
    device's reassembly buffer (`buf_size`) the link's framing uses besides the packet: 4 for
    the serial console framing (length and CRC), 0 for BLE and UDP.

    `present()` says whether the device can be tried now (a serial port whose path does not
    exist cannot); True when the link cannot tell. `release_when_idle` says whether the
    link should be closed between transfers: a BLE connection holds one of the adapter's few
    connection slots, an open serial port holds nothing anyone else needs. `pipelining` says
    whether several requests may be sent before the first answer (the link delivers every
    answer whole, in order: BLE notifications; not a console shared with log output).
    """

    @property
    def name(self) -> str: ...

    @property
    def max_packet(self) -> int | None: ...

    @property
    def framing_overhead(self) -> int: ...

    @property
    def release_when_idle(self) -> bool: ...

    @property
    def pipelining(self) -> bool: ...

    def present(self) -> bool: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, packet: bytes) -> None: ...

    async def receive(self, timeout: float) -> bytes: ...


class Inbox:
    """Packets a link received, waiting for its reader; at most `limit`, the oldest dropped.

    `fail(error)` ends the current connection: the reader gets the packets still here, then
    `error`. `reset()` starts a new connection with nothing in it.
    """

    def __init__(self, limit: int = INBOX_PACKETS) -> None:
        self._packets: deque[bytes] = deque(maxlen=limit)
        self._error: LinkError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.dropped = 0

    def reset(self) -> None:
        self._packets.clear()
        self._error = None

    def put(self, packet: bytes) -> None:
        if len(self._packets) == self._packets.maxlen:
            self.dropped += 1
        self._packets.append(packet)
        self._wake()

    def fail(self, error: LinkError) -> None:
        self._error = error
        self._wake()

    async def get(self, timeout: float) -> bytes:
        """The oldest packet; TimeoutError if none arrives within `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not self._packets:
                if self._error is not None:
                    raise self._error
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        return self._packets.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
