"""End to end: many proxied things at once, and the gateway stays under AWS IoT Core's publish quota.

AWS IoT Core discards publishes over 100 per second on one connection (pacing.py keeps the
figure). Forty things each get a job at the same moment, thirty of them polled every second
(`max_thing_subscriptions = 10`): their status updates, `$next/get` asks, stream requests and
inventory shadows all leave on the gateway's one connection. Without the daemon's publish rate
this reached 169 publishes in one second (bench/scale.py reaches 216 with 200 things); with
it, every second stays under the quota. The publishes are counted
at the broker by a subscriber to `$aws/things/#`, told from the service's own by topic.
"""

from __future__ import annotations

import threading
import time
import uuid

from gatewayd.emulators.broker import SERVICE_IDENTITY, tls_client
from gatewayd.emulators.pacing import AWS_IOT_CORE_QUOTAS

THINGS = [f"node-{i:02d}" for i in range(40)]


def _from_gateway(topic: str) -> bool:
    parts = topic.split("/")
    if len(parts) < 5 or parts[:2] != ["$aws", "things"]:
        return False
    if parts[3] == "jobs":
        return parts[-1] in ("get", "update", "start-next")
    if parts[3] == "streams":
        return len(parts) == 7 and parts[5] in ("get", "describe")
    return parts[3] == "shadow" and parts[-1] in ("update", "get", "delete")


def _busiest_second(times: list[float]) -> int:
    times = sorted(times)
    best = first = 0
    for last, t in enumerate(times):
        while t - times[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


def test_forty_things_at_once_stay_under_the_publish_quota(lab):
    for name in THINGS:
        lab.add_device(name, thing_name=name, reset_delay=0.1)
    lab.config["mqtt"] = {"max_thing_subscriptions": 10, "poll_interval": 1.0}
    lab.start_cloud()
    times: list[float] = []
    subscribed = threading.Event()
    counter = tls_client(lab.pki.ca_file, lab.pki.client(SERVICE_IDENTITY), f"counter-{uuid.uuid4().hex[:8]}")
    counter.on_connect = lambda client, *_a: client.subscribe("$aws/things/#", qos=0)
    counter.on_subscribe = lambda *_a: subscribed.set()
    counter.on_message = lambda _c, _u, msg: times.append(time.monotonic()) if _from_gateway(msg.topic) else None
    counter.connect(lab.broker.host, lab.broker.port, keepalive=30)
    counter.loop_start()
    try:
        assert subscribed.wait(10)
        lab.start_daemon()
        lab.wait_control()
        images = {name: lab.make_image((1, 1, n), seed=name, size=8 * 1024) for n, name in enumerate(THINGS)}
        for name in THINGS:
            lab.ota_update(f"job-{name}", name, images[name])
        for name in THINGS:
            record = lab.wait(name, f"job-{name}", timeout=120)
            assert record.status == "SUCCEEDED", (name, record)
            assert lab.device(name).active_image() == images[name]
        time.sleep(1.0)
    finally:
        counter.disconnect()
        counter.loop_stop()
    quota = AWS_IOT_CORE_QUOTAS.messages_per_second
    print(f"\n{len(times)} publishes from the gateway, {_busiest_second(times)} in the busiest second")
    assert len(times) > 2 * quota  # the test is about a load that could break the quota
    assert _busiest_second(times) <= quota, f"{_busiest_second(times)} publishes in one second"
