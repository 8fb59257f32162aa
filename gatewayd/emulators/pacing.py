"""Rate limits for the emulators: a departure schedule per rate, and the AWS IoT emulator's pacer.

`RateSchedule` is a generic cell-rate algorithm: given when a unit of work (a message, a chunk
of bytes) is ready and what it costs, it says when it may leave so that the long-run rate never
exceeds `rate` and at most `burst` cost goes out ahead of that rate. With `burst` 0 it is a
link of that rate: each item leaves when its last byte would have been serialised, so N bytes
take at least N / rate. The WAN proxy (wan.py) uses it for its bandwidth cap.

`Pacer` holds the AWS IoT emulator's outgoing stream data messages and publishes each at the
time its connection's schedules allow, from one thread, in order per connection.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class RateSchedule:
    """When work may leave under `rate` units/s with a `burst` allowance (GCRA, virtual clock)."""

    rate: float
    burst: float = 0.0
    _tat: float = field(default=float("-inf"), init=False)  # theoretical arrival time of the next unit

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 0:
            raise ValueError("rate must be positive and burst not negative")

    def depart(self, ready: float, cost: float) -> float:
        """Book `cost` units that are ready at `ready`; the time they may leave (>= ready).
        Calls must come in the order the work leaves (non-decreasing `ready`)."""
        self._tat = max(self._tat, ready) + cost / self.rate
        return max(ready, self._tat - self.burst / self.rate)


@dataclass(frozen=True)
class StreamPacing:
    """Per-connection limits on the stream data messages the AWS IoT emulator sends.

    AWS IoT Core's message broker quotas (the AWS IoT Developer Guide's "AWS IoT Limits",
    awsdocs/aws-iot-docs developerguide/limits-iot.md, and the General Reference page
    https://docs.aws.amazon.com/general/latest/gr/iot-core.html#message-broker-limits):
    "Throughput per second per connection: 512 KiB ... Data that exceeds the maximum throughput
    is delayed in processing", and "Publish requests per second per connection: 100 ... inbound
    and outbound ... Publish requests that exceed that quota are discarded". The emulator
    delays for both (pacing); to model publishes discarded over the quota, add `drop_blocks`.
    Bytes are counted as the MQTT PUBLISH packet that carries the block (fixed header, topic,
    packet id, payload), since AWS counts the data on the connection.
    """

    bytes_per_second: float | None = 512 * 1024
    messages_per_second: float | None = None
    burst_bytes: float = 0.0  # 0: a block leaves when a link of this rate has carried all of it
    burst_messages: float = 1.0  # 1: a message leaves at the start of its slot, not at its end

    def schedules(self) -> list[tuple[RateSchedule, bool]]:
        """Fresh schedules for one connection: (schedule, counts bytes rather than messages)."""
        out = []
        if self.bytes_per_second:
            out.append((RateSchedule(self.bytes_per_second, self.burst_bytes), True))
        if self.messages_per_second:
            out.append((RateSchedule(self.messages_per_second, self.burst_messages), False))
        return out


AWS_IOT_CORE_QUOTAS = StreamPacing(bytes_per_second=512 * 1024, messages_per_second=100)


def publish_packet_size(topic: str, payload_length: int, qos: int) -> int:
    """Bytes of an MQTT 3.1.1 PUBLISH packet: fixed header, topic, packet id (QoS > 0), payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_length
    length_bytes = 1 + (remaining >= 128) + (remaining >= 16384) + (remaining >= 2097152)
    return 1 + length_bytes + remaining


Send = Callable[[], None]


class Pacer:
    """Sends queued work when its connection's schedules allow; one daemon thread for all."""

    def __init__(self, pacing: StreamPacing, clock: Callable[[], float] = time.monotonic) -> None:
        self.pacing = pacing
        self._clock = clock
        self._schedules: dict[str, list[tuple[RateSchedule, bool]]] = {}
        self._last: dict[str, float] = {}  # per connection: departure of its last queued item
        self._heap: list[tuple[float, int, Send]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="aws-iot-pacer", daemon=True)
        self._thread.start()

    def submit(self, connection: str, cost_bytes: int, send: Send) -> None:
        """Queue `send` for `connection`, which may take `cost_bytes` of its byte rate."""
        with self._cond:
            now = self._clock()
            ready = max(now, self._last.get(connection, now))
            schedules = self._schedules.setdefault(connection, self.pacing.schedules())
            for schedule, in_bytes in schedules:
                ready = schedule.depart(ready, cost_bytes if in_bytes else 1)
            self._last[connection] = ready
            heapq.heappush(self._heap, (ready, next(self._seq), send))
            self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return len(self._heap)

    def stop(self) -> None:
        """Stop the thread; what is still queued is not sent."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > self._clock()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - self._clock())
                if self._stopped:
                    return
                _, _, send = heapq.heappop(self._heap)
            send()  # outside the lock: publishing may block on paho's socket
            self.sent += 1
