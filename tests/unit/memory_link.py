"""A Link to an EmulatedDevice on the same event loop: SMP packets in memory, no pty, no framing.

The device side is the emulator's own (`EmulatedDevice.serve_memory`), so resets, lost
requests while it reboots, its netbuf limit and every image rule behave as on a pty; only
the bytes skip the console framing. Faults a test wants from the link itself: `drop()`
ends the connection, `intercept(packet)` may answer a request instead of the device (to play
a device that lies), `max_packet` limits what one request may carry.
"""

from __future__ import annotations

from collections.abc import Callable

from gatewayd.emulators.smp_device import EmulatedDevice
from transports.link import Inbox, LinkError


class MemoryLink:
    framing_overhead = 0

    def __init__(self, device: EmulatedDevice, *, max_packet: int | None = None,
                 release_when_idle: bool = False, pipelining: bool = False) -> None:
        self.device = device
        self.name = f"memory:{device.name}"
        self.max_packet = max_packet
        self.release_when_idle = release_when_idle
        self.pipelining = pipelining
        self.intercept: Callable[[bytes], bytes | None] | None = None
        self.is_open = False
        self.opens = 0
        self.sent: list[bytes] = []
        self._request: Callable[[bytes], None] | None = None
        self._inbox = Inbox()
        self._inbox.fail(LinkError(f"{self.name}: link not open"))

    def present(self) -> bool:
        return not self.device.absent

    async def open(self) -> None:
        if self.is_open:
            return
        if self.device.absent:
            raise LinkError(f"cannot open {self.name}: [Errno 2] No such file or directory")
        if self._request is None:
            self._request = await self.device.serve_memory(self._deliver)
        self._inbox.reset()
        self.is_open = True
        self.opens += 1

    async def close(self) -> None:
        self.is_open = False
        self._inbox.fail(LinkError(f"{self.name}: link closed"))

    def drop(self, reason: str = "cable pulled") -> None:
        self.is_open = False
        self._inbox.fail(LinkError(f"{self.name}: link dropped: {reason}"))

    async def send(self, packet: bytes) -> None:
        await self.open()
        self.sent.append(packet)
        answer = self.intercept(packet) if self.intercept else None
        if answer is not None:
            self._inbox.put(answer)
        elif self._request is not None:
            self._request(packet)

    async def receive(self, timeout: float) -> bytes:
        return await self._inbox.get(timeout)

    def _deliver(self, packet: bytes) -> None:
        if self.is_open:
            self._inbox.put(packet)
