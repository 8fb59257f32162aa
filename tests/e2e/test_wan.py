"""The real daemon downloading over a far link (issue 14): 300 ms round trip, stream paced at
AWS IoT Core's 512 KiB/s per connection.

The daemon reaches mosquitto through the WAN delay proxy (gatewayd.emulators.wan, 150 ms each
way); the AWS IoT emulator, like the service inside AWS, talks to the broker directly and paces
the stream data of each connection. The daemon logs how long the download took, from its first
request to the file complete on disk; the paced ideal is the file at the paced rate plus one
round trip (the first request's way up and the last block's way down). The bound asserted is
generous (a loaded CI machine); the figure is printed, and bench/wan_download.py measures it
without a daemon around it.
"""

from __future__ import annotations

import re

from gatewayd.emulators.pacing import AWS_IOT_CORE_QUOTAS, StreamPacing
from gatewayd.emulators.wan import WanLink

RTT = 0.3
RATE = AWS_IOT_CORE_QUOTAS.bytes_per_second or 0.0
MIB = 1024 * 1024


def test_a_1_mib_download_at_300_ms_rtt_stays_near_the_paced_ideal(lab, capsys):
    lab.wan = WanLink(latency=RTT / 2)
    lab.config["ota"] = {"block_size": 4096, "blocks_per_request": 32, "request_timeout": 10.0}  # 128 KiB windows
    lab.add_device("pump", thing_name="pump", slot_size=2 * MIB)
    lab.start()
    lab.aws.pace_streams(StreamPacing(bytes_per_second=RATE))
    image = lab.make_image((2, 0, 0), size=MIB - 2048, seed="far")
    assert MIB - 4096 < len(image) <= MIB
    lab.ota_update("far1", "pump", image)

    done = lab.wait("pump", "far1", timeout=120)
    assert done.status == "SUCCEEDED", (done, lab.daemon_log()[-3000:])
    assert lab.device("pump").active_image() == image
    took = re.search(rf"file 0 complete: {len(image)} bytes in ([\d.]+) s, (\d+) requests", lab.daemon_log())
    assert took is not None, lab.daemon_log()[-3000:]
    seconds, requests = float(took.group(1)), int(took.group(2))
    ideal = len(image) / RATE + RTT
    assert requests == 8  # 128 KiB windows, none lost: each asked for once
    assert seconds < 1.5 * ideal, (seconds, ideal)
    with capsys.disabled():
        print(f"\n[wan 300 ms] {len(image)} bytes in {seconds:.2f} s; paced ideal {ideal:.2f} s "
              f"(x{seconds / ideal:.2f}); {requests} requests")
