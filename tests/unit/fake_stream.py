"""An MqttClient stand-in that serves one file as an AWS IoT MQTT stream, in the event loop.

Written from aws-iot-ota.md §3 with cbor2, not from our codec. The service answers GetStream
requests one after another, in the order they reach it, each block `gap` seconds after the
one before (a paced stream); requests reach it, and blocks reach the client, `rtt / 2` after
they leave, in order. Fault knobs: requests never answered (`lost`), rejected (`reject`, by
request number), blocks lost once (`drop`), every block sent twice (`duplicate`), and `hold`
(the service stops sending once that many blocks went out, until released).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

Handler = Callable[[str, bytes], None]


class DelayLine:
    """Items come out in the order they went in, each `delay` seconds after it went in."""

    def __init__(self, delay: float, deliver: Callable[[Any], None]) -> None:
        self.delay = delay
        self.deliver = deliver
        self.items: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.items.put_nowait((asyncio.get_running_loop().time() + self.delay, item))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, item = await self.items.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            self.deliver(item)


@dataclass
class Request:
    number: int
    sent_at: float
    blocks: list[int]  # what the service yields for it: the first n blocks of its bitmap
    outstanding: int  # earlier answered requests whose blocks had not all reached the client
    seen: int  # blocks that had reached the client (len(delivered)) when it was sent
    message: dict[str, Any] = field(default_factory=dict)


class FakeStreamMqtt:
    connected = True
    ready = True

    def __init__(self, data: bytes, block_size: int, *, file_id: int = 0, rtt: float = 0.0, gap: float = 0.0) -> None:
        self.data, self.block_size, self.file_id = data, block_size, file_id
        self.rtt, self.gap = rtt, gap
        self.handlers: dict[str, Handler] = {}
        self.requests: list[Request] = []
        self.served: list[int] = []  # every block the service sent, lost ones too
        self.delivered: list[int] = []  # blocks that reached the client, copies too
        self.lost: set[int] = set()
        self.reject: dict[int, str] = {}
        self.drop: set[int] = set()
        self.duplicate = False
        self.hold: int | None = None
        self.released = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._free_at = 0.0  # when the service's link has sent the last block
        self.idle = 0.0  # seconds the service's link waited for a request after the first one
        self._inbox: asyncio.Queue[Request] = asyncio.Queue()
        self.held: list[int] = []  # per request reaching the service: requests it held then, this one too
        self._serving = False
        self._up = DelayLine(rtt / 2, self._arrive)
        self._down = DelayLine(rtt / 2, self._to_client)

    @property
    def count(self) -> int:
        return -(-len(self.data) // self.block_size)

    # -- the MqttClient surface StreamDownload uses --

    async def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, local_only: bool = False) -> None:
        if not self._tasks:
            self._tasks = [asyncio.get_running_loop().create_task(c) for c in
                           (self._up.run(), self._down.run(), self._service())]
        self.handlers[topic_filter] = handler

    async def unsubscribe(self, topic_filter: str, handler: object = None) -> None:
        self.handlers.pop(topic_filter, None)

    async def wait_connected(self, timeout: float | None = None) -> None:
        pass

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        assert topic.endswith("/get/cbor"), topic
        message = cbor2.loads(payload)
        number = len(self.requests)
        pending = set(self.delivered)
        outstanding = sum(1 for r in self.requests if r.number not in self.lost | set(self.reject)
                          and not set(r.blocks) <= pending)
        request = Request(number, asyncio.get_running_loop().time(), self._wanted(message), outstanding,
                          len(self.delivered), message)
        self.requests.append(request)
        if number not in self.lost:
            self._up.put(request)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    # -- the service --

    def _wanted(self, message: dict[str, Any]) -> list[int]:
        bits = message["b"]
        asked = [k for k in range(len(bits) * 8) if bits[k // 8] & (1 << (k % 8)) and k < self.count]
        return asked[: message["n"]]

    def _arrive(self, request: Request) -> None:
        self.held.append(self._inbox.qsize() + self._serving + 1)
        self._inbox.put_nowait(request)

    async def _service(self) -> None:
        while True:
            self._serving = False
            request = await self._inbox.get()
            self._serving = True
            if self._free_at:
                self.idle += max(0.0, asyncio.get_running_loop().time() - self._free_at)
            code = self.reject.get(request.number)
            if code is not None:
                reply = {"o": code, "m": "rejected by the fake", "c": request.message["c"]}
                self._down.put(("rejected", cbor2.dumps(reply)))
                continue
            for i in request.blocks:
                if self.hold is not None and len(self.served) >= self.hold:
                    await self.released.wait()
                if self.gap:  # a link of that rate: the schedule does not drift with the sleeps
                    loop = asyncio.get_running_loop()
                    self._free_at = max(self._free_at, loop.time()) + self.gap
                    await asyncio.sleep(self._free_at - loop.time())
                self.served.append(i)
                if i in self.drop:
                    self.drop.discard(i)
                    continue
                chunk = self.data[i * self.block_size:(i + 1) * self.block_size]
                block = cbor2.dumps({"c": request.message["c"], "f": self.file_id, "i": i, "l": len(chunk), "p": chunk})
                for _copy in range(2 if self.duplicate else 1):
                    self._down.put(("data", block, i))

    def _to_client(self, item: tuple[Any, ...]) -> None:
        kind, payload = item[0], item[1]
        if kind == "data":
            self.delivered.append(item[2])
        for topic, handler in list(self.handlers.items()):
            if topic.endswith(f"/{kind}/cbor"):
                handler(topic, payload)
