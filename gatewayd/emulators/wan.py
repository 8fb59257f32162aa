"""A WAN between the gateway and the broker: a TCP proxy that adds latency, caps bandwidth, cuts.

Gateways sit on cellular and satellite links with round trips of 100-700 ms. The proxy listens
on a local port and forwards each connection to the broker's port, byte for byte (TLS passes
through untouched). Each direction delays every chunk by `latency` from the moment it was read
(so RTT = 2 x latency), keeps the order, and with a bandwidth cap releases a chunk only once a
link of that rate would have carried it. A direction holds at most `queue_limit` bytes and stops
reading above that, so TCP's own flow control pushes back on the sender; like a receive window
this bounds a direction's throughput to queue_limit / latency.

    with EmulatorThread() as runner:
        wan = WanProxy(broker.host, broker.port, WanLink(latency=0.15))
        runner.call(wan.start())
        ...  # connect to 127.0.0.1:wan.port instead of the broker
        runner.call(wan.cut)       # every connection reset now
        runner.call(wan.stop())

Cuts: `cut()` resets every current connection (both ends see a connection reset); with
`reset=False` the connections go silent instead, as on a dead radio link: nothing passes either
way and each end finds out only through its own timeouts (MQTT keepalive). `WanLink.cut_every`
cuts every connection at random intervals of that mean (uniform in [0.5, 1.5] x cut_every).
Not modelled: the TCP handshake's own round trip, packet loss and retransmission.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import struct
from dataclasses import dataclass, field

from .pacing import RateSchedule

READ_SIZE = 64 * 1024
SLICE_SECONDS = 0.005  # with a bandwidth cap, read at most this long's worth of bytes at a time


@dataclass(frozen=True)
class WanLink:
    latency: float = 0.0  # one way, seconds
    up_rate: float | None = None  # bytes/s towards the broker; None: no cap
    down_rate: float | None = None  # bytes/s towards the gateway
    queue_limit: int = 1024 * 1024  # bytes held per direction before the proxy stops reading
    cut_every: float | None = None  # mean seconds between random cuts of every connection
    cut_reset: bool = True  # random cuts reset the connections (False: they go silent)
    seed: int | None = None  # of the random cut intervals

    def __post_init__(self) -> None:
        if self.latency < 0 or self.queue_limit < 1 or (self.cut_every is not None and self.cut_every <= 0):
            raise ValueError("latency must not be negative, queue_limit and cut_every must be positive")


@dataclass
class WanStats:
    connections: int = 0  # accepted, in all
    active: int = 0
    cuts: int = 0  # connections cut
    bytes_up: int = 0  # delivered to the broker
    bytes_down: int = 0  # delivered to the gateway
    queued_peak: int = 0  # the most bytes one direction of one connection held


@dataclass
class _Direction:
    """One way of one connection: read, hold each chunk until it is due, write."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    up: bool
    queue: collections.deque[tuple[float, bytes | None]] = field(default_factory=collections.deque)
    queued: int = 0
    rate: RateSchedule | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    space: asyncio.Event = field(default_factory=asyncio.Event)


class _Connection:
    def __init__(self, proxy: WanProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        link = proxy.link
        self.up = _Direction(client[0], server[1], True,
                             rate=RateSchedule(link.up_rate) if link.up_rate else None)
        self.down = _Direction(server[0], client[1], False,
                               rate=RateSchedule(link.down_rate) if link.down_rate else None)
        self.silent = False
        self.cut_off = False
        self._senders: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        self._senders = [asyncio.ensure_future(self._send(d)) for d in (self.up, self.down)]
        receivers = [asyncio.ensure_future(self._receive(d)) for d in (self.up, self.down)]
        try:
            await asyncio.gather(*receivers, *self._senders, return_exceptions=True)
        finally:
            for task in (*receivers, *self._senders):
                task.cancel()
            for d in (self.up, self.down):
                d.writer.transport.abort()

    async def _receive(self, d: _Direction) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while d.queued >= self.proxy.link.queue_limit and not self.cut_off:
                d.space.clear()
                await d.space.wait()
            try:
                data = await d.reader.read(self._read_size(d))
            except (ConnectionError, OSError):
                self.cut(reset=True)  # an end that resets is passed on as a reset
                return
            if self.silent:
                if not data:
                    (self.down if d.up else self.up).writer.transport.abort()  # the end we read from
                    return
                continue
            now = loop.time()
            due = (d.rate.depart(now, len(data)) if d.rate and data else now) + self.proxy.link.latency
            d.queue.append((due, data or None))
            d.queued += len(data)
            self.proxy.stats.queued_peak = max(self.proxy.stats.queued_peak, d.queued)
            d.arrived.set()
            if not data:
                return

    def _read_size(self, d: _Direction) -> int:
        rate = self.proxy.link.up_rate if d.up else self.proxy.link.down_rate
        size = READ_SIZE if rate is None else max(512, min(READ_SIZE, int(rate * SLICE_SECONDS)))
        return max(1, min(size, self.proxy.link.queue_limit - d.queued))  # 1: a cut connection reads its end

    async def _send(self, d: _Direction) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not d.queue:
                d.arrived.clear()
                await d.arrived.wait()
            delay = d.queue[0][0] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            chunks, eof = _take_due(d.queue, loop.time())
            if chunks:
                sent = sum(map(len, chunks))
                d.writer.write(b"".join(chunks))
                if d.up:
                    self.proxy.stats.bytes_up += sent
                else:
                    self.proxy.stats.bytes_down += sent
                try:
                    await d.writer.drain()
                except (ConnectionError, OSError):
                    self.cut(reset=True)
                    return
                d.queued -= sent
                d.space.set()
            if eof:
                if d.writer.can_write_eof():
                    d.writer.write_eof()
                return

    def cut(self, reset: bool) -> None:
        self.cut_off = True
        if reset:
            for d in (self.up, self.down):
                _reset(d.writer)
        else:
            self.silent = True
            for task in self._senders:
                task.cancel()
            for d in (self.up, self.down):
                d.queue.clear()
                d.queued = 0
        for d in (self.up, self.down):
            d.space.set()  # a receiver held by backpressure reads on and finds the end


def _take_due(queue: collections.deque[tuple[float, bytes | None]], now: float) -> tuple[list[bytes], bool]:
    """Pop every chunk due by `now`, in order; True if the end of the stream came with them."""
    chunks: list[bytes] = []
    while queue and queue[0][0] <= now:
        data = queue.popleft()[1]
        if data is None:
            return chunks, True
        chunks.append(data)
    return chunks, False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: the peer sees 'connection reset'."""
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class WanProxy:
    """Listens on `host:port` (0: a free port) and forwards every connection to the upstream."""

    def __init__(self, upstream_host: str, upstream_port: int, link: WanLink | None = None, *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.link = link or WanLink()
        self.host, self._port = host, port
        self.stats = WanStats()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cutter: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("WanProxy is not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> WanProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self._port)
        self.set_link(self.link)
        return self

    async def stop(self) -> None:
        if self._cutter is not None:
            self._cutter.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for connection in list(self._connections):
            connection.cut(reset=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        for task in list(self._tasks):
            task.cancel()

    def set_link(self, link: WanLink) -> None:
        """New settings: latency, rates and the queue limit apply to the next chunk read, rate
        caps to the next connection, random cuts from now. Call it on the proxy's loop."""
        self.link = link
        if self._cutter is not None:
            self._cutter.cancel()
            self._cutter = None
        if link.cut_every is not None:
            self._cutter = asyncio.ensure_future(self._cut_at_random(link))

    def cut(self, reset: bool = True) -> int:
        """Cut every current connection (see the module's doc); how many. Call it on the proxy's loop."""
        cut = [c for c in self._connections if not c.cut_off]
        for connection in cut:
            connection.cut(reset)
        self.stats.cuts += len(cut)
        return len(cut)

    async def _cut_at_random(self, link: WanLink) -> None:
        rng = random.Random(link.seed)
        while True:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * (link.cut_every or 0))
            self.cut(link.cut_reset)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            server = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        connection = _Connection(self, (reader, writer), server)
        self._connections.add(connection)
        self.stats.active += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await connection.run()
        except asyncio.CancelledError:
            pass  # asyncio's server logs a handler that ends cancelled as an error
        finally:
            self._connections.discard(connection)
            self._tasks.discard(task)
            self.stats.active -= 1
