"""StreamDownload's loops suspend on every turn that did not get a request out (issue 11).

The MQTT client here is a stand-in frozen in the moment when paho's network thread has seen
the connection drop but the event loop has not heard yet: `wait_connected` returns at once
(its event is still set) and every publish says "not connected".
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gatewayd.mqtt import MqttError
from gatewayd.stream_download import StreamDownload

pytestmark = pytest.mark.timeout(30)

SPIN_LIMIT = 1_000  # publishes without a suspension: surely a spin, so the stand-in stops it


class DropUnheardOfYet:
    """Not connected, but wait_connected has not noticed: it returns at once."""

    connected = False
    ready = False

    def __init__(self) -> None:
        self.publishes = 0

    async def subscribe(self, topic_filter: str, handler: object, qos: int = 1, local_only: bool = False) -> None:
        pass

    async def unsubscribe(self, topic_filter: str, handler: object = None) -> None:
        pass

    async def wait_connected(self, timeout: float | None = None) -> None:
        pass

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.publishes += 1
        if self.publishes >= SPIN_LIMIT:
            await asyncio.Event().wait()  # the caller spun this far without yielding: hold it so the test can look
        raise MqttError(f"not connected (publish to {topic})")


def test_a_request_refused_as_not_connected_waits_before_trying_again(tmp_path: Path) -> None:
    mqtt = DropUnheardOfYet()

    async def save_progress(received: bytes, done: int) -> None:
        pass

    download = StreamDownload(mqtt, thing_name="gw-01", stream_name="s1", file_id=0, file_size=4096,  # type: ignore[arg-type]
                              block_size=1024, blocks_per_request=4, part_path=tmp_path / "f.part",
                              received=None, save_progress=save_progress, request_timeout=1.0)
    watched = 0.5

    async def scenario() -> tuple[int, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        other = asyncio.create_task(ticker())
        run = asyncio.create_task(download.run())
        await asyncio.sleep(watched)
        run.cancel()
        other.cancel()
        await asyncio.gather(run, other, return_exceptions=True)
        return mqtt.publishes, ticks

    publishes, ticks = asyncio.run(scenario())
    assert publishes <= 20, f"{publishes} publishes in {watched} s: the loop did not wait between them"
    assert ticks >= 10, f"another task ran only {ticks} times in {watched} s: the event loop was starved"
