"""End to end: more things than notify-next subscriptions; the rest are polled with `$next/get`.

`[mqtt] max_thing_subscriptions = 2` with the gateway's thing and five proxied things: four
of the six things have no notify-next subscription, so their jobs (created after the daemon
is up, when only a notify-next would announce them) can only be found by polling.
"""

from __future__ import annotations

import re
import time

THINGS = [f"node-{i}" for i in range(1, 6)]


def test_jobs_for_polled_things_succeed(lab):
    lab.config["mqtt"] = dict(lab.config.get("mqtt", {}), max_thing_subscriptions=2, poll_interval=0.5)
    for name in THINGS:
        lab.add_device(name, thing_name=name, response_delay=0.002)
    lab.start()
    deadline = time.monotonic() + 10
    while len(polled := set(re.findall(r"(\S+) is polled with", lab.daemon_log()))) < 4:
        assert time.monotonic() < deadline, lab.daemon_log()[-3000:]
        time.sleep(0.1)
    assert len(polled) == 4 and polled <= set(THINGS) | {lab.gateway_thing}
    assert len(set(THINGS) & polled) >= 3  # at least three proxied things have no notify-next
    time.sleep(1.0)  # every thing answered its first $next/get (empty): jobs below are new

    images = {}
    for n, name in enumerate(THINGS):
        images[name] = lab.make_image((1, 1, n), seed=name)
        lab.ota_update(f"job-{name}", name, images[name])
    for name in THINGS:
        record = lab.wait(name, f"job-{name}", timeout=30)
        assert record.status == "SUCCEEDED", (name, record)
        dev = lab.device(name)
        assert dev.active_image() == images[name] and dev.confirmed
