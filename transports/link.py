"""The link a device is reached over: one SMP packet out, the matching response back."""

from __future__ import annotations

from typing import Protocol


class LinkError(Exception):
    """The link cannot be opened, dropped, or the device is not answering.

    The message names the port, e.g. "cannot open /dev/ttyACM0: [Errno 2] ...".
    """


class LinkTimeout(LinkError):
    """The device did not answer a request in time."""


class Link(Protocol):
    """A transport to one device.

    `transact` opens the link first if it is closed, so a caller can simply retry after a
    LinkError. `max_packet` is the largest SMP packet (header + CBOR) the link itself can
    carry, or None if only the device's buffer limits it. `framing_overhead` is how many
    bytes of the device's reassembly buffer (`buf_size`) the link's framing uses besides the
    packet: 4 for the serial console framing (length and CRC), 0 for BLE and UDP.
    """

    name: str
    max_packet: int | None
    framing_overhead: int

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def transact(self, packet: bytes, timeout: float) -> bytes:
        """Send one SMP request and return the response packet with the same sequence number."""
        ...
