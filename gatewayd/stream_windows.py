"""The GetStream windows of one download in flight: what the next request asks for, and when.

A window is the blocks one request asks for: the first `size` blocks that are neither received
nor already asked for by a window in flight, in ascending order. The service is taken to send
a request's blocks in that order and to answer requests in the order they came, as the
emulator does (aws-iot-ota.md §3 says nothing either way): then a window's blocks arrive as a
growing run from its first block, and once a later window is complete, whatever an earlier
one still misses was lost on the way. If it were not so, nothing breaks: asking ahead comes
later, and a block taken for lost too soon is asked for twice, its copy ignored.

When the next window is asked for depends on the path, as measured by `Pace`: the round trip
(request to its window's first block, the least seen) and the time between blocks while they
flow.

- Near (a LAN, or a round trip shorter than half a window's blocks take): the next window is
  asked for once more than half of the newest has arrived in order, with at most
  MAX_IN_FLIGHT windows in flight. That hides the round trip. Waiting for more than half is
  what keeps a stream that stops or loses blocks in a window's first half to the cost it had
  without asking ahead: no second window goes out, the idle timer asks again for every
  missing block, and a restart fetches that one window again.
- Far (a round trip of at least FAR_RTT and longer than half a window): asking at the half
  leaves the pipe empty for most of a round trip per window (at 300 ms and 512 KiB/s, 128 KiB
  windows took 1.13x the paced ideal even asked at their first block). So the windows are
  counted where they wait, at the service: a window whose last block, at the measured pace,
  reaches us within one round trip has already been sent, and the service holds only the
  windows after it. The next window is asked for as soon as the service holds fewer than
  MAX_IN_FLIGHT of ours when the request reaches it. The service never queues more than two
  windows (each at most 128 KiB), and the link stays full.

Either way a lost request costs one window: once a later window is complete, the blocks an
earlier one misses are asked for again with the next window, and if nothing comes the idle
timer asks for every missing block. The bitmap stays the truth: windows only say which missing
blocks are already asked for, so a block that arrives from an old request, twice, or out of
order is simply received or ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .streams import Bitmap

MAX_IN_FLIGHT = 2
FAR_RTT = 0.05  # s: below it a round trip costs little (and a loaded LAN may look this slow)
GAP_SAMPLE_CAP = 4  # a pause between blocks counts as at most 4x the usual gap (it is a window's end)


@dataclass
class Pace:
    """What a download has measured of its path, on the event loop's clock."""

    rtt: float | None = None  # least time from a request to its window's first block
    gap: float | None = None  # seconds between blocks while they flow (a moving average)
    _last: float | None = None

    def first_block(self, asked_at: float, now: float) -> None:
        sample = now - asked_at
        self.rtt = sample if self.rtt is None else min(self.rtt, sample)

    def block(self, now: float) -> None:
        if self._last is not None:
            sample = now - self._last
            if self.gap is None:
                self.gap = sample
            else:
                self.gap += (min(sample, GAP_SAMPLE_CAP * self.gap) - self.gap) / 8
        self._last = now

    def far(self, window: int) -> bool:
        """Whether the round trip is too long for asking at the half to hide it."""
        return (self.rtt is not None and self.gap is not None and self.rtt >= FAR_RTT
                and self.rtt > window * self.gap / 2)


@dataclass
class Window:
    """One request's blocks, in the order the service sends them."""

    blocks: list[int]
    asked_at: float = 0.0
    arrived: int = 0  # how many of `blocks`, from the first, have arrived without a hole
    started: bool = False  # a block of it has arrived

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
    pace: Pace = field(default_factory=Pace)

    def clear(self) -> None:
        """Forget every window in flight: the next request asks for every missing block."""
        self.flight.clear()

    def may_ask(self, now: float = 0.0) -> bool:
        """Whether the next window should be asked for now."""
        if self.flight:
            if self.pace.far(self.size):
                if not self._link_needs_more(now):
                    return False
            elif len(self.flight) >= MAX_IN_FLIGHT or not self.flight[-1].past_half:
                return False
        return self.bitmap.missing_count > sum(w.pending(self.bitmap) for w in self.flight)

    def _link_needs_more(self, now: float) -> bool:
        """Far mode: a request sent now keeps the link busy (what is asked for runs out within a
        round trip and half a window), and the service holds fewer than MAX_IN_FLIGHT windows
        when it arrives (a window whose last block is due within a round trip is all sent)."""
        assert self.pace.rtt is not None and self.pace.gap is not None
        gap = self.pace.gap
        rtt = self.pace.rtt - gap  # its sample includes the first block's own time on the link
        due, held = 0.0, 0
        for window in self.flight:
            if not window.started:  # its blocks cannot come before a round trip from its request
                due = max(due, window.asked_at + rtt - now)
            due += window.pending(self.bitmap) * gap
            held += due > rtt
        return held < MAX_IN_FLIGHT and due <= rtt + self.size * gap / 2

    def open(self, now: float = 0.0) -> tuple[bytes, int]:
        """Put the next window in flight; its request's `b` (every missing block not in
        flight) and `n` (the window's length: 0 only if every missing block is in flight)."""
        bits = bytearray(self.bitmap.to_request_bytes())
        for window in self.flight:
            for i in window.blocks:
                bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        blocks = _first_set(bits, self.size)
        self.flight.append(Window(blocks, asked_at=now))
        return bytes(bits), len(blocks)

    def block_received(self, index: int | None = None, now: float = 0.0) -> bool:
        """A new block (`index`) was received at `now`: True if it completed a window. A completed
        window leaves the flight, and so does every older one: what those still miss was lost."""
        self.pace.block(now)
        for window in self.flight:
            window.catch_up(self.bitmap)
            if not window.started and (window.arrived or (index is not None and index in window.blocks)):
                window.started = True
                self.pace.first_block(window.asked_at, now)
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
