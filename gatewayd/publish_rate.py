"""A token bucket for the publishes the gateway makes on its one MQTT connection.

AWS IoT Core takes at most 100 publish requests per second per connection, inbound and outbound,
and discards those over the quota (General Reference, AWS IoT Core message broker quotas; the
emulators keep the figure in `gatewayd/emulators/pacing.py`). A gateway serving hundreds of
devices and proxied things could go past it: status updates of 200 executions, `$next/get` for
every thing after a reconnect, the inventory's shadow updates. `PublishRate` grants `rate`
publishes per second with at most `burst` at once, to its callers in the order they asked;
nothing is ever dropped, a caller only waits. With the defaults (80/s, a burst of 10) no
one-second window holds more than 90 of the gateway's publishes.

The daemon makes one for its connection and hands it to every publisher on it: the Jobs
client (`cloud.py`: updates, `$next/get`, describes, their retries), the Reporter, the shadow
client, and the stream download through `PacedClient` (its GetStream and DescribeStream
requests).

Callers that hold state that may change while they wait take their turn first and decide what
to send afterwards (the Reporter does: the newest progress of an execution goes out, not the one
that was current when it started waiting).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Callable

DEFAULT_RATE = 80.0  # publishes per second, below AWS IoT Core's 100 per connection
DEFAULT_BURST = 10.0
_EPSILON = 1e-9  # a turn due "now" by the clock is not missed by a rounding error


class PublishRate:
    """Grants publishes at `rate` per second with at most `burst` at once, first come first served."""

    def __init__(self, rate: float = DEFAULT_RATE, burst: float = DEFAULT_BURST, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.granted = 0  # publishes granted so far
        self.delayed = 0  # of which had to wait for their turn

    @property
    def waiting(self) -> int:
        """Callers waiting for their turn now."""
        return sum(1 for f in self._waiters if not f.done())

    def _refill(self) -> None:
        now = self._clock()
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self) -> bool:
        """Take a turn now if one is free and nobody waits before us."""
        if self.waiting:
            return False
        self._refill()
        if self._tokens < 1 - _EPSILON:
            return False
        self._tokens = max(0.0, self._tokens - 1)
        self.granted += 1
        return True

    async def acquire(self) -> None:
        """Wait for a turn to publish (a cancelled wait takes none)."""
        if self.try_acquire():
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiters.append(turn)
        self._schedule(loop)
        self.delayed += 1
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted, but the caller went away: give it back
                self._tokens = min(self.burst, self._tokens + 1)
                self.granted -= 1
                self._grant()
            raise

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None or not self._waiters:
            return
        self._refill()
        delay = max(0.0, (1 - self._tokens) / self.rate)
        self._timer = loop.call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._grant()

    def _grant(self) -> None:
        self._refill()
        while self._waiters and self._tokens >= 1 - _EPSILON:
            turn = self._waiters.popleft()
            if turn.done():  # its caller was cancelled
                continue
            self._tokens = max(0.0, self._tokens - 1)
            self.granted += 1
            turn.set_result(None)
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
        if self._waiters and self._timer is None:
            self._schedule(asyncio.get_running_loop())


class PacedClient:
    """The MQTT client as seen by code that publishes on it directly (the stream download): its
    `publish` waits for a turn in `rate` first; everything else is the client's own."""

    def __init__(self, mqtt: Any, rate: PublishRate) -> None:
        self._mqtt = mqtt
        self._rate = rate

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        await self._rate.acquire()
        return await self._mqtt.publish(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mqtt, name)
