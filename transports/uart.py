"""SMP over a serial console: a UART/USB-CDC device path or a pyserial URL (socket://, rfc2217://)."""

from __future__ import annotations

import asyncio
import os
import threading

import serial

from transports.framing import FrameDecoder, encode_frame
from transports.link import Inbox, LinkError

READ_SIZE = 65536
THREAD_READ_TIMEOUT = 0.1  # how quickly a URL reader thread notices close()


class UartLink:
    """A Link over pyserial without blocking the event loop.

    Device paths are read through `loop.add_reader` on their file descriptor; URL handlers have
    no usable descriptor, so a thread reads them and hands the bytes to the loop. Requests are
    framed for the console; `line_delay` seconds between lines keeps slow devices' line buffers
    from overrunning. If the port drops (a pty or USB device going away), the waiting reader
    gets a LinkError and the next `send` reopens the port.
    """

    max_packet: int | None = None
    framing_overhead = 4  # the frame's length and CRC share the device's buf_size
    release_when_idle = False
    pipelining = False  # one request at a time on a console (line buffers, log output between frames)

    def __init__(self, port: str, baudrate: int = 115200, *, line_delay: float = 0.0) -> None:
        self.name = port
        self.baudrate = baudrate
        self.line_delay = line_delay
        self._serial: serial.SerialBase | None = None
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._decoder = FrameDecoder()
        self._inbox = Inbox()
        self._inbox.fail(LinkError(f"{self.name}: link not open"))
        self._lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def present(self) -> bool:
        """A device path exists (a URL's peer cannot be told without connecting)."""
        return "://" in self.name or os.path.exists(self.name)

    async def open(self) -> None:
        if self._serial is not None:
            return
        try:
            ser = await asyncio.to_thread(self._open_port)
        except (serial.SerialException, OSError, ValueError) as e:
            raise LinkError(f"cannot open {self.name}: {e}") from e
        loop = asyncio.get_running_loop()
        self._serial, self._decoder, self._stop = ser, FrameDecoder(), threading.Event()
        self._inbox.reset()
        if "://" in self.name:
            self._thread = threading.Thread(
                target=self._read_thread, args=(ser, loop, self._stop), name=f"uart {self.name}", daemon=True
            )
            self._thread.start()
        else:
            self._fd = ser.fileno()
            os.set_blocking(self._fd, False)
            loop.add_reader(self._fd, self._read_fd, ser)

    def _open_port(self) -> serial.SerialBase:
        if "://" in self.name:
            ser = serial.serial_for_url(self.name, baudrate=self.baudrate, timeout=THREAD_READ_TIMEOUT)
        else:
            # exclusive: a second process writing to the same console would corrupt both.
            ser = serial.Serial(self.name, self.baudrate, timeout=0, exclusive=True)
        ser.reset_input_buffer()  # answers meant for an earlier owner of the port are stale
        return ser

    async def close(self) -> None:
        thread = self._thread
        self._detach(LinkError(f"{self.name}: link closed"))
        if thread is not None:
            await asyncio.to_thread(thread.join)

    async def send(self, packet: bytes) -> None:
        """Frame one SMP packet and write it, opening the port first if needed."""
        async with self._lock:
            await self.open()
            ser = self._serial
            if ser is None:
                raise LinkError(f"{self.name}: link dropped while opening")
            await self._write(ser, encode_frame(packet))

    async def receive(self, timeout: float) -> bytes:
        """The next packet from the device; LinkError once the port dropped or closed."""
        return await self._inbox.get(timeout)

    async def _write(self, ser: serial.SerialBase, frame: bytes) -> None:
        lines = frame.splitlines(keepends=True) if self.line_delay else [frame]
        for i, line in enumerate(lines):
            if i:
                await asyncio.sleep(self.line_delay)
            if ser is not self._serial:
                return  # dropped meanwhile: the reader gets the LinkError
            try:
                if self._fd is None:
                    await asyncio.to_thread(ser.write, line)
                else:
                    await self._write_fd(self._fd, line)
            except (serial.SerialException, OSError) as e:
                self._drop(ser, f"write failed: {e}")

    async def _write_fd(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await _writable(fd)

    def _read_fd(self, ser: serial.SerialBase) -> None:
        try:
            data = os.read(ser.fileno(), READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(ser, f"read failed: {e}")
            return
        if not data:
            self._drop(ser, "the port was closed (end of file)")
            return
        self._received(ser, data)

    def _read_thread(self, ser: serial.SerialBase, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                data = ser.read(max(1, ser.in_waiting))
                if data:
                    loop.call_soon_threadsafe(self._received, ser, data)
        except Exception as e:  # URL handlers raise assorted errors when their peer goes away
            if not stop.is_set():
                loop.call_soon_threadsafe(self._drop, ser, f"read failed: {e}")

    def _received(self, ser: serial.SerialBase, data: bytes) -> None:
        if ser is not self._serial:
            return
        for packet in self._decoder.feed(data):
            self._inbox.put(packet)

    def _drop(self, ser: serial.SerialBase, reason: str) -> None:
        if ser is self._serial:
            self._detach(LinkError(f"{self.name}: link dropped: {reason}"))

    def _detach(self, error: LinkError) -> None:
        ser, self._serial, self._thread = self._serial, None, None
        if ser is None:
            return
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        self._stop.set()
        ser.close()
        self._inbox.fail(error)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
