"""Test helpers for the cloud-side tests: a plain paho peer (playing AWS) and a client factory.

The peer is written against paho directly (1.6.1 or 2.x), not through gatewayd.mqtt, so a
mistake in our adapter cannot hide on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any


from gatewayd.emulators.broker import SERVICE_IDENTITY, Mosquitto, Pki, tls_client
from gatewayd.cloud import JobsClient
from gatewayd.mqtt import MqttClient


@contextlib.asynccontextmanager
async def connected_jobs(broker: Mosquitto, pki: Pki, on_execution: Any, **jobs_options: Any):
    """A started, connected MqttClient for gw-01 and a JobsClient on it; both closed afterwards."""
    mc = make_client(broker, pki)
    jobs = JobsClient(mc, on_execution, **jobs_options)
    await mc.start()
    await mc.wait_connected(10)
    try:
        yield mc, jobs
    finally:
        await jobs.close()
        await mc.stop()


def make_client(broker: Mosquitto, pki: Pki, name: str = "gw-01", **kwargs: Any) -> MqttClient:
    ident = pki.client(name)
    kwargs.setdefault("reconnect_min_delay", 0.1)
    kwargs.setdefault("reconnect_max_delay", 0.5)
    return MqttClient(
        host=broker.host,
        port=broker.port,
        client_id=name,
        ca_file=pki.ca_file,
        cert_file=ident.cert_file,
        key_file=ident.key_file,
        **kwargs,
    )


class Peer:
    """A synchronous paho client on its own network thread.

    `responder(peer, topic, payload)` runs on paho's thread for every message and may
    publish replies. Every message is also kept in `messages`.
    """

    def __init__(self, broker: Mosquitto, pki: Pki, name: str = SERVICE_IDENTITY,
                 responder: Callable[[Peer, str, bytes], None] | None = None) -> None:
        self.broker = broker
        self.responder = responder
        self.messages: list[tuple[str, bytes]] = []
        self.errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._subacks: dict[int, threading.Event] = {}
        self.client = tls_client(pki.ca_file, pki.client(name))
        self._connected = threading.Event()
        self._net_thread: int | None = None
        self._filters: list[str] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> Peer:
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        assert self._connected.wait(10), "peer did not connect"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, *filters: str) -> None:
        event = threading.Event()
        self._filters += filters
        with self._cond:
            rc, mid = self.client.subscribe([(f, 1) for f in filters])
            self._subacks[mid] = event
        assert event.wait(10), "no SUBACK for the peer"

    def _on_connect(self, *_a: Any) -> None:
        self._net_thread = threading.get_ident()
        if self._filters:  # after a broker restart: the session was clean
            self.client.subscribe([(f, 1) for f in self._filters])
        self._connected.set()

    def _on_subscribe(self, _c: Any, _ud: Any, mid: int, *_rest: Any) -> None:
        with self._cond:
            event = self._subacks.pop(mid, None)
        if event:
            event.set()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        if qos and threading.get_ident() != self._net_thread:
            info.wait_for_publish(10)

    def _on_message(self, _c: Any, _ud: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()
        if self.responder:
            try:
                self.responder(self, msg.topic, bytes(msg.payload))
            except BaseException as e:  # noqa: BLE001 - surfaced by the test
                self.errors.append(e)
                raise

    def wait_for(self, pred: Callable[[str, bytes], bool], timeout: float = 10.0) -> tuple[str, bytes]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if pred(*m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"peer saw no matching message; got {[t for t, _ in self.messages]}")
                self._cond.wait(left)

    async def await_for(self, pred: Callable[[str, bytes], bool], timeout: float = 10.0) -> tuple[str, bytes]:
        return await asyncio.to_thread(self.wait_for, pred, timeout)


async def eventually(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
