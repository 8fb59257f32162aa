"""gatewayd.mqtt drives paho from the event loop (issue 14, item 2): a message handler runs as
paho reads the packet, on the loop and with no thread of paho's own; packets that wait,
decrypted, in the TLS socket are read without more bytes arriving; and keepalive still notices
a broker that stopped answering while the TCP connection stays open.

The broker is a few lines of MQTT 3.1.1 over TLS on this test's own loop, so a test controls
exactly what is written when (mosquitto, in tests/e2e, cannot be told to stop answering PINGREQ
or to put a burst of PUBLISHes in one TLS record).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gatewayd.emulators.broker import Pki, make_pki
from gatewayd.mqtt import MqttClient
from gatewayd.mqtt_reader import MAX_PACKET
from tests.unit.mqtt_packets import packet as _packet
from tests.unit.mqtt_packets import publish_packet, remaining_length

pytestmark = pytest.mark.timeout(60)

CONNECT, PUBLISH, PUBACK, SUBSCRIBE, PINGREQ, DISCONNECT = 1, 3, 4, 8, 12, 14


class Broker:
    """Just enough of an MQTT 3.1.1 broker: CONNACK, SUBACK, PUBACK and (while `answer_pings`)
    PINGRESP; it delivers only what a test hands to `send`."""

    def __init__(self, pki: Pki) -> None:
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(pki.server.cert_file, pki.server.key_file)
        self.answer_pings = True
        self.connects = 0
        self.pings = 0
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Broker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        if self._writer is not None:
            self._writer.close()

    def send(self, data: bytes) -> None:
        """One write to the connected client: under 16 KiB, one TLS record."""
        assert self._writer is not None
        self._writer.write(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                size, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    size |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(size)
                self._answer(first, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def _answer(self, first: int, body: bytes, writer: asyncio.StreamWriter) -> None:
        kind = first >> 4
        if kind == CONNECT:
            self.connects += 1
            writer.write(_packet(0x20, b"\x00\x00"))
        elif kind == SUBSCRIBE:
            filters, at = 0, 2
            while at < len(body):
                at += 2 + int.from_bytes(body[at:at + 2], "big") + 1
                filters += 1
            writer.write(_packet(0x90, body[:2] + b"\x01" * filters))
        elif kind == PUBLISH and first & 0x06:
            name_end = 2 + int.from_bytes(body[:2], "big")
            writer.write(_packet(0x40, body[name_end:name_end + 2]))
        elif kind == PINGREQ:
            self.pings += 1
            if self.answer_pings:
                writer.write(_packet(0xD0, b""))
        elif kind == DISCONNECT:
            writer.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


def client_of(broker: Broker, pki: Pki, **kwargs: object) -> MqttClient:
    ident = pki.client("gw-01")
    return MqttClient(host="127.0.0.1", port=broker.port, client_id="gw-01", ca_file=pki.ca_file,
                      cert_file=ident.cert_file, key_file=ident.key_file, protocol="v311",
                      reconnect_min_delay=0.1, reconnect_max_delay=0.2, **kwargs)  # type: ignore[arg-type]


async def connected_to(pki: Pki, topic: str) -> tuple[Broker, MqttClient, list[bytes]]:
    """A broker, and a client connected to it whose handler for `topic` keeps every payload."""
    broker = await Broker(pki).start()
    mc = client_of(broker, pki)
    got: list[bytes] = []
    await mc.subscribe(topic, lambda t, p: got.append(p))
    await mc.start()
    await mc.wait_connected(5)
    return broker, mc, got


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def _frames() -> Iterator[str]:
    frame = sys._getframe(1)
    while frame is not None:
        yield frame.f_code.co_name
        frame = frame.f_back


def test_a_handler_runs_as_the_socket_is_read_on_the_loop_thread_and_paho_has_no_thread(pki: Pki) -> None:
    async def scenario() -> None:
        broker = await Broker(pki).start()
        mc = client_of(broker, pki)
        seen: list[tuple[int, bool, bool]] = []
        await mc.subscribe("down/+", lambda t, p: seen.append(
            (threading.get_ident(), "_readable" in _frames(), asyncio.current_task() is None)))
        await mc.start()
        await mc.wait_connected(5)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("paho-mqtt-client")]
        broker.send(publish_packet("down/a", b"1"))
        await until(lambda: seen, 5, "the message")
        assert seen == [(threading.get_ident(), True, True)]  # called from reading the socket, not by a Task
        await mc.stop()
        await broker.close()

    asyncio.run(scenario())


def test_packets_buffered_in_the_tls_socket_are_read_without_more_bytes_arriving(pki: Pki) -> None:
    """A TLS record holding many PUBLISHes: all are read although the socket is not readable
    again until the broker sends something (what one read leaves in the SSL object is not lost)."""
    async def scenario() -> None:
        broker, mc, got = await connected_to(pki, "down")
        burst = [str(i).encode() for i in range(50)]
        broker.send(b"".join(publish_packet("down", p) for p in burst))
        await until(lambda: len(got) == len(burst), 2, "the whole burst")  # keepalive (60 s) sends nothing
        assert got == burst
        await mc.stop()
        await broker.close()

    asyncio.run(scenario())


def test_keepalive_notices_a_broker_that_stopped_answering_and_reconnects(pki: Pki,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Half-open: the TCP connection stays up but nothing answers PINGREQ any more."""
    async def scenario() -> None:
        broker = await Broker(pki).start()
        mc = client_of(broker, pki, keepalive=1)
        await mc.start()
        await mc.wait_connected(5)
        await asyncio.sleep(1.5)
        assert mc.connected and broker.pings >= 1  # answered: the connection stays
        broker.answer_pings = False
        pings = broker.pings
        await until(lambda: not mc.connected, 5, "the dead connection noticed")
        assert broker.pings > pings
        broker.answer_pings = True
        await mc.wait_connected(5)
        assert broker.connects == 2
        await mc.stop()
        await broker.close()

    with caplog.at_level(logging.WARNING, logger="gatewayd.mqtt"):
        asyncio.run(scenario())
    assert "connection lost" in caplog.text


def test_a_packet_longer_than_any_broker_sends_drops_the_connection_and_it_comes_back(
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """The reader does not buffer a length the broker announces beyond MAX_PACKET: paho hears a
    lost connection and the client reconnects, on paho 1.6 and 2.x alike (this broker speaks
    3.1.1; the reader's MQTT 5 parsing is in test_mqtt_reader.py and every e2e test)."""
    async def scenario() -> None:
        broker, mc, got = await connected_to(pki, "down")
        broker.send(bytes([0x30]) + remaining_length(MAX_PACKET + 1) + bytes(100))
        await until(lambda: broker.connects == 2, 5, "a new connection")
        await mc.wait_connected(5)
        broker.send(publish_packet("down", b"after"))
        await until(lambda: got == [b"after"], 5, "a message on the new connection")
        await mc.stop()
        await broker.close()

    with caplog.at_level(logging.WARNING, logger="gatewayd.mqtt"):
        asyncio.run(scenario())
    assert "connection lost" in caplog.text
