"""Connection failures name their cause (issue 12, item 1): in the log (once per change of
cause, not at every retry), in `status` and `status --json`, with the real broker."""

from __future__ import annotations

import json
import socket
import time

import pytest

from gatewayd.display import format_status
from gatewayd.emulators.broker import make_pki


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _break(lab, how: str) -> str:
    """Point the gateway's [mqtt] section at a mistake; the start of the cause it must give."""
    other = make_pki(lab.root / "other-pki")
    mqtt = lab.config.setdefault("mqtt", {})
    if how == "unknown CA":
        mqtt["ca_file"] = str(other.ca_file)
        return "TLS: the broker's certificate is not signed by a CA in ca_file"
    if how == "host name mismatch":
        mqtt["endpoint"] = "127.1"  # 127.0.0.1 to the resolver, not a name the broker's certificate holds
        return "TLS: the broker's certificate is not for 127.1 (host name mismatch"
    if how == "refused port":
        mqtt["port"] = _free_port()
        return f"127.0.0.1:{mqtt['port']} refused the connection"
    if how == "unknown host":
        mqtt["endpoint"] = "no-such-broker.invalid"
        return "cannot resolve no-such-broker.invalid (DNS: "
    if how == "client certificate rejected":
        stranger = other.client("gw-01")
        mqtt.update(cert_file=str(stranger.cert_file), key_file=str(stranger.key_file))
        return "TLS: the broker rejected our certificate (cert_file "
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["unknown CA", "host name mismatch", "refused port", "unknown host",
                                 "client certificate rejected"])
def test_a_connection_failure_names_its_cause_in_the_log_and_in_status(lab, how):
    lab.start_cloud()
    cause = _break(lab, how)
    lab.start_daemon()
    lab.wait_control()
    lab.wait_until(f"the cause in status ({how})", lambda: (json.loads(lab.ctl("status", "--json").stdout)
                                                            .get("connection_error") or "").startswith(cause), 30)
    status = json.loads(lab.ctl("status", "--json").stdout)
    assert status["connected"] is False
    text = format_status(status)[0]  # what `status` shows on a terminal
    assert text.startswith(f"AWS IoT: not connected ({cause}"), text
    time.sleep(2.5)  # more retries: the cause is logged once, not at each
    logged = [line for line in lab.daemon_log().splitlines() if cause in line and "WARNING" in line]
    assert len(logged) == 1, logged
