"""The inventory with the real daemon: named shadows of what every device runs, re-delivery
after a swap or a factory reset, a newer image left alone, nothing resent after a restart."""

from __future__ import annotations

import json
import signal
import time

from gatewayd.mcuboot import inspect_image_bytes


def mcuboot_hash(image: bytes) -> str:
    return inspect_image_bytes(image).hash.hex()


def running(version: str):
    return lambda doc: ((doc["state"].get("reported") or {}).get("running") or {}).get("version") == version


def reported(lab, thing: str, shadow: str) -> dict:
    return lab.aws.shadow(thing, shadow)["state"]["reported"]


def inventory(lab, *args: str) -> dict:
    out = lab.ctl("inventory", "--json", *args, timeout=160)
    assert out.returncode == 0, out.stderr
    return {d["name"]: d for d in json.loads(out.stdout)["devices"]}


def pump_on_2_0_0(lab, interval: float | None = None) -> bytes:
    """A gateway job put 2.0.0 on device `pump`, and its shadow says so."""
    lab.add_device("pump", files="pump-*.bin")
    if interval is not None:
        lab.config["relay"]["inventory_interval"] = interval
    lab.start()
    image = lab.make_image((2, 0, 0), seed="pump")
    lab.ota_update("gw-job", "gw-01", image, filepath="pump-2.0.0.bin")
    assert lab.wait("gw-01", "gw-job").status == "SUCCEEDED"
    lab.aws.shadows.wait_for("gw-01", "ota-pump", running("2.0.0"), timeout=20)
    return image


def test_shadows_report_what_each_device_runs_after_a_gateway_job_and_a_proxied_job(lab):
    lab.add_device("pump", files="pump-*.bin")
    lab.add_device("valve", thing_name="valve-thing")
    lab.start()
    pump = lab.make_image((2, 0, 0), seed="pump")
    valve = lab.make_image((3, 1, 0), seed="valve")
    lab.ota_update("gw-job", "gw-01", pump, filepath="pump-2.0.0.bin")
    lab.ota_update("valve-job", "valve-thing", valve)
    assert lab.wait("gw-01", "gw-job").status == "SUCCEEDED"
    assert lab.wait("valve-thing", "valve-job").status == "SUCCEEDED"

    lab.aws.shadows.wait_for("gw-01", "ota-pump", running("2.0.0"), timeout=20)
    lab.aws.shadows.wait_for("valve-thing", "ota", running("3.1.0"), timeout=20)
    pump_report = reported(lab, "gw-01", "ota-pump")
    assert pump_report["device"] == "pump" and pump_report["transport"] == "uart"
    assert pump_report["running"] == {"version": "2.0.0", "hash": mcuboot_hash(pump), "confirmed": True}
    assert pump_report.get("pending") is None  # null in the report: AWS removes the field
    assert {k: pump_report["last_update"][k] for k in ("job_id", "kind", "status", "version")} == {
        "job_id": "gw-job", "kind": "gateway", "status": "succeeded", "version": "2.0.0"}
    assert abs(pump_report["seen"] - time.time()) < 120
    valve_report = reported(lab, "valve-thing", "ota")
    assert valve_report["running"] == {"version": "3.1.0", "hash": mcuboot_hash(valve), "confirmed": True}
    assert valve_report["last_update"]["kind"] == "proxied" and valve_report["last_update"]["job_id"] == "valve-job"
    stats = lab.aws.shadows.stats()
    assert stats.updates_rejected == 0 and stats.updates_accepted >= 2, stats

    rows = inventory(lab)
    assert rows["pump"]["running"]["version"] == "2.0.0" and rows["pump"]["reported"] is True
    assert rows["pump"]["slot1"]["version"] == "1.0.0"  # the image it ran before, kept for a revert
    assert rows["valve"]["shadow"] == "valve-thing/ota"
    table = lab.ctl("inventory").stdout
    assert "pump" in table and "2.0.0" in table and "valve" in table


def test_a_board_swapped_for_one_on_factory_firmware_gets_the_last_image_back(lab):
    image = pump_on_2_0_0(lab, interval=3)
    updates_of_the_job = len(lab.aws.all_updates("gw-01", "gw-job"))

    swapped_at = time.monotonic()
    board = lab.swap_device("pump", version=(1, 0, 0))
    # two intervals to notice it, and the time an upload and a test boot take
    lab.wait_until("the new board runs 2.0.0, confirmed",
                   lambda: board.active_image() == image and board.confirmed, timeout=6 + 20)
    doc = lab.aws.shadows.wait_for("gw-01", "ota-pump",
                                   lambda d: (d["state"]["reported"].get("last_update") or {}).get("kind") == "redeliver",
                                   timeout=20)
    took = time.monotonic() - swapped_at
    last = doc["state"]["reported"]["last_update"]
    assert last["status"] == "succeeded" and last["version"] == "2.0.0" and last["job_id"].startswith("redeliver-pump-")
    assert doc["state"]["reported"]["running"] == {"version": "2.0.0", "hash": mcuboot_hash(image), "confirmed": True}
    assert len(lab.aws.all_updates("gw-01", "gw-job")) == updates_of_the_job, "the closed job was updated"
    log = lab.daemon_log()
    assert "pump runs 1.0.0" in log and "putting 2.0.0 back" in log
    status = json.loads(lab.ctl("status", "--json").stdout)
    assert any(j["kind"] == "redeliver" for j in status["jobs"]), status["jobs"]
    print(f"re-delivered {took:.1f} s after the swap (inventory_interval 3 s)")


def test_a_device_found_on_a_newer_image_is_left_alone(lab):
    pump_on_2_0_0(lab)

    newer = lab.make_image((3, 0, 0), seed="someone-else")
    board = lab.swap_device("pump", image=newer)
    rows = inventory(lab, "--refresh")
    assert rows["pump"]["running"]["version"] == "3.0.0" and rows["pump"]["reported"] is True
    inventory(lab, "--refresh")
    assert board.upload_requests == 0
    assert board.active_image() == newer
    assert reported(lab, "gw-01", "ota-pump")["running"]["version"] == "3.0.0"
    assert "newer than 2.0.0" in lab.daemon_log()


def test_a_restart_does_not_resend_an_unchanged_inventory(lab):
    lab.add_device("pump", files="pump-*.bin")
    lab.add_device("valve", thing_name="valve-thing")
    lab.start()
    lab.wait_control()
    # the daemon has the answers too (an update whose answer a stop cuts off is sent again)
    lab.wait_until("both reports accepted", lambda: all(r["reported"] for r in inventory(lab).values()), timeout=20)
    before = lab.aws.shadows.stats().updates_accepted
    assert before == 2

    lab.stop_daemon()
    lab.start_daemon()
    lab.wait_control()
    rows = inventory(lab, "--refresh")
    assert all(r["reported"] for r in rows.values()), rows
    assert lab.aws.shadows.stats().updates_accepted == before


def test_a_rejected_report_is_logged_with_its_code_and_not_retried_in_a_loop(lab):
    lab.add_device("pump", files="pump-*.bin")
    lab.start_cloud()
    lab.aws.shadows.reject_updates(count=1000, code=500)
    lab.start_daemon()
    lab.wait_control()
    lab.wait_until("a report refused", lambda: lab.aws.shadows.stats().updates_rejected >= 1, timeout=20)
    time.sleep(3)
    assert lab.aws.shadows.stats().updates_rejected == 1
    assert "AWS IoT rejected the update: 500" in lab.daemon_log()

    lab.aws.shadows.clear_faults()
    rows = inventory(lab, "--refresh")  # an operator's refresh tries again at once
    assert rows["pump"]["reported"] is True
    assert lab.aws.shadows.stats().updates_accepted == 1


def test_a_redelivery_that_keeps_failing_is_tried_a_bounded_number_of_times_and_reported(lab):
    image = pump_on_2_0_0(lab, interval=1)
    board = lab.swap_device("pump", version=(1, 0, 0), confirm_policy="never")  # its MCUboot reverts every test boot
    lab.wait_until("the gateway gives up", lambda: "re-deliveries of 2.0.0 failed, not trying again" in lab.daemon_log(),
                   timeout=90)
    uploads = board.upload_requests
    time.sleep(3)  # three more passes: no more attempts
    assert board.upload_requests == uploads
    status = json.loads(lab.ctl("status", "--json").stdout)
    tries = [j for j in status["jobs"] if j["kind"] == "redeliver"]
    assert len(tries) == 3 and all(j["phase"] == "failed" for j in tries), tries
    last = lab.aws.shadows.wait_for("gw-01", "ota-pump", lambda d: (d["state"]["reported"].get("last_update") or {})
                                    .get("kind") == "redeliver", timeout=20)["state"]["reported"]["last_update"]
    assert last["status"] == "failed" and "rolled back" in last["reason"], last
    assert board.active_image() != image


def test_a_device_added_by_a_reload_is_in_its_shadow_without_waiting_for_the_interval(lab):
    lab.add_device("pump", files="pump-*.bin")
    lab.start()
    lab.aws.shadows.wait_for("gw-01", "ota-pump", running("1.0.0"), timeout=20)
    lab.add_device("fan", files="fan-*.bin", version=(1, 4, 0))
    lab.write_config()
    lab.daemon.send_signal(signal.SIGHUP)
    lab.aws.shadows.wait_for("gw-01", "ota-fan", running("1.4.0"), timeout=20)  # the interval is an hour
