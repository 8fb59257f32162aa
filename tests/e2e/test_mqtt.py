"""gatewayd.mqtt against a real mosquitto with mutual TLS (paho 1.6.1 and 2.x)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import threading

import paho.mqtt.client as paho
import pytest

from gatewayd import mqtt as mqtt_module
from gatewayd.emulators.broker import make_pki
from gatewayd.mqtt import MqttClient, MqttError, topic_matches, validate_filter
from tests.e2e.fixtures_cloud import Peer, eventually, make_client

PAHO2 = hasattr(paho, "CallbackAPIVersion")


@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_round_trip_with_mtls_and_handlers_on_the_loop(broker, pki, protocol):
    peer = Peer(broker, pki).start()
    peer.subscribe("$aws/things/gw-01/up/#")

    async def main():
        loop_thread = threading.get_ident()
        got: list[tuple[str, bytes, int]] = []
        mc = make_client(broker, pki, protocol=protocol)
        await mc.start()
        await mc.wait_connected(10)
        assert mc.connected
        await mc.subscribe("$aws/things/gw-01/down/+", lambda t, p: got.append((t, p, threading.get_ident())))
        await mc.publish("$aws/things/gw-01/up/x", b"\x00hello", qos=1)
        await mc.publish("$aws/things/gw-01/up/y", "text", qos=0)
        await peer.await_for(lambda t, p: t.endswith("/up/x") and p == b"\x00hello")
        await peer.await_for(lambda t, p: t.endswith("/up/y") and p == b"text")
        peer.publish("$aws/things/gw-01/down/a", b"1")
        peer.publish("$aws/things/gw-01/other", b"not for the handler")
        peer.publish("$aws/things/gw-01/down/b", b"2")
        await eventually(lambda: len(got) == 2, what="two messages")
        assert [(t, p) for t, p, _ in got] == [("$aws/things/gw-01/down/a", b"1"), ("$aws/things/gw-01/down/b", b"2")]
        assert {tid for _, _, tid in got} == {loop_thread}
        await mc.stop()
        assert not mc.connected

    try:
        asyncio.run(main())
    finally:
        peer.stop()


async def connected_counting_connects(broker, pki) -> tuple[MqttClient, list[int]]:
    """A started, connected client; its connect listener appends to the list at each connect."""
    mc = make_client(broker, pki)
    calls: list[int] = []

    async def listener():
        calls.append(1)

    mc.add_connect_listener(listener)
    await mc.start()
    await mc.wait_connected(10)
    return mc, calls


def test_reconnect_restores_subscriptions_in_batches_and_calls_listener_again(broker, pki):
    peer = Peer(broker, pki)

    async def main():
        mc, calls = await connected_counting_connects(broker, pki)
        got: list[str] = []
        await eventually(lambda: len(calls) == 1, what="first listener call")
        for i in range(19):
            await mc.subscribe(f"$aws/things/gw-01/s/{i}", lambda t, p: got.append(t))

        batches: list[int] = []
        real = mc._client.subscribe

        def spy(topics, *a, **kw):
            batches.append(len(topics) if isinstance(topics, list) else 1)
            return real(topics, *a, **kw)

        mc._client.subscribe = spy
        await asyncio.to_thread(broker.restart)
        await eventually(lambda: len(calls) == 2, timeout=15, what="listener after reconnect")
        assert mc.connected
        assert batches == [8, 8, 3]
        await asyncio.to_thread(peer.start)
        for i in range(19):
            peer.publish(f"$aws/things/gw-01/s/{i}", b"x")
        await eventually(lambda: len(got) == 19, what="all restored subscriptions deliver")
        assert sorted(got) == sorted(f"$aws/things/gw-01/s/{i}" for i in range(19))
        await mc.stop()

    try:
        asyncio.run(main())
    finally:
        peer.stop()


def test_reconfigure_reconnects_with_new_settings_keeping_subscriptions_and_listeners(broker, pki, tmp_path):
    """A reload's new [mqtt] settings (issue 12, item 5): files that cannot be loaded are refused
    before anything changes; a wrong CA fails like any connection (its cause kept, retried);
    the right settings reconnect, with the subscriptions and connect listeners of before."""
    other = make_pki(tmp_path / "other")
    peer = Peer(broker, pki).start()

    async def main():
        mc, calls = await connected_counting_connects(broker, pki)
        got: list[bytes] = []
        await mc.subscribe("$aws/things/gw-01/down", lambda t, p: got.append(p))
        good = mc.settings

        with pytest.raises(MqttError, match="cannot load TLS files"):
            await mc.reconfigure(dataclasses.replace(good, cert_file=str(tmp_path / "missing.pem")))
        assert mc.connected and mc.settings == good

        await mc.reconfigure(dataclasses.replace(good, ca_file=str(other.ca_file)))
        cause = f"TLS: the broker's certificate is not signed by a CA in ca_file {other.ca_file}"
        await eventually(lambda: (mc.trouble.cause or "").startswith(cause), what="the new CA's failure")
        assert not mc.connected
        with pytest.raises(MqttError, match="not connected"):
            await mc.publish("$aws/things/gw-01/up", b"x")

        await mc.reconfigure(good)
        await mc.wait_connected(10)
        assert mc.trouble.cause is None
        await eventually(lambda: len(calls) == 2, what="the connect listener after the reconfigure")
        peer.publish("$aws/things/gw-01/down", b"after")
        await eventually(lambda: got == [b"after"], what="the subscription restored on the new connection")
        await mc.stop()

    try:
        asyncio.run(main())
    finally:
        peer.stop()


def test_reconfigure_fails_publishes_the_old_connection_still_waits_for(broker, pki):
    """The new paho client does not re-send the old one's QoS 1 publishes: their waiters fail
    with MqttError at once (callers treat it as a lost connection), not after a timeout."""

    async def main():
        mc = make_client(broker, pki)
        await mc.start()
        await mc.wait_connected(10)
        broker.freeze()  # no PUBACK comes
        try:
            pending = asyncio.ensure_future(mc.publish("$aws/things/gw-01/up", b"x", timeout=30))
            await asyncio.sleep(0.2)
            assert not pending.done()
            await mc.reconfigure(dataclasses.replace(mc.settings, keepalive=20))
            with pytest.raises(MqttError, match="reconnecting with new settings"):
                await asyncio.wait_for(pending, 1)
        finally:
            broker.thaw()
        await mc.wait_connected(10)
        assert mc.settings.keepalive == 20
        await mc.publish("$aws/things/gw-01/up", b"y")
        await mc.stop()

    asyncio.run(main())


def test_publish_when_disconnected_raises(broker, pki):
    async def main():
        mc = make_client(broker, pki)
        with pytest.raises(MqttError):
            await mc.publish("$aws/things/gw-01/x", b"never started")
        await mc.start()
        await mc.wait_connected(10)
        await asyncio.to_thread(broker.stop)
        await eventually(lambda: not mc.connected, what="disconnect seen")
        with pytest.raises(MqttError, match="not connected"):
            await mc.publish("$aws/things/gw-01/x", b"y")
        with pytest.raises(asyncio.TimeoutError):
            await mc.wait_connected(0.3)
        await mc.stop()

    asyncio.run(main())


def test_wrong_ca_is_refused(broker, pki, tmp_path, monkeypatch):
    other = make_pki(tmp_path / "other")

    async def main():
        # we do not trust the broker's certificate
        mc = make_client(broker, pki)
        mc.settings = dataclasses.replace(mc.settings, ca_file=str(other.ca_file))
        await mc.start()
        with pytest.raises(asyncio.TimeoutError):
            await mc.wait_connected(1.0)
        assert not mc.connected
        await mc.stop()
        # the broker does not trust our certificate
        ident = other.client("gw-01")
        mc2 = MqttClient(host=broker.host, port=broker.port, client_id="gw-01", ca_file=pki.ca_file,
                         cert_file=ident.cert_file, key_file=ident.key_file,
                         reconnect_min_delay=0.1, reconnect_max_delay=0.2)
        ctx = mqtt_module.tls_context(str(pki.ca_file), str(ident.cert_file), str(ident.key_file), broker.port)
        monkeypatch.setattr(mqtt_module, "tls_context", lambda *_args: ctx)
        await mc2.start()
        with pytest.raises(asyncio.TimeoutError):
            await mc2.wait_connected(1.0)
        assert not mc2.connected
        # it keeps retrying (paho 1.6 would lose its network thread to the TLS alert)
        good = pki.client("gw-01")
        ctx.load_cert_chain(str(good.cert_file), str(good.key_file))
        await mc2.wait_connected(5)
        await mc2.stop()

    asyncio.run(main())


def test_handler_exceptions_are_contained_and_async_handlers_run(broker, pki, caplog):
    peer = Peer(broker, pki).start()

    async def main():
        mc = make_client(broker, pki)
        await mc.start()
        await mc.wait_connected(10)
        got: list[bytes] = []
        done = asyncio.Event()

        def bad(topic, payload):
            raise RuntimeError("boom")

        async def good(topic, payload):
            await asyncio.sleep(0)
            got.append(payload)
            if payload == b"2":
                done.set()

        await mc.subscribe("$aws/things/gw-01/h", bad)
        await mc.subscribe("$aws/things/gw-01/h", good)
        peer.publish("$aws/things/gw-01/h", b"1")
        peer.publish("$aws/things/gw-01/h", b"2")
        await asyncio.wait_for(done.wait(), 10)
        assert got == [b"1", b"2"]
        # removing one handler keeps the filter for the other
        await mc.unsubscribe("$aws/things/gw-01/h", bad)
        peer.publish("$aws/things/gw-01/h", b"3")
        await eventually(lambda: got[-1:] == [b"3"], what="third message")
        await mc.unsubscribe("$aws/things/gw-01/h")
        peer.publish("$aws/things/gw-01/h", b"4")
        await mc.publish("$aws/things/gw-01/sync", b"")  # ordered after the peer's publish? not guaranteed
        await asyncio.sleep(0.3)
        assert got == [b"1", b"2", b"3"]
        await mc.stop()

    try:
        asyncio.run(main())
    finally:
        peer.stop()
    assert "boom" in caplog.text


@pytest.mark.skipif(not PAHO2, reason="paho 1.6 does not report PUBACK reason codes")
def test_mqtt5_puback_refusal_raises(broker, pki):
    async def main():
        mc = make_client(broker, pki)
        await mc.start()
        await mc.wait_connected(10)
        with pytest.raises(MqttError) as e:
            await mc.publish("$aws/things/someone-else/jobs/x/update", b"{}")
        assert e.value.code == 135
        await mc.stop()

    asyncio.run(main())


def test_alpn_only_on_port_443(pki, monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setattr(ssl.SSLContext, "set_alpn_protocols", lambda self, p: seen.append(p))
    ident = pki.client("gw-01")
    for port in (8883, 443):
        mqtt_module.tls_context(str(pki.ca_file), str(ident.cert_file), str(ident.key_file), port)
    assert seen == [["x-amzn-mqtt-ca"]]
    ctx = mqtt_module.tls_context(str(pki.ca_file), str(ident.cert_file), str(ident.key_file), 8883)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED


def test_missing_tls_files_fail_fast(pki, tmp_path):
    async def main():
        mc = MqttClient(host="h", port=8883, client_id="c", ca_file=pki.ca_file,
                        cert_file=tmp_path / "nope.pem", key_file=tmp_path / "nope.key")
        with pytest.raises(MqttError, match="TLS"):
            await mc.start()

    asyncio.run(main())


@pytest.mark.parametrize(
    "flt,topic,expected",
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$aws/x", False),
        ("+/x", "$aws/x", False),
        ("$aws/things/+/jobs/+/get/+", "$aws/things/gw-01/jobs/$next/get/accepted", True),
        ("$aws/things/+/jobs/+/get/+", "$aws/things/gw-01/jobs/$next/get", False),
        ("a/+/c", "a//c", True),
        ("a/b", "a/b/", False),
        ("/+", "/x", True),
    ],
)
def test_topic_matches(flt, topic, expected):
    assert topic_matches(flt, topic) is expected
    if not topic.startswith("$"):
        assert paho.topic_matches_sub(flt, topic) is expected  # agrees with paho


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "a/\0"])
def test_invalid_filters(bad):
    with pytest.raises(ValueError):
        validate_filter(bad)


def test_acks_that_overtake_their_registration_are_not_lost(broker, pki):
    # SUBACK/UNSUBACK/PUBACK may come back on paho's thread before we have noted the mid
    async def main():
        mc = make_client(broker, pki)
        await mc.start()
        await mc.wait_connected(10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(40):
            await mc.subscribe(f"$aws/things/gw-01/r/{i}", lambda t, p: None)
            await mc.publish(f"$aws/things/gw-01/r/{i}", b"x")
            await mc.unsubscribe(f"$aws/things/gw-01/r/{i}")
        assert loop.time() - t0 < 5
        await mc.stop()

    asyncio.run(main())


def test_local_only_handlers_get_messages_without_a_subscribe(broker, pki):
    peer = Peer(broker, pki).start()

    async def main():
        mc = make_client(broker, pki)
        await mc.start()
        await mc.wait_connected(10)
        local: list[str] = []
        remote: list[str] = []
        await mc.subscribe("$aws/things/gw-01/jobs/+/get/+", lambda t, p: local.append(t), local_only=True)
        peer.publish("$aws/things/gw-01/jobs/j1/get/accepted", b"{}")
        await mc.subscribe("$aws/things/gw-01/end", lambda t, p: remote.append(t))
        peer.publish("$aws/things/gw-01/end", b"")
        await eventually(lambda: remote, what="marker")
        assert local == []  # nobody subscribed: mosquitto did not deliver it
        await mc.subscribe("$aws/things/gw-01/jobs/#", lambda t, p: remote.append(t))
        peer.publish("$aws/things/gw-01/jobs/j1/get/accepted", b"{}")
        await eventually(lambda: local, what="delivery through the wider subscription")
        assert local == ["$aws/things/gw-01/jobs/j1/get/accepted"]
        assert "$aws/things/gw-01/jobs/+/get/+" not in mc._subscriptions.qos
        await mc.unsubscribe("$aws/things/gw-01/jobs/+/get/+")
        assert "$aws/things/gw-01/jobs/+/get/+" not in mc._subscriptions.handlers
        await mc.stop()

    try:
        asyncio.run(main())
    finally:
        peer.stop()
