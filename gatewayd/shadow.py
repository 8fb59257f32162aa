"""Named shadow updates over the Device Shadow MQTT API (reported state only).

The gateway writes; it never reads a shadow's desired state. An update is a publish to
`$aws/things/<thing>/shadow/name/<shadow>/update` with a clientToken, answered on
`.../update/accepted` or `.../update/rejected` (AWS IoT Developer Guide, "Device Shadow MQTT
topics" and "Device Shadow error messages"). Those answers reach only subscribers, so the
client subscribes to the two topics of a shadow for the time of its update and leaves them
afterwards: a gateway with hundreds of devices never holds more than two such
subscriptions, far below the 50 a connection may have. With a `publish_rate` (the
connection's token bucket, `gatewayd.publish_rate`) each update waits for its turn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from .aws import MAX_SHADOW_STATE_BYTES, SHADOW_NAME, check_thing_name
from .mqtt import MqttClient, MqttError
from .publish_rate import PublishRate

log = logging.getLogger("gatewayd.shadow")

REPLY_TIMEOUT = 10.0  # seconds for the accepted/rejected answer of one update


class ShadowError(Exception):
    """The update was not taken: rejected (with AWS's code), too large, or not answered."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ShadowTarget:
    thing: str
    shadow: str

    def __post_init__(self) -> None:
        check_thing_name(self.thing)
        if SHADOW_NAME.fullmatch(self.shadow) is None:
            raise ValueError(f"{self.shadow!r} is not a shadow name (1 to 64 of A-Z a-z 0-9 : _ -)")

    @property
    def topic(self) -> str:
        return f"$aws/things/{self.thing}/shadow/name/{self.shadow}/update"

    def __str__(self) -> str:
        return f"{self.thing}/{self.shadow}"


class ShadowClient:
    """One named shadow update at a time over the gateway's MQTT connection."""

    def __init__(self, mqtt: MqttClient, timeout: float = REPLY_TIMEOUT,
                 publish_rate: PublishRate | None = None) -> None:
        self._mqtt = mqtt
        self._rate = publish_rate
        self._timeout = timeout
        self._lock = asyncio.Lock()

    async def report(self, target: ShadowTarget, reported: dict[str, Any]) -> int:
        """Publish `reported` as the shadow's reported state; the shadow's new version once
        AWS IoT accepted it. Raises ShadowError naming the shadow and the reason."""
        token = secrets.token_hex(16)
        payload = json.dumps({"state": {"reported": reported}, "clientToken": token}, separators=(",", ":"))
        size = len(json.dumps({"reported": reported}, separators=(",", ":")).encode())
        if size > MAX_SHADOW_STATE_BYTES:
            raise ShadowError(f"shadow {target}: the report has {size} bytes of state, more than the "
                              f"{MAX_SHADOW_STATE_BYTES} AWS IoT takes", 413)
        async with self._lock:
            answer: asyncio.Future[tuple[str, dict[str, Any]]] = asyncio.get_running_loop().create_future()

            def on_reply(topic: str, body: bytes) -> None:
                try:
                    doc = json.loads(body)
                except ValueError:
                    return
                if isinstance(doc, dict) and doc.get("clientToken") == token and not answer.done():
                    answer.set_result((topic.rsplit("/", 1)[-1], doc))

            filters = [f"{target.topic}/accepted", f"{target.topic}/rejected"]
            try:
                for flt in filters:
                    await self._mqtt.subscribe(flt, on_reply, qos=1)
                if self._rate is not None:
                    await self._rate.acquire()
                await self._mqtt.publish(target.topic, payload, qos=1)
                outcome, doc = await asyncio.wait_for(answer, self._timeout)
            except MqttError as e:
                raise ShadowError(f"shadow {target}: {e}") from e
            except asyncio.TimeoutError:
                raise ShadowError(f"shadow {target}: AWS IoT did not answer the update within "
                                  f"{self._timeout:g} s") from None
            finally:
                for flt in filters:
                    await self._mqtt.unsubscribe(flt, on_reply)
        if outcome != "accepted":
            code = doc.get("code") if isinstance(doc.get("code"), int) else None
            raise ShadowError(f"shadow {target}: AWS IoT rejected the update: {code} "
                              f"{str(doc.get('message', ''))[:200]}", code)
        version = doc.get("version")
        return version if isinstance(version, int) else 0
