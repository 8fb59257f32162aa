"""The GetStream windows of one download in flight: what the next request asks for, and when.

A window is the blocks one request asks for: the first `size` blocks that are neither received
nor already asked for by a window in flight, in ascending order. The service is taken to send
a request's blocks in that order and to answer requests in the order they came, as the
emulator does (aws-iot-ota.md §3 says nothing either way): then a window's blocks arrive as a
growing run from its first block, and once a later window is complete, whatever an earlier
one still misses was lost on the way. If it were not so, nothing breaks: asking ahead comes
later, and a block taken for lost too soon is asked for twice, its copy ignored.

At most MAX_IN_FLIGHT windows are in flight. The next one is asked for once more than half of
the newest window has arrived in that order. That hides a round trip as long as the window's
second half takes to arrive (at 512 KiB/s and 128 KiB windows, 125 ms), and part of a longer
one: at 300 ms a 1 MiB download takes about 3.7 s where stop-and-wait took 4.6 s (asking at a
window's first block would take 2.8 s). Waiting for more than half is what keeps a stream that
stops or loses blocks in a window's first half to the cost it had without asking ahead: no
second window goes out, the idle timer asks again for every missing block, and a restart
fetches that one window again. Past the half, a loss costs no wait: once a later window is
complete, the blocks an earlier one misses are asked for again with the next window.

The bitmap stays the truth: windows only say which missing blocks are already asked for, so a
block that arrives from an old request, twice, or out of order is simply received or ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .streams import Bitmap

MAX_IN_FLIGHT = 2


@dataclass
class Window:
    """One request's blocks, in the order the service sends them."""

    blocks: list[int]
    arrived: int = 0  # how many of `blocks`, from the first, have arrived without a hole

    def catch_up(self, bitmap: Bitmap) -> None:
        while self.arrived < len(self.blocks) and bitmap.is_received(self.blocks[self.arrived]):
            self.arrived += 1

    @property
    def complete(self) -> bool:
        return self.arrived == len(self.blocks)

    @property
    def past_half(self) -> bool:
        return 2 * self.arrived > len(self.blocks)

    def pending(self, bitmap: Bitmap) -> int:
        """Blocks of this window not received yet."""
        return sum(1 for i in self.blocks[self.arrived:] if not bitmap.is_received(i))


@dataclass
class Windows:
    """The windows in flight over a download's bitmap, oldest first."""

    bitmap: Bitmap
    size: int  # blocks per request
    flight: list[Window] = field(default_factory=list)

    def clear(self) -> None:
        """Forget every window in flight: the next request asks for every missing block."""
        self.flight.clear()

    def may_ask(self) -> bool:
        """Whether the next window should be asked for now."""
        if self.flight and (len(self.flight) >= MAX_IN_FLIGHT or not self.flight[-1].past_half):
            return False
        return self.bitmap.missing_count > sum(w.pending(self.bitmap) for w in self.flight)

    def open(self) -> tuple[bytes, int]:
        """Put the next window in flight; its request's `b` (every missing block not in
        flight) and `n` (the window's length: 0 only if every missing block is in flight)."""
        bits = bytearray(self.bitmap.to_request_bytes())
        for window in self.flight:
            for i in window.blocks:
                bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        blocks = _first_set(bits, self.size)
        self.flight.append(Window(blocks))
        return bytes(bits), len(blocks)

    def block_received(self) -> bool:
        """A new block was received: True if it completed a window. A completed window leaves
        the flight, and so does every older one: what those still miss was lost."""
        for window in self.flight:
            window.catch_up(self.bitmap)
        done = [n for n, window in enumerate(self.flight) if window.complete]
        if not done:
            return False
        del self.flight[: done[-1] + 1]
        return True


def _first_set(bits: bytes | bytearray, limit: int) -> list[int]:
    """Indexes of the first `limit` set bits, LSB-first in each byte."""
    found: list[int] = []
    for at, byte in enumerate(bits):
        while byte and len(found) < limit:
            low = byte & -byte
            found.append(at * 8 + low.bit_length() - 1)
            byte ^= low
        if len(found) >= limit:
            break
    return found
