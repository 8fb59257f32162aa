"""Waiting says why (issue 12, item 4): a device that cannot be reached shows the reason in
`status` (text and --json) and in the job's status details, not only in the log; a device
with nothing to do whose port is gone is `unreachable`, not `idle`."""

from __future__ import annotations

import json


def _row(lab, name: str) -> dict:
    status = lab.ctl("status", "--json")
    assert status.returncode == 0, status.stderr
    return next(d for d in json.loads(status.stdout)["devices"] if d["name"] == name)


def test_an_absent_device_is_unreachable_when_idle_and_waiting_with_the_reason_in_a_job(lab):
    dev = lab.add_device("pump", files="pump-*.bin")
    lab.add_device("fan")
    lab.on_device_loop(dev.set_absent(True))
    lab.start()
    lab.wait_control()
    port = lab.devices["pump"].settings["port"]

    idle = _row(lab, "pump")
    assert (idle["phase"], idle["reason"]) == ("unreachable", f"{port} does not exist")
    assert _row(lab, "fan")["phase"] == "idle"
    shown = lab.ctl("status")
    text = next((line for line in shown.stdout.splitlines() if line.strip().startswith("pump ")), shown.stdout + shown.stderr)
    assert "unreachable" in text and f"{port} does not exist" in text, text

    lab.ota_update("absent", "gw-01", lab.make_image((1, 4, 0), size=8 * 1024), filepath="pump-1.4.0.bin")
    lab.wait_until("the device waiting with a reason", lambda: _row(lab, "pump")["phase"] == "waiting"
                   and _row(lab, "pump")["reason"], 20)
    waiting = _row(lab, "pump")
    assert port in waiting["reason"] and "No such file or directory" in waiting["reason"], waiting
    assert waiting["reason"] in lab.ctl("status").stdout
    lab.wait_until("the reason in the job's status details", lambda: any(
        u["statusDetails"].get("dev:pump", "").startswith(f"waiting cannot open {port}")
        for u in lab.aws.all_updates("gw-01", "absent")), 20)

    lab.on_device_loop(dev.set_absent(False))
    done = lab.wait("gw-01", "absent", timeout=40)
    assert done.status == "SUCCEEDED", done
    assert _row(lab, "pump")["phase"] == "succeeded" and _row(lab, "pump")["reason"] is None
