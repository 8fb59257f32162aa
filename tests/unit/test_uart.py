"""UartLink over a real pty and over socket://, against a tiny console device written here.

The device thread frames and unframes with the `smp` package (smp.packet) and builds answers by
hand with struct + cbor2, so it does not share our framing code.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import re
import select
import socket
import struct
import threading
import time
import tty
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from smp import packet as smp_packet

from transports.link import LinkError, LinkTimeout
from transports.smp import Group, Op, OsCmd, SmpClient, encode_request
from transports.uart import UartLink

Handler = Callable[["ConsoleDevice", bytes], None]


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return run


def response(request: bytes, body: dict[str, Any] | bytes, *, seq: int | None = None) -> bytes:
    """An SMP v2 response packet to `request` (body as a dict, or raw CBOR bytes)."""
    byte0, _, _, group, req_seq, cmd = struct.unpack_from("!BBHHBB", request)
    payload = body if isinstance(body, bytes) else cbor2.dumps(body)
    seq = req_seq if seq is None else seq
    return struct.pack("!BBHHBB", 1 << 3 | (byte0 & 7) + 1, 0, len(payload), group, seq, cmd) + payload


def frame(packet: bytes) -> bytes:
    return b"".join(smp_packet.encode(packet))


class ConsoleDevice:
    """Reads console lines from an fd in a thread, reassembles requests with smp.packet.decode and
    lets `handler(device, request)` answer with `device.send(...)`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.fd = -1
        self.lines: list[tuple[float, bytes]] = []
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, fd: int) -> None:
        self.fd = fd
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def _run(self) -> None:
        buf = b""
        decoder = None
        while not self._stop.is_set():
            if not select.select([self.fd], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line += b"\n"
                self.lines.append((time.monotonic(), line))
                if line.startswith(b"\x06\x09"):
                    decoder = smp_packet.decode()
                    next(decoder)
                try:
                    assert decoder is not None
                    decoder.send(line)
                except StopIteration as done:
                    self.requests.append(done.value)
                    self.handler(self, done.value)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class PtyDevice(ConsoleDevice):
    def __init__(self, handler: Handler) -> None:
        super().__init__(handler)
        master, self.slave = os.openpty()
        tty.setraw(master)
        self.path = os.ttyname(self.slave)
        self.start(master)

    def hang_up(self) -> None:
        """The device side goes away: our end of the pty sees end-of-file / EIO."""
        self._stop.set()
        os.close(self.fd)
        os.close(self.slave)
        self.fd = self.slave = -1

    def stop(self) -> None:
        super().stop()
        for fd in (self.fd, self.slave):
            if fd >= 0:
                os.close(fd)


def echo_handler(device: ConsoleDevice, request: bytes) -> None:
    body = cbor2.loads(request[8:])
    # Zephyr answers with an indefinite-length map, and the console carries logs too.
    device.send(b"[00:00:01.000,000] <inf> smp: got a request\n")
    device.send(frame(response(request, b"\xbf\x61r" + cbor2.dumps(body["d"]) + b"\xff")))


@pytest.fixture
def pty_device() -> Iterator[Callable[[Handler], PtyDevice]]:
    devices: list[PtyDevice] = []

    def make(handler: Handler) -> PtyDevice:
        devices.append(PtyDevice(handler))
        return devices[-1]

    yield make
    for device in devices:
        device.stop()


def echo_packet(text: str, seq: int) -> bytes:
    return encode_request(Op.WRITE, Group.OS, OsCmd.ECHO, {"d": text}, seq)


@async_test
async def test_echo_over_a_pty(pty_device: Callable[[Handler], PtyDevice]) -> None:
    device = pty_device(echo_handler)
    link = UartLink(device.path)
    client = SmpClient(link)
    assert await client.echo("hi") == "hi"
    assert await client.echo("x" * 300) == "x" * 300  # a 5-line frame
    assert link.is_open
    assert all(len(line) <= 127 for _, line in device.lines)
    await link.close()
    assert not link.is_open


@async_test
async def test_stale_and_foreign_packets_are_discarded(pty_device: Callable[[Handler], PtyDevice]) -> None:
    def handler(device: ConsoleDevice, request: bytes) -> None:
        seq = request[6]
        device.send(frame(response(request, {"r": "stale"}, seq=(seq - 1) % 256)))
        device.send(b"\x06\x09not base64!\n")  # a corrupted frame
        device.send(frame(request))  # a request echoed back is not an answer
        device.send(frame(response(request, {"r": "mine"})))

    device = pty_device(handler)
    link = UartLink(device.path)
    # the link delivers every well-framed packet in order; the corrupted frame is dropped
    await link.send(echo_packet("a", 42))
    got = [await link.receive(2) for _ in range(3)]
    assert [p[6] for p in got] == [41, 42, 42] and got[1] == echo_packet("a", 42)
    assert cbor2.loads(got[2][8:]) == {"r": "mine"}
    # the client takes the answer to its own request and skips the rest
    client = SmpClient(link)
    assert await client.echo("b") == "mine" and client.stale_discarded == 2
    await link.close()


@async_test
async def test_timeout_then_next_request_works(pty_device: Callable[[Handler], PtyDevice]) -> None:
    def handler(device: ConsoleDevice, request: bytes) -> None:
        if len(device.requests) > 1:
            echo_handler(device, request)

    device = pty_device(handler)
    link = UartLink(device.path)
    started = time.monotonic()
    client = SmpClient(link, timeout=0.3)
    with pytest.raises(LinkTimeout, match=re.escape(f"{device.path}: no answer within 0.3 s")):
        await client.echo("lost")
    assert 0.3 <= time.monotonic() - started < 1.5
    assert await client.echo("ok") == "ok"
    await link.close()


@async_test
async def test_cannot_open(tmp_path: Path) -> None:
    missing = str(tmp_path / "ttyMISSING")
    link = UartLink(missing)
    with pytest.raises(LinkError, match=re.escape(f"cannot open {missing}: ")):
        await link.open()
    with pytest.raises(LinkError, match=re.escape(f"cannot open {missing}")):
        await SmpClient(link, timeout=1).echo("x")
    with pytest.raises(LinkError, match=re.escape("cannot open socket://127.0.0.1:1")):
        await UartLink("socket://127.0.0.1:1").open()


@async_test
async def test_pty_hang_up_raises_link_error_and_reopens(
    pty_device: Callable[[Handler], PtyDevice], tmp_path: Path
) -> None:
    def hang_up(device: ConsoleDevice, request: bytes) -> None:
        assert isinstance(device, PtyDevice)
        device.hang_up()

    first = pty_device(hang_up)
    port = tmp_path / "ttyMCU"
    port.symlink_to(first.path)
    link = UartLink(str(port))
    started = time.monotonic()
    client = SmpClient(link, timeout=5)
    with pytest.raises(LinkError, match=re.escape(f"{port}: link dropped")) as info:
        await client.echo("x")
    assert not isinstance(info.value, LinkTimeout) and time.monotonic() - started < 2
    assert not link.is_open
    second = pty_device(echo_handler)
    port.unlink()
    port.symlink_to(second.path)
    assert await client.echo("back") == "back"
    await link.close()


@async_test
async def test_line_delay_paces_lines(pty_device: Callable[[Handler], PtyDevice]) -> None:
    device = pty_device(echo_handler)
    link = UartLink(device.path, line_delay=0.05)
    assert await SmpClient(link).echo("y" * 250) == "y" * 250
    times = [t for t, _ in device.lines]
    assert len(times) >= 3
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(times))
    await link.close()


@async_test
async def test_loop_is_not_blocked_while_waiting(pty_device: Callable[[Handler], PtyDevice]) -> None:
    def slow(device: ConsoleDevice, request: bytes) -> None:
        time.sleep(0.3)
        echo_handler(device, request)

    device = pty_device(slow)
    link = UartLink(device.path)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    assert await SmpClient(link).echo("z") == "z"
    task.cancel()
    assert ticks >= 10
    await link.close()


def upload_handler(buf_size: int) -> Handler:
    slot = bytearray()

    def handler(device: ConsoleDevice, request: bytes) -> None:
        assert len(request) <= buf_size - 4
        body = cbor2.loads(request[8:])
        if request[7] == 6:
            device.send(frame(response(request, {"buf_size": buf_size, "buf_count": 4})))
            return
        if body["off"] == len(slot):
            slot.extend(body["data"])
        device.send(frame(response(request, {"off": len(slot)})))

    handler.slot = slot  # type: ignore[attr-defined]
    return handler


@async_test
async def test_upload_over_a_pty(pty_device: Callable[[Handler], PtyDevice]) -> None:
    handler = upload_handler(384)
    device = pty_device(handler)
    image = bytes.fromhex("3db8f396") + os.urandom(5000)
    link = UartLink(device.path)
    await SmpClient(link).upload(image)
    assert bytes(handler.slot) == image  # type: ignore[attr-defined]
    assert max(len(r) for r in device.requests) == 380
    await link.close()


class SocketDevice(ConsoleDevice):
    """The same console device behind a TCP port, as QEMU's socket chardev would be."""

    def __init__(self, handler: Handler) -> None:
        super().__init__(handler)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"socket://127.0.0.1:{self.server.getsockname()[1]}"
        self.conn: socket.socket | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.conn, _ = self.server.accept()
        self.start(self.conn.fileno())

    def stop(self) -> None:
        super().stop()
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@async_test
async def test_socket_url_uses_a_reader_thread() -> None:
    device = SocketDevice(echo_handler)
    link = UartLink(device.url)
    try:
        client = SmpClient(link)
        assert await client.echo("over tcp") == "over tcp"
        handler = upload_handler(1024)
        device.handler = handler
        image = bytes.fromhex("3db8f396") + os.urandom(3000)
        await client.upload(image)
        assert bytes(handler.slot) == image  # type: ignore[attr-defined]
    finally:
        await link.close()
        device.stop()


@async_test
async def test_socket_peer_closing_drops_the_link() -> None:
    def hang_up(device: ConsoleDevice, request: bytes) -> None:
        assert isinstance(device, SocketDevice) and device.conn is not None
        device.conn.shutdown(socket.SHUT_RDWR)

    device = SocketDevice(hang_up)
    link = UartLink(device.url)
    try:
        with pytest.raises(LinkError, match="link dropped") as info:
            await SmpClient(link, timeout=5).echo("x")
        assert not isinstance(info.value, LinkTimeout)
    finally:
        await link.close()
        device.stop()


@async_test
async def test_loop_url_does_not_take_its_own_request_as_answer() -> None:
    link = UartLink("loop://")
    client = SmpClient(link, timeout=0.2)
    with pytest.raises(LinkTimeout):
        await client.image_list()
    assert client.stale_discarded == 1  # the request itself, looped back
    await link.close()
