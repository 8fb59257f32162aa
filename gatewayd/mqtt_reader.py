"""The broker's bytes, read in large pieces and split into MQTT packets before paho sees them.

paho reads a packet a few bytes at a time (the first byte, each byte of the length, the rest)
and builds a message object with, on MQTT 5, a properties object for every PUBLISH: about
50 µs per packet on 3.1.1 and 90 µs on MQTT 5 on a small server core, most of a stream
block's cost. So the loop reads the socket here, and a QoS 0 PUBLISH without properties
(stream data: no acknowledgement, no session state) goes straight to `deliver`. Every other
packet is handed to paho, whole and in the order it came, through `recv`: paho reads its socket
through this object, so CONNACK, acknowledgements, QoS 1 messages, PINGRESP, a DISCONNECT,
the end of the connection and a read error reach paho exactly as they did.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

READ_SIZE = 65536  # bytes asked of the socket at once: several TLS records
MAX_READS = 16  # reads in one turn of the loop, so a busy connection leaves the loop to others
MAX_PACKET = 1 << 20  # bytes: AWS IoT Core sends at most 128 KB; a larger length is not a broker we know
_PUBLISH_QOS0 = 0x30  # packet type 3, QoS bits 0 (DUP and RETAIN may be set)
NOTHING, FOR_PAHO, DELIVERED = 0, 1, 2  # what `take` did

Deliver = Callable[[str, bytes], None]


class PacketReader:
    """Stands in for paho's socket (paho calls `recv`, and everything else reaches the real one)."""

    def __init__(self, sock: Any, v5: bool, deliver: Deliver) -> None:
        self.sock = sock
        self._v5 = v5
        self._deliver = deliver
        self._buf = bytearray()  # read, not yet split
        self._for_paho = bytearray()  # whole packets paho has still to read
        self._end: BaseException | None = None  # what the socket raised, for paho's next recv
        self._eof = False
        self.delivered = 0  # packets that did not go through paho

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    @property
    def ended(self) -> bool:
        """The socket failed or closed; paho has to hear it."""
        return self._end is not None or self._eof

    # --- paho's side ---------------------------------------------------------------------------

    def recv(self, size: int) -> bytes:
        if self._for_paho:
            data = bytes(self._for_paho[:size])
            del self._for_paho[:size]
            return data
        if self._end is not None:
            end, self._end = self._end, None
            raise end
        if self._eof:
            return b""
        raise BlockingIOError  # paho: "nothing yet" (its own recv turns SSLWantRead into this too)

    # --- the loop's side -----------------------------------------------------------------------

    def read(self) -> bool:
        """One read from the socket; False when it had nothing to give."""
        if self.ended:
            return False
        try:
            data = self.sock.recv(READ_SIZE)
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            return False
        except Exception as exc:  # noqa: BLE001 - paho decides what a failed read means
            self._end = exc
            return True
        if not data:
            self._eof = True
            return True
        self._buf += data
        return True

    def take(self) -> int:
        """Take the next whole packet read: delivered here (DELIVERED), or queued for paho
        (FOR_PAHO: paho must read it before the next is taken); NOTHING while none is whole."""
        buf = self._buf
        length, shift, pos = 0, 0, 1
        while True:
            if pos >= len(buf):
                return NOTHING
            byte = buf[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            if not byte & 0x80:
                break
            shift += 7
            if pos > 4:  # no MQTT length is this long: paho says what is wrong
                self._for_paho += buf
                buf.clear()
                return FOR_PAHO
        if length > MAX_PACKET:  # not buffered on a peer's word: the connection goes, paho reconnects
            self._end = ConnectionError(f"the broker announced a {length}-byte packet, more than {MAX_PACKET}")
            buf.clear()
            return NOTHING
        end = pos + length
        if len(buf) < end:
            return NOTHING
        message = None
        if buf[0] & 0xF6 == _PUBLISH_QOS0:
            with memoryview(buf) as view:
                message = self._publish(view[:end], pos)
        if message is None:
            self._for_paho += buf[:end]
            del buf[:end]
            return FOR_PAHO
        del buf[:end]
        self.delivered += 1
        self._deliver(*message)
        return DELIVERED

    def _publish(self, packet: memoryview, pos: int) -> tuple[str, bytes] | None:
        """(topic, payload) of a QoS 0 PUBLISH this reader can take; None leaves it to paho."""
        if len(packet) < pos + 2:
            return None
        topic_end = pos + 2 + int.from_bytes(packet[pos : pos + 2], "big")
        if topic_end == pos + 2 or len(packet) < topic_end + self._v5:
            return None  # an empty topic is a topic alias
        if self._v5:
            if packet[topic_end] != 0:
                return None  # properties: paho's to read
            topic_end += 1
        with packet[pos + 2 : topic_end - self._v5] as name, packet[topic_end:] as payload:
            try:
                return str(name, "utf-8"), bytes(payload)
            except UnicodeDecodeError:
                return None
