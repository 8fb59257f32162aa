"""Why a connection to the broker failed, in one sentence (gatewayd.mqtt.connection_failure),
said once per change of cause (ConnectionTrouble). The real broker cases are in
tests/e2e/test_connection_causes.py."""

from __future__ import annotations

import logging
import socket
import ssl

import pytest

from gatewayd.mqtt import ConnectionTrouble, connection_failure


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    e = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    e.verify_code, e.verify_message = code, message
    return e


def _alert(reason: str) -> ssl.SSLError:
    e = ssl.SSLError(1, f"[SSL: {reason}] tlsv13 alert")
    e.reason = reason
    return e


@pytest.mark.parametrize("exc, cause", [
    (socket.gaierror(-2, "Name or service not known"), "cannot resolve broker.example (DNS: Name or service not known)"),
    (ConnectionRefusedError(111, "Connection refused"), "broker.example:8883 refused the connection"),
    (TimeoutError("timed out"), "no answer from broker.example:8883 (timed out"),
    (_verify_error(20, "unable to get local issuer certificate"),
     "TLS: the broker's certificate is not signed by a CA in ca_file /etc/ca.pem (unknown CA"),
    (_verify_error(62, "Hostname mismatch, certificate is not valid for 'broker.example'."),
     "TLS: the broker's certificate is not for broker.example (host name mismatch"),
    (_verify_error(10, "certificate has expired"), "TLS: the broker's certificate has expired"),
    (_alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "TLS: the broker rejected our certificate (cert_file /etc/gw.pem"),
    (_alert("SSLV3_ALERT_BAD_CERTIFICATE"), "TLS: the broker rejected our certificate (cert_file /etc/gw.pem"),
    ("failed to receive on socket: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca",
     "TLS: the broker rejected our certificate (cert_file /etc/gw.pem"),
    ("Unspecified error", "broker.example:8883 closed the connection before MQTT was up (Unspecified error)"),
])
def test_each_cause_is_named(exc: BaseException | str, cause: str) -> None:
    assert connection_failure(exc, "broker.example", 8883, "/etc/ca.pem", "/etc/gw.pem").startswith(cause)


def test_a_cause_is_logged_once_until_it_changes_and_a_connack_refusal_wins(caplog) -> None:
    trouble = ConnectionTrouble("broker.example", 8883)
    with caplog.at_level(logging.DEBUG, logger="gatewayd.mqtt"):
        for delay in (1.0, 2.0, 4.0):
            trouble.failed("cannot resolve broker.example (DNS: x)", delay)
        trouble.refused = "the broker refused the connection (CONNACK: Not authorized)"
        trouble.failed("broker.example:8883 closed the connection before MQTT was up (Unspecified error)", 8.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["cannot resolve broker.example (DNS: x); retrying in 1.0 s",
                        "the broker refused the connection (CONNACK: Not authorized); retrying in 8.0 s"]
    assert trouble.cause == "the broker refused the connection (CONNACK: Not authorized)"
    trouble.connected()
    assert trouble.cause is None
