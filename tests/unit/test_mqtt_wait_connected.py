"""MqttClient.wait_connected waits for a connection that is up, not for an event that says
it was (issue 11).

When paho had its own network thread, a drop cleared the connected flag at once and the "ready"
event only when the loop ran `_on_disconnected`. paho now runs on the loop and both go in the
same step; the paho callbacks are called here directly, as loop_read calls them, to check that
no drop leaves wait_connected returning.
"""

from __future__ import annotations

import asyncio

import pytest

from gatewayd.mqtt import MqttClient, Result

pytestmark = pytest.mark.timeout(30)

CONNACK_OK = Result(0, "Success", True)
CONNECTION_LOST = Result(7, "The connection was lost.", False)


def started_client() -> MqttClient:
    """A client whose loop side is set up as start() does, without a network thread or broker."""
    client = MqttClient(host="127.0.0.1", port=8883, client_id="gw-01", ca_file="ca", cert_file="c", key_file="k")
    client._loop = asyncio.get_running_loop()
    client._ready = asyncio.Event()
    return client


def test_wait_connected_does_not_return_after_the_network_thread_saw_the_connection_drop() -> None:
    async def scenario() -> None:
        client = started_client()
        client._cb_connect(CONNACK_OK)
        await client.wait_connected(timeout=1)
        assert client.ready

        client._cb_disconnect(CONNECTION_LOST)  # the event loop has not heard of it yet
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.wait_connected()
                raise AssertionError(f"wait_connected returned while not connected (connected={client.connected})")

        client._cb_disconnect(CONNECTION_LOST)
        with pytest.raises(TimeoutError):
            await client.wait_connected(timeout=0.3)

        asyncio.get_running_loop().call_later(0.1, client._cb_connect, CONNACK_OK)
        await client.wait_connected(timeout=2)
        assert client.ready

    asyncio.run(scenario())
