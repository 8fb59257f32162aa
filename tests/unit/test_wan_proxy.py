"""The WAN proxy (gatewayd/emulators/wan.py) on loopback: the latency it adds, order, the
bandwidth cap, backpressure, cuts; and the rate schedule and pacer it shares with the AWS IoT
emulator (pacing.py)."""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
import time
from collections.abc import Iterator

import pytest

from gatewayd.emulators.pacing import Pacer, RateSchedule, StreamPacing, publish_packet_size
from gatewayd.emulators.runner import EmulatorThread
from gatewayd.emulators.wan import WanLink, WanProxy


class Upstream:
    """A TCP server on the emulator loop: echoes, or (`read=False`) accepts and reads nothing."""

    def __init__(self, runner: EmulatorThread, read: bool = True) -> None:
        self._reading = read
        self.received = 0
        self._resume: asyncio.Event | None = None
        self.server = runner.call(self._start())
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        self._resume = asyncio.Event()
        if self._reading:
            self._resume.set()
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def resume(self, runner: EmulatorThread) -> None:
        assert self._resume is not None
        runner.call(self._resume.set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._resume is not None
        await self._resume.wait()
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                if self._reading:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        writer.close()


@pytest.fixture
def runner() -> Iterator[EmulatorThread]:
    with EmulatorThread("wan-test") as r:
        yield r


def proxy(runner: EmulatorThread, upstream: Upstream, link: WanLink) -> WanProxy:
    wan = WanProxy("127.0.0.1", upstream.port, link)
    runner.call(wan.start())
    return wan


def connect(wan: WanProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", wan.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"{len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def round_trips(sock: socket.socket, count: int, size: int = 16) -> list[float]:
    times = []
    for i in range(count):
        payload = bytes([i % 256]) * size
        start = time.perf_counter()
        sock.sendall(payload)
        assert recv_exactly(sock, size) == payload
        times.append(time.perf_counter() - start)
    return times


def test_the_round_trip_is_twice_the_latency(runner):
    wan = proxy(runner, Upstream(runner), WanLink(latency=0.05))
    with connect(wan) as sock:
        rtts = round_trips(sock, 12)
    assert min(rtts) >= 0.0995, rtts
    assert statistics.median(rtts) <= 0.100 + 0.005, rtts
    assert sorted(rtts)[-3] <= 0.100 + 0.030, rtts  # a loaded machine may stall one or two, not more
    runner.call(wan.stop())


def test_no_latency_adds_almost_nothing(runner):
    wan = proxy(runner, Upstream(runner), WanLink())
    with connect(wan) as sock:
        rtts = round_trips(sock, 20)
    assert statistics.median(rtts) < 0.003, rtts
    runner.call(wan.stop())


@pytest.mark.parametrize("link", [WanLink(latency=0.01), WanLink(latency=0.002, up_rate=2e6, down_rate=1e6)],
                         ids=["latency", "latency+caps"])
def test_many_small_writes_arrive_in_order(runner, link):
    wan = proxy(runner, Upstream(runner), link)
    sent = b"".join(struct.pack(">I", i)[: 1 + i % 4] for i in range(20000))
    with connect(wan) as sock:
        for i in range(0, len(sent), 7):
            sock.sendall(sent[i : i + 7])
        assert recv_exactly(sock, len(sent)) == sent
    stats = runner.call(lambda: wan.stats)  # on the loop: after its current step has counted
    assert stats.bytes_up == stats.bytes_down == len(sent) and stats.connections == 1
    runner.call(wan.stop())


def test_the_bandwidth_cap_holds_each_way(runner):
    size, rate = 128 * 1024, 256 * 1024
    wan = proxy(runner, Upstream(runner), WanLink(down_rate=rate))
    with connect(wan) as sock:
        start = time.perf_counter()
        sock.sendall(bytes(size))
        recv_exactly(sock, size)
        elapsed = time.perf_counter() - start
    assert size / rate <= elapsed <= size / rate + 0.15, elapsed
    runner.call(wan.stop())


def test_a_reader_that_stops_is_pushed_back_to_the_sender(runner):
    upstream = Upstream(runner, read=False)
    limit = 64 * 1024
    wan = proxy(runner, upstream, WanLink(latency=0.001, queue_limit=limit))
    attempt = 64 * 1024 * 1024
    with connect(wan, timeout=1.0) as sock:
        sent = 0
        chunk = bytes(256 * 1024)
        try:
            while sent < attempt:
                sent += sock.send(chunk)
        except TimeoutError:
            pass
        assert sent < attempt  # the sender was blocked: nothing buffers without bound
        assert wan.stats.queued_peak <= limit
        upstream.resume(runner)
        deadline = time.monotonic() + 10
        while upstream.received < sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert upstream.received == sent
    runner.call(wan.stop())


def test_a_cut_resets_every_connection_and_new_ones_work(runner):
    wan = proxy(runner, Upstream(runner), WanLink(latency=0.005))
    with connect(wan) as first, connect(wan) as second:
        round_trips(first, 1)
        round_trips(second, 1)
        assert runner.call(wan.cut) == 2
        for sock in (first, second):
            with pytest.raises((ConnectionResetError, EOFError)):
                sock.sendall(b"x")
                recv_exactly(sock, 1)
    with connect(wan) as third:
        round_trips(third, 2)
    assert (wan.stats.cuts, wan.stats.connections) == (2, 3)
    runner.call(wan.stop())


def test_a_reset_at_one_end_reaches_the_other_as_a_reset(runner):
    async def reset_on_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                             struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = runner.call(asyncio.start_server(reset_on_data, "127.0.0.1", 0))
    wan = WanProxy("127.0.0.1", server.sockets[0].getsockname()[1], WanLink(latency=0.005))
    runner.call(wan.start())
    with connect(wan) as sock:
        sock.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    runner.call(wan.stop())
    runner.call(server.close)


def test_a_silent_cut_passes_nothing_and_each_end_learns_by_itself(runner):
    upstream = Upstream(runner)
    wan = proxy(runner, upstream, WanLink(latency=0.005))
    with connect(wan, timeout=0.3) as sock:
        round_trips(sock, 1)
        assert runner.call(lambda: wan.cut(reset=False)) == 1
        before = upstream.received
        sock.sendall(b"lost")
        with pytest.raises(TimeoutError):
            sock.recv(4)
        assert upstream.received == before
    time.sleep(0.05)
    assert runner.call(lambda: wan.stats.active) == 1  # the gateway hung up; the broker's end does not know
    runner.call(wan.stop())
    assert runner.call(lambda: wan.stats.active) == 0


def test_random_cuts_come_about_every_cut_every_seconds(runner):
    wan = proxy(runner, Upstream(runner), WanLink(cut_every=0.1, seed=7))
    resets = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        with connect(wan) as sock:
            try:
                while True:
                    round_trips(sock, 1)
            except (ConnectionResetError, EOFError):
                resets += 1
    assert 4 <= resets <= 20 and wan.stats.cuts >= resets
    runner.call(wan.stop())


def test_rate_schedule_is_a_link_of_that_rate():
    link = RateSchedule(rate=1000)
    assert [link.depart(0.0, 100) for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert link.depart(5.0, 100) == pytest.approx(5.1)  # idle time is not saved up
    burst = RateSchedule(rate=10, burst=2)
    assert [burst.depart(0.0, 1) for _ in range(4)] == pytest.approx([0.0, 0.0, 0.1, 0.2])


def test_the_packet_size_counts_the_mqtt_headers():
    assert publish_packet_size("a/b", 10, 0) == 1 + 1 + 2 + 3 + 10
    assert publish_packet_size("a/b", 200, 1) == 1 + 2 + 2 + 3 + 2 + 200


def test_the_pacer_keeps_each_connections_rates_and_order():
    pacer = Pacer(StreamPacing(bytes_per_second=None, messages_per_second=100))
    sent: list[tuple[str, int, float]] = []
    start = time.monotonic()
    for i in range(10):
        for conn in ("a", "b"):
            pacer.submit(conn, 0, lambda c=conn, n=i: sent.append((c, n, time.monotonic() - start)))
    deadline = time.monotonic() + 2
    while len(sent) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    pacer.stop()
    for conn in ("a", "b"):
        mine = [(n, t) for c, n, t in sent if c == conn]
        assert [n for n, _ in mine] == list(range(10))
        assert mine[-1][1] >= 9 / 100 - 0.001  # one burst message, then 100/s: each connection on its own
    assert max(t for *_, t in sent) < 0.09 + 0.05
