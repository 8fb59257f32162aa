"""A reload applies [mqtt] settings and certificates rotated on disk by reconnecting (issue 12,
item 5), with the real daemon, the real mosquitto and mutual TLS: a wrong setting fails like
any connection (cause in the log once and in `status`), a later SIGHUP with it fixed recovers,
and the daemon serves jobs on the new connection."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from gatewayd.emulators.broker import make_pki
from test_connection_causes import _break


def _status(lab) -> dict:
    return json.loads(lab.ctl("status", "--json").stdout)


def _reload(lab, summary: str) -> None:
    """SIGHUP, and wait for the reload's log line to end with `summary`."""
    done = lab.daemon_log().count("reloaded configuration")
    lab.daemon.send_signal(signal.SIGHUP)
    lab.wait_until("the reload", lambda: lab.daemon_log().count("reloaded configuration") > done, 10)
    logged = [line for line in lab.daemon_log().splitlines() if "reloaded configuration" in line][-1]
    assert logged.endswith(f"reloaded configuration (1 devices): {summary}"), logged


def _serves_a_job(lab, job_id: str) -> None:
    image = lab.make_image((1, 1, 0))
    lab.ota_update(job_id, "pump", image)
    assert lab.wait("pump", job_id, timeout=30).status == "SUCCEEDED"
    assert lab.device("pump").active_image() == image


@pytest.mark.parametrize("how, key", [("refused port", "[mqtt] port"), ("unknown CA", "[mqtt] ca_file")])
def test_a_reload_with_the_mqtt_setting_fixed_connects_and_serves_jobs(lab, how, key):
    lab.add_device("pump", thing_name="pump")
    lab.start_cloud()
    cause = _break(lab, how)
    lab.start_daemon()
    lab.wait_control()
    lab.wait_until(f"the cause in status ({how})",
                   lambda: (_status(lab).get("connection_error") or "").startswith(cause), 20)

    del lab.config["mqtt"]  # back to the broker's port and the test CA
    lab.write_config()
    _reload(lab, f"applied: {key}")
    lab.wait_until("the connection with the fixed setting", lambda: _status(lab)["connected"], 10)
    assert _status(lab)["connection_error"] is None
    _serves_a_job(lab, "after-reload")


def test_certificates_rotated_on_disk_are_used_after_a_reload(lab):
    lab.add_device("pump", thing_name="pump")
    lab.start()
    lab.wait_control()
    lab.wait_until("the first connection", lambda: _status(lab)["connected"], 20)
    mine = lab.pki.client("gw-01")  # the files the daemon's config names

    # rotated to a certificate the broker does not trust: like any connection failure
    stranger = make_pki(lab.root / "other-pki").client("gw-01")
    shutil.copyfile(stranger.cert_file, mine.cert_file)
    shutil.copyfile(stranger.key_file, mine.key_file)
    _reload(lab, "applied: the MQTT cert, key file rotated on disk")
    cause = f"TLS: the broker rejected our certificate (cert_file {mine.cert_file}"
    lab.wait_until("the rejected certificate in status",
                   lambda: (_status(lab).get("connection_error") or "").startswith(cause), 10)
    assert _status(lab)["connected"] is False
    # retried with backoff, the cause logged once (the lab's daemon logs the repeats at DEBUG)
    lab.wait_until("a retry", lambda: lab.daemon_log().count(cause) >= 2, 10)
    assert len([line for line in lab.daemon_log().splitlines() if cause in line and "WARNING" in line]) == 1

    # rotated again, to a new certificate the broker trusts: connected, and jobs are served
    lab.pki.renew("gw-01")
    _reload(lab, "applied: the MQTT cert, key file rotated on disk")
    lab.wait_until("the connection with the renewed certificate", lambda: _status(lab)["connected"], 10)
    _serves_a_job(lab, "after-rotation")
