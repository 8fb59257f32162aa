"""The test broker enforces mutual TLS and per-thing ACLs like AWS IoT's policies would."""

import threading

from gatewayd.emulators.broker import tls_client


def _client(pki, name):
    return tls_client(pki.ca_file, pki.client(name))


def test_acl_lets_a_thing_use_only_its_topics_and_granted_ones(pki, broker_factory):
    broker = broker_factory({"gw-01": ["pump"]})
    got: list[str] = []
    done = threading.Event()
    sub = _client(pki, "gw-01")
    sub.on_message = lambda c, u, m: (got.append(m.topic), done.set() if m.topic.endswith("end") else None)
    sub.connect(broker.host, broker.port)
    sub.subscribe([("$aws/things/gw-01/#", 1), ("$aws/things/pump/#", 1), ("$aws/things/other/#", 1)])
    sub.loop_start()
    pub = _client(pki, "aws-iot-core-emulator")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    for topic in ("$aws/things/gw-01/a", "$aws/things/pump/b", "$aws/things/other/c", "$aws/things/gw-01/end"):
        pub.publish(topic, b"x", qos=1).wait_for_publish(5)
    assert done.wait(5)
    sub.loop_stop(); pub.loop_stop()
    assert got == ["$aws/things/gw-01/a", "$aws/things/pump/b", "$aws/things/gw-01/end"]
