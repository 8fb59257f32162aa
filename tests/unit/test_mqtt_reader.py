"""PacketReader: the broker's bytes split into packets before paho sees them. QoS 0 messages
without properties are delivered at once; every other packet reaches paho whole, in order."""

from __future__ import annotations

import random
import ssl

import pytest

from gatewayd.mqtt_reader import FOR_PAHO, MAX_PACKET, NOTHING, READ_SIZE, PacketReader
from tests.unit.mqtt_packets import packet, publish_packet, remaining_length


class FakeSocket:
    """Gives what a test queued, in the pieces it queued them; then SSLWantRead, or what it set."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.then: BaseException | bytes = ssl.SSLWantReadError()
        self.closed = False

    def recv(self, size: int) -> bytes:
        if self.pieces:
            piece = self.pieces.pop(0)
            assert len(piece) <= size
            return piece
        if isinstance(self.then, bytes):
            return self.then
        raise self.then

    def close(self) -> None:
        self.closed = True


def drive(reader: PacketReader, events: list) -> None:
    """What the driver does: read, take, and let paho (here: a whole-packet reader) read."""
    while reader.read():
        while (taken := reader.take()) != NOTHING:
            if taken == FOR_PAHO:
                events.append(("paho", paho_reads_one(reader)))


def paho_reads_one(reader: PacketReader) -> bytes:
    first = reader.recv(1)
    length, shift, raw = 0, 0, b""
    while True:
        byte = reader.recv(1)
        raw += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    return first + raw + (reader.recv(length) if length else b"")


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("seed", range(20))
def test_any_cut_of_the_stream_gives_every_packet_in_order(v5: bool, seed: int) -> None:
    rng = random.Random(seed)
    stream: list[tuple[str, bytes, tuple[str, bytes] | None]] = []  # (who reads it, bytes, message)
    for i in range(40):
        kind = rng.choice(["qos0", "qos0", "qos0", "qos1", "props", "puback", "ping", "big"])
        payload = rng.randbytes(rng.choice([0, 1, 5, 300, 4096]))
        if kind in ("qos0", "big"):
            topic, payload = (f"s/{i}/data", payload) if kind == "qos0" else ("s/big", rng.randbytes(200_000))
            raw = publish_packet(topic, payload, v5=v5, flags=rng.choice([0, 1, 8]))
            stream.append(("fast", raw, (topic, payload)))
        elif kind == "qos1":
            stream.append(("paho", publish_packet(f"jobs/{i}", payload, v5=v5, qos=1), None))
        elif kind == "props" and v5:  # a payload format indicator
            stream.append(("paho", publish_packet(f"p/{i}", payload, v5=True, props=b"\x01\x01"), None))
        elif kind == "puback":
            stream.append(("paho", packet(0x40, b"\x00\x07"), None))
        else:
            stream.append(("paho", b"\xd0\x00", None))  # PINGRESP
    data = b"".join(raw for _, raw, _ in stream)
    cuts = sorted(set(rng.sample(range(1, len(data)), 60)) | set(range(READ_SIZE, len(data), READ_SIZE)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    sock = FakeSocket()
    events: list[tuple[str, object]] = []
    reader = PacketReader(sock, v5, lambda topic, payload: events.append(("fast", (topic, payload))))
    while pieces:  # the socket readable again and again, with a piece or a few each time
        arrived = rng.randint(1, 3)
        sock.pieces, pieces = pieces[:arrived], pieces[arrived:]
        drive(reader, events)
        assert not reader.ended

    assert events == [(who, message if who == "fast" else raw) for who, raw, message in stream]
    assert reader.delivered == sum(who == "fast" for who, _, _ in stream)


def test_the_end_of_the_connection_and_a_read_error_reach_paho_after_what_came_before() -> None:
    sock = FakeSocket()
    sock.pieces = [b"\xd0\x00" + publish_packet("t", b"x", v5=True)[:3]]
    sock.then = b""  # the broker closed the connection mid-packet
    reader = PacketReader(sock, True, lambda *_: pytest.fail("a cut packet is not delivered"))
    assert reader.read() and reader.take() == FOR_PAHO and reader.recv(2) == b"\xd0\x00"
    assert reader.take() == NOTHING and not reader.ended
    assert reader.read() and reader.ended and reader.recv(1) == b""  # paho: connection lost

    failing = FakeSocket()
    failing.then = ssl.SSLError(1, "tlsv1 alert")
    reader = PacketReader(failing, True, lambda *_: None)
    assert reader.read() and reader.ended
    with pytest.raises(ssl.SSLError):
        reader.recv(1)  # paho meets it on its read, as it did on the socket's


def test_nothing_to_read_is_what_paho_expects_and_the_rest_is_the_sockets() -> None:
    sock = FakeSocket()
    reader = PacketReader(sock, False, lambda *_: None)
    assert not reader.read()
    with pytest.raises(BlockingIOError):
        reader.recv(1)
    reader.close()
    assert sock.closed  # paho closes the real socket through the reader


def test_a_length_longer_than_mqtt_allows_goes_to_paho_to_refuse() -> None:
    sock = FakeSocket()
    sock.pieces = [b"\x30\xff\xff\xff\xff\x01"]
    reader = PacketReader(sock, False, lambda *_: pytest.fail("not a packet"))
    assert reader.read() and reader.take() == FOR_PAHO
    assert reader.recv(10) == b"\x30\xff\xff\xff\xff\x01"


@pytest.mark.parametrize("v5, raw", [
    (True, publish_packet("", b"aliased", v5=True)),  # an empty topic: a topic alias
    (True, publish_packet("t", b"with properties", v5=True, props=b"\x01\x01")),
    (False, packet(0x30, b"\x00\x02\xff\xfeinvalid utf-8")),
])
def test_a_qos0_message_this_reader_cannot_read_plainly_goes_to_paho(v5: bool, raw: bytes) -> None:
    sock = FakeSocket()
    sock.pieces = [raw]
    reader = PacketReader(sock, v5, lambda *_: pytest.fail("paho's"))
    assert reader.read() and reader.take() == FOR_PAHO and reader.recv(len(raw)) == raw
    assert reader.take() == NOTHING and reader.delivered == 0


def test_a_packet_longer_than_any_broker_sends_ends_the_connection_unbuffered() -> None:
    sock = FakeSocket()
    sock.pieces = [b"\xd0\x00" + bytes([0x30]) + remaining_length(MAX_PACKET + 1) + bytes(1000)]
    reader = PacketReader(sock, True, lambda *_: pytest.fail("not delivered"))
    assert reader.read() and reader.take() == FOR_PAHO and reader.recv(2) == b"\xd0\x00"
    assert reader.take() == NOTHING and reader.ended
    with pytest.raises(ConnectionError, match=f"{MAX_PACKET + 1}-byte packet"):
        reader.recv(1)  # paho: connection lost, and it reconnects
    assert not reader.read()  # nothing more is read from that connection
