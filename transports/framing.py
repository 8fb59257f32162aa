"""How SMP packets are delimited on a byte or message stream.

- The SMP header (smp.md §1): 8 bytes, the payload length in bytes 2-3, so a packet is
  `8 + length` bytes long. `PacketAssembler` cuts packets out of a stream of fragments by that
  rule, as BLE notifications carry them (smp.md §2.2).
- Console framing (smp.md §2.1): base64 lines with a length prefix and a CRC16-XMODEM, for
  UART and USB-CDC (`encode_frame`, `FrameDecoder`).
"""

from __future__ import annotations

import base64
import binascii

SMP_HEADER_SIZE = 8

START = b"\x06\x09"
CONTINUE = b"\x04\x14"


def encode_frame(packet: bytes, line_length: int = 127) -> bytes:
    """Frame one SMP packet as console lines of at most `line_length` bytes each.

    Every line holds whole 4-character base64 groups, because the device decodes each line on
    its own. Like smp/smpclient we keep one byte spare below `line_length` (120 base64
    characters at 127), which the device's 128-byte line buffer needs and which makes our
    frames byte-identical to theirs.
    """
    per_line = (line_length - 4) // 4 * 4
    if per_line < 4:
        raise ValueError(f"line_length {line_length} is too short for a console frame")
    body = (len(packet) + 2).to_bytes(2, "big") + packet + binascii.crc_hqx(packet, 0).to_bytes(2, "big")
    b64 = base64.b64encode(body)
    out = bytearray()
    for i in range(0, len(b64), per_line):
        out += (CONTINUE if i else START) + b64[i : i + per_line] + b"\n"
    return bytes(out)


class FrameDecoder:
    """Reassembles SMP packets from console bytes that may also carry log output.

    Text around frames is ignored; a marker may follow log text on the same line. Frames with
    bad base64, a bad length or a bad CRC, and frames cut short by a new start line, are
    dropped and counted in `dropped`.
    """

    def __init__(self, max_line: int = 4096) -> None:
        self.dropped = 0
        self._max_line = max_line
        self._partial = bytearray()
        self._body: bytearray | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes; return the packets completed by them."""
        self._partial += data
        end = self._partial.rfind(b"\n")
        packets: list[bytes] = []
        if end >= 0:
            lines = bytes(self._partial[:end]).split(b"\n")
            del self._partial[: end + 1]
            for line in lines:
                packet = self._line(line)
                if packet is not None:
                    packets.append(packet)
        if len(self._partial) > self._max_line:
            # No frame line is this long: only the tail can still hold the start of one.
            del self._partial[: -self._max_line]
        return packets

    def _line(self, line: bytes) -> bytes | None:
        start, cont = line.rfind(START), line.rfind(CONTINUE)
        if start > cont:
            if self._body is not None:
                self.dropped += 1
            self._body = bytearray()
            content = line[start + 2 :]
        elif cont >= 0 and self._body is not None:
            content = line[cont + 2 :]
        else:
            return None
        try:
            self._body += base64.b64decode(content.rstrip(b"\r"), validate=True)
        except binascii.Error:
            self._drop()
            return None
        return self._complete()

    def _complete(self) -> bytes | None:
        body = self._body
        assert body is not None
        if len(body) < 2:
            return None
        expected = int.from_bytes(body[:2], "big")
        if len(body) - 2 < expected:
            return None
        packet, crc = bytes(body[2:-2]), int.from_bytes(body[-2:], "big")
        if len(body) - 2 > expected or expected < 2 or binascii.crc_hqx(packet, 0) != crc:
            self._drop()
            return None
        self._body = None
        return packet

    def _drop(self) -> None:
        self.dropped += 1
        self._body = None


def smp_packet_length(header: bytes | bytearray) -> int:
    """The whole packet's length announced by its first 8 bytes: header + payload."""
    return SMP_HEADER_SIZE + int.from_bytes(header[2:4], "big")


def looks_like_response_start(data: bytes | bytearray) -> bool:
    """Byte 0 of an SMP response header: reserved bits 0, version 0/1, op read-rsp/write-rsp."""
    return bool(data) and data[0] & 0xE0 == 0 and (data[0] >> 3) & 0x3 <= 1 and data[0] & 0x7 in (1, 3)


class PacketAssembler:
    """Reassembles SMP response packets from fragments (BLE notifications) by their length.

    A fragment that cannot start a response while no packet is being assembled is the tail
    of an answer nobody waits for any more; it is dropped and counted in `discarded`.
    """

    def __init__(self) -> None:
        self.discarded = 0
        self._rx = bytearray()

    def clear(self) -> None:
        self._rx.clear()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Take one fragment; return the packets it completes."""
        rx = self._rx
        if not rx and not looks_like_response_start(data):
            self.discarded += 1
            return []
        rx += data
        packets = []
        while len(rx) >= SMP_HEADER_SIZE:
            need = smp_packet_length(rx)
            if len(rx) < need:
                break
            packets.append(bytes(rx[:need]))
            del rx[:need]
            if rx and not looks_like_response_start(rx):
                self.discarded += 1
                rx.clear()
        return packets
