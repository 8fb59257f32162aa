"""Fleets behind one gateway: several files, several devices, one device failing, many devices."""

from __future__ import annotations

import re


KEY = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")


def _within_limits(details: dict[str, str]) -> bool:
    return len(details) <= 10 and all(KEY.match(k) and 1 <= len(v) <= 1024 for k, v in details.items())


def test_one_gateway_job_two_files_three_devices(lab):
    lab.add_device("pump-a", files="pump-*.bin")
    lab.add_device("pump-b", files="pump-*.bin")
    lab.add_device("fan", files="fan-*.bin")
    lab.start()
    pump = lab.make_image((2, 0, 0), seed="pump")
    fan = lab.make_image((4, 1, 0), seed="fan")
    doc = lab.ota_update_files("fleet-1", "gw-01", [("pump-2.0.0.bin", pump), ("fan-4.1.0.bin", fan)])
    record = lab.wait("gw-01", "fleet-1")
    assert record.status == "SUCCEEDED", record
    assert lab.device("pump-a").active_image() == pump
    assert lab.device("pump-b").active_image() == pump
    assert lab.device("fan").active_image() == fan
    details = record.status_details
    assert details["summary"] == "3 targets: 3 succeeded"
    assert {details["dev:pump-a"], details["dev:pump-b"], details["dev:fan"]} == {"succeeded 2.0.0", "succeeded 4.1.0"}
    # each file crossed the stream once, however many devices took it
    stream = doc["afr_ota"]["streamname"]
    blocks = sum(-(-len(image) // 1024) for image in (pump, fan))
    assert lab.aws.blocks_served(stream) == blocks


def test_one_device_reverting_fails_the_job_by_name_while_the_other_is_updated(lab):
    lab.add_device("good", files="sensor-*.bin")
    lab.add_device("flaky", files="sensor-*.bin", confirm_policy="never")
    lab.start()
    image = lab.make_image((1, 9, 0))
    lab.ota_update("fleet-2", "gw-01", image, filepath="sensor-1.9.0.bin")
    record = lab.wait("gw-01", "fleet-2")
    assert record.status == "FAILED", record
    reason = record.status_details["reason"]
    assert "flaky" in reason and "rolled back" in reason and "good" not in reason
    assert record.status_details["dev:good"] == "succeeded 1.9.0"
    assert record.status_details["dev:flaky"].startswith("failed")
    assert lab.device("good").active_image() == image
    assert lab.device("flaky").active_image() != image


def test_downgrade_is_rejected_unless_the_device_allows_it(lab):
    lab.add_device("strict", version=(2, 0, 0), files="fw-*.bin")
    lab.add_device("relaxed", version=(2, 0, 0), files="fw-*.bin")
    lab.devices["relaxed"].settings["allow_downgrade"] = True
    lab.start()
    old = lab.make_image((1, 5, 0))
    lab.ota_update("downgrade", "gw-01", old, filepath="fw-1.5.0.bin")
    record = lab.wait("gw-01", "downgrade")
    assert record.status == "FAILED"
    assert record.status_details["dev:strict"].startswith("rejected")
    assert "older" in record.status_details["reason"] and "strict" in record.status_details["reason"]
    assert record.status_details["dev:relaxed"] == "succeeded 1.5.0"
    assert lab.device("strict").upload_requests == 0
    assert lab.device("relaxed").active_image() == old


def test_fifty_devices_in_one_gateway_job(lab):
    names = [f"node-{i:02d}" for i in range(50)]
    for name in names:
        lab.add_device(name, files="node-*.bin", reset_delay=0.1)
    lab.config["relay"]["max_parallel"] = 8
    lab.start()
    image = lab.make_image((5, 0, 0), size=16 * 1024)
    lab.ota_update("fifty", "gw-01", image, filepath="node-5.0.0.bin")
    record = lab.wait("gw-01", "fifty", timeout=240)
    assert record.status == "SUCCEEDED", record.status_details
    for name in names:
        assert lab.device(name).active_image() == image, name
    updates = lab.aws.all_updates("gw-01", "fifty")
    assert all(_within_limits(u["statusDetails"]) for u in updates)
    packed = ";".join(v for k, v in record.status_details.items() if k.startswith("devs:"))
    assert all(f"{name}=succeeded 5.0.0" in packed for name in names)
    assert record.rejections == []
    peak_kib = _peak_rss_kib(lab.daemon.pid)
    print(f"\ndaemon peak RSS with 50 devices: {peak_kib / 1024:.1f} MiB")
    assert peak_kib > 0


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_three_proxied_things_each_with_its_own_job(lab):
    for name in ("tank", "valve", "meter"):
        lab.add_device(name, thing_name=name)
    lab.start()
    images = {name: lab.make_image((1, 1, n), seed=name) for n, name in enumerate(("tank", "valve", "meter"))}
    for name, image in images.items():
        lab.ota_update(f"{name}-job", name, image)
    for name, image in images.items():
        record = lab.wait(name, f"{name}-job")
        assert record.status == "SUCCEEDED", (name, record)
        assert record.status_details["device"] == name
        assert lab.device(name).active_image() == image
