"""A thing on the test broker, played by a plain paho client: it subscribes to everything
under `$aws/things/<thing>/` and records it, so tests of the AWS IoT emulator (Jobs, streams,
shadows) read the emulator's replies without any of the gateway's code in between."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from typing import Any

from gatewayd.emulators.broker import tls_client

TIMEOUT = 5.0


class ThingClient:
    """Records every message on `$aws/things/<thing>/#`; topics are given by their suffix."""

    def __init__(self, pki, broker, thing: str, client_id: str | None = None) -> None:
        self.thing = thing
        self.client = tls_client(pki.ca_file, pki.client(thing), client_id)
        self.client.reconnect_delay_set(0.1, 1)
        self._cond = threading.Condition()
        self._messages: dict[str, list[bytes]] = defaultdict(list)
        self._cursor: dict[str, int] = defaultdict(int)
        self._subscribed = threading.Event()
        self.subacks = 0
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(TIMEOUT), "device did not get its SUBACK"

    def _on_connect(self, client, userdata, flags, rc, properties=None) -> None:
        client.subscribe(f"$aws/things/{self.thing}/#", qos=1)

    def _on_subscribe(self, client, userdata, mid, *args) -> None:
        self.subacks += 1
        self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self._messages[msg.topic].append(msg.payload)
            self._cond.notify_all()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def topic(self, suffix: str) -> str:
        return f"$aws/things/{self.thing}/{suffix}"

    def publish(self, suffix: str, payload: Any, qos: int = 1) -> None:
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        self.client.publish(self.topic(suffix), payload, qos=qos).wait_for_publish(TIMEOUT)

    def next(self, suffix: str, timeout: float = TIMEOUT) -> bytes:
        """The next not yet consumed message on `$aws/things/<thing>/<suffix>`."""
        topic = self.topic(suffix)
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._messages[topic]) > self._cursor[topic], timeout)
            assert ok, f"nothing on {topic} within {timeout}s; got {sorted(self._messages)}"
            payload = self._messages[topic][self._cursor[topic]]
            self._cursor[topic] += 1
            return payload

    def next_json(self, suffix: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        return json.loads(self.next(suffix, timeout))

    def pending(self, suffix: str) -> list[bytes]:
        """Messages received on the topic and not consumed yet (consumes them)."""
        topic = self.topic(suffix)
        with self._cond:
            out = self._messages[topic][self._cursor[topic] :]
            self._cursor[topic] = len(self._messages[topic])
            return out

    def reply(self, suffix: str, payload: Any) -> tuple[str, dict[str, Any]]:
        """Publish to `<suffix>` and wait for its `/accepted` or `/rejected` reply:
        ("accepted" or "rejected", the reply's JSON)."""
        self.publish(suffix, payload)
        acc, rej = self.topic(f"{suffix}/accepted"), self.topic(f"{suffix}/rejected")
        with self._cond:
            def ready() -> bool:
                return any(len(self._messages[t]) > self._cursor[t] for t in (acc, rej))

            assert self._cond.wait_for(ready, TIMEOUT), f"no reply to {suffix}"
            for outcome, t in (("accepted", acc), ("rejected", rej)):
                if len(self._messages[t]) > self._cursor[t]:
                    self._cursor[t] += 1
                    return outcome, json.loads(self._messages[t][self._cursor[t] - 1])
        raise AssertionError("unreachable")
