"""`ota-gatewayctl check-config --online`: reach the endpoint as the daemon would and say, in one
sentence naming the key at fault, what failed: the name (DNS), the port (refused, no answer),
the TLS handshake (which side refused which certificate, and why) or MQTT CONNECT.

The TLS context is the daemon's own (`gatewayd.mqtt.tls_context`), so a handshake that
succeeds here succeeds there. MQTT CONNECT is 3.1.1 with the configured client id and a clean
session, followed at once by DISCONNECT.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from .config import Config, MqttConfig, Problem, load_pem_certificates
from .mqtt import tls_context

DEFAULT_TIMEOUT = 10.0  # seconds, for each step
# TLS 1.3: how long to wait after the handshake for the server's verdict on the gateway's certificate
VERDICT_WAIT = 1.0

# OpenSSL's X509_V_ERR_* codes that mean "not signed by a CA we trust"
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}
_HOSTNAME_MISMATCH = {62, 64}
_NOT_YET_VALID, _EXPIRED = 9, 10

# the server's TLS alerts about the gateway's own certificate -> what they say
_CLIENT_CERT_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust the CA that issued it (unknown CA); is the certificate "
                              "registered with this account, or its CA?",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it says the certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it says the certificate was revoked",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it calls the certificate bad (bad certificate alert)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it does not accept the certificate (certificate unknown alert)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "it does not support the certificate (unsupported certificate alert)",
    "TLSV1_ALERT_ACCESS_DENIED": "it denies this certificate access (access denied alert)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it got no certificate from the gateway",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}

_CONNACK_CODES = {1: "unacceptable protocol version", 2: "client identifier rejected", 3: "server unavailable",
                  4: "bad user name or password", 5: "not authorized"}


@dataclass(frozen=True)
class OnlineResult:
    """What --online found: ok, or the step that failed and the key most likely at fault."""

    ok: bool
    step: str  # "dns", "tcp", "tls", "mqtt", or "done"
    key: str  # e.g. "[mqtt] ca_file"; "" when ok
    message: str  # one sentence

    def problem(self, config_path: Path) -> Problem:
        return Problem(config_path, self.key, self.message)

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "step": self.step, "key": self.key, "message": self.message}


class _Failed(Exception):
    def __init__(self, step: str, key: str, message: str) -> None:
        super().__init__(message)
        self.result = OnlineResult(False, step, key, message)


def check_online(config: Config, *, timeout: float = DEFAULT_TIMEOUT, mqtt_connect: bool = True) -> OnlineResult:
    """Resolve the endpoint, connect, do the TLS handshake with the configured CA, certificate and
    key, then (unless `mqtt_connect` is false) MQTT CONNECT; each step bounded by `timeout`."""
    m = config.mqtt
    try:
        addresses = _resolve(m.endpoint, m.port, timeout)
        sock, ip = _connect(addresses, m, timeout)
        with _handshake(sock, m, timeout) as tls:
            if tls.version() == "TLSv1.3":
                _await_verdict(tls, m, min(VERDICT_WAIT, timeout))
            where = f"{m.endpoint}:{m.port} ({ip})"
            if not mqtt_connect:
                return OnlineResult(True, "done", "", f"{where}: {tls.version()} handshake completed; MQTT "
                                    "CONNECT not tried, as ota-gatewayd is running and the broker would drop its "
                                    "connection for one with the same client id")
            _mqtt_connect(tls, m, timeout)
            return OnlineResult(True, "done", "", f"{where}: {tls.version()} handshake completed, and the broker "
                                f"accepted MQTT CONNECT as {m.client_id}")
    except _Failed as failed:
        return failed.result


def daemon_is_running(control_socket: Path) -> bool:
    """Something answers on the daemon's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(control_socket))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------ DNS and TCP


def _resolve(host: str, port: int, timeout: float) -> list[tuple[Any, ...]]:
    """getaddrinfo has no timeout of its own: it runs in a thread that is left behind if it hangs."""
    answer: dict[str, Any] = {}

    def lookup() -> None:
        try:
            answer["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            answer["error"] = e

    thread = threading.Thread(target=lookup, name="resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if "addresses" in answer:
        return answer["addresses"]
    if "error" in answer:
        error = answer["error"]
        raise _Failed("dns", "[mqtt] endpoint", f"the name {host} cannot be resolved: {error.strerror or error}")
    raise _Failed("dns", "[mqtt] endpoint", f"the name {host} was not resolved within {timeout:g} s "
                                            "(is a DNS server reachable?)")


def _connect(addresses: list[tuple[Any, ...]], m: MqttConfig, timeout: float) -> tuple[socket.socket, str]:
    errors: list[tuple[str, OSError]] = []
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock, address[0]
        except OSError as e:
            sock.close()
            errors.append((address[0], e))
    ip, error = errors[0]
    where = f"{m.endpoint} ({ip})"
    more = f" (nor at its {len(errors) - 1} other addresses)" if len(errors) > 1 else ""
    if isinstance(error, ConnectionRefusedError):
        raise _Failed("tcp", "[mqtt] port", f"{where} refused the connection to port {m.port}: nothing "
                                            f"listens there{more}")
    if isinstance(error, TimeoutError):
        raise _Failed("tcp", "[mqtt] endpoint", f"{where} did not answer on port {m.port} within {timeout:g} s "
                                                f"(a firewall, or the wrong host or port?){more}")
    raise _Failed("tcp", "[mqtt] endpoint", f"cannot reach {where} on port {m.port}: "
                                            f"{error.strerror or error}{more}")


# ------------------------------------------------------------------ TLS


def _handshake(sock: socket.socket, m: MqttConfig, timeout: float) -> ssl.SSLSocket:
    context = tls_context(str(m.ca_file), str(m.cert_file), str(m.key_file), m.port)
    sock.settimeout(timeout)
    try:
        return context.wrap_socket(sock, server_hostname=m.endpoint)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise _Failed("tls", *_server_certificate_refused(e, m)) from None
    except ssl.SSLError as e:
        sock.close()
        raise _Failed("tls", *_tls_refused(e, m, "during the TLS handshake")) from None
    except TimeoutError:
        sock.close()
        raise _Failed("tls", "[mqtt] port", f"{m.endpoint}:{m.port} accepted the connection but did not complete "
                                            f"a TLS handshake within {timeout:g} s (is it a TLS port?)") from None
    except OSError as e:
        sock.close()
        raise _Failed("tls", "[mqtt] endpoint", f"{m.endpoint}:{m.port} dropped the connection during the TLS "
                                                f"handshake: {e.strerror or e}") from None


def _await_verdict(tls: ssl.SSLSocket, m: MqttConfig, wait: float) -> None:
    """Under TLS 1.3 the server judges the gateway's certificate after the client's side of the
    handshake is done, and says so a round trip later. Listen that long before sending
    anything: data sent to a server that already closed draws a reset, which swallows the alert."""
    tls.settimeout(wait)
    try:
        data = tls.recv(1)
    except TimeoutError:
        return  # nothing to say: an MQTT server waits for CONNECT
    except ssl.SSLError as e:
        raise _Failed("tls", *_tls_refused(e, m, "after the TLS handshake")) from None
    except OSError as e:
        data = b"" if isinstance(e, ConnectionResetError) else b"?"
    if data:
        raise _Failed("mqtt", "[mqtt] port", f"{m.endpoint}:{m.port} spoke before MQTT CONNECT: not an MQTT broker")
    raise _Failed("tls", "[mqtt] cert_file", (f"{m.endpoint}:{m.port} closed the connection right after the TLS "
                                              f"handshake; brokers do this to a certificate they refuse "
                                              f"({m.cert_file}){_expiry_note(m.cert_file)}"))


def _server_certificate_refused(e: ssl.SSLCertVerificationError, m: MqttConfig) -> tuple[str, str]:
    failed = f"the TLS handshake with {m.endpoint}:{m.port} failed"
    if e.verify_code in _UNKNOWN_ISSUER:
        return "[mqtt] ca_file", (f"{failed}: the server's certificate is not signed by a CA in {m.ca_file} "
                                  "(unknown CA)")
    if e.verify_code in _HOSTNAME_MISMATCH:
        return "[mqtt] endpoint", (f"{failed}: the server's certificate is not for {m.endpoint} "
                                   "(host name mismatch)")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if e.verify_code == _EXPIRED:
        return "[mqtt] endpoint", (f"{failed}: the server's certificate has expired (or this machine's "
                                   f"clock is wrong: it says {now})")
    if e.verify_code == _NOT_YET_VALID:
        return "[mqtt] endpoint", (f"{failed}: the server's certificate is not valid yet (is this machine's "
                                   f"clock right? it says {now})")
    return "[mqtt] ca_file", f"{failed}: the server's certificate was refused: {e.verify_message}"


def _tls_refused(e: ssl.SSLError, m: MqttConfig, when: str) -> tuple[str, str]:
    reason = e.reason or ""
    if reason in _CLIENT_CERT_ALERTS:
        return "[mqtt] cert_file", (f"the server refused the gateway's certificate {m.cert_file} {when}: "
                                    f"{_CLIENT_CERT_ALERTS[reason]}{_expiry_note(m.cert_file)}")
    if reason in _NOT_TLS:
        return "[mqtt] port", f"{m.endpoint}:{m.port} does not speak TLS ({reason})"
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        return "[mqtt] cert_file", (f"the server ended the TLS handshake with a handshake failure alert: it "
                                    f"refused the gateway's certificate {m.cert_file}, or shares no TLS version "
                                    f"or cipher with it{_expiry_note(m.cert_file)}")
    if isinstance(e, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "[mqtt] cert_file", (f"{m.endpoint}:{m.port} closed the connection {when} without a word; "
                                    f"brokers do this to a certificate they refuse ({m.cert_file})"
                                    f"{_expiry_note(m.cert_file)}")
    return "[mqtt] endpoint", f"the TLS connection with {m.endpoint}:{m.port} failed {when}: {reason or e}"


def _expiry_note(cert_file: Path) -> str:
    try:
        cert = load_pem_certificates(cert_file.read_bytes())[0]
    except (OSError, ValueError):
        return ""
    now = dt.datetime.now(dt.timezone.utc)
    # cryptography < 42 has only the naive (UTC) properties
    after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=dt.timezone.utc)
    before = getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before.replace(tzinfo=dt.timezone.utc)
    if after < now:
        return f"; the certificate expired on {after:%Y-%m-%d}"
    if before > now:
        return f"; the certificate is valid only from {before:%Y-%m-%d}"
    return ""


# ------------------------------------------------------------------ MQTT


def _mqtt_connect(tls: ssl.SSLSocket, m: MqttConfig, timeout: float) -> None:
    """CONNECT, CONNACK, DISCONNECT. Under TLS 1.3 the server judges the gateway's certificate
    after the client's side of the handshake is done, so a refusal can first show here."""
    tls.settimeout(timeout)
    as_who = f"MQTT CONNECT as {m.client_id}"
    try:
        tls.sendall(_connect_packet(m.client_id, m.keepalive))
        connack = _read_exactly(tls, 4)
    except ssl.SSLError as e:
        if e.reason not in _CLIENT_CERT_ALERTS and e.reason != "SSLV3_ALERT_HANDSHAKE_FAILURE":
            raise _closed_after(as_who) from None
        raise _Failed("tls", *_tls_refused(e, m, f"after {as_who}")) from None
    except TimeoutError:
        raise _Failed("mqtt", "[mqtt] endpoint", f"{m.endpoint}:{m.port} did not answer {as_who} within "
                                                 f"{timeout:g} s") from None
    except OSError:
        raise _closed_after(as_who) from None
    if connack[:2] != b"\x20\x02":
        raise _Failed("mqtt", "[mqtt] port", f"{m.endpoint}:{m.port} does not speak MQTT (it answered CONNECT "
                                             f"with {connack.hex()})")
    if connack[3] != 0:
        why = _CONNACK_CODES.get(connack[3], "unknown reason")
        raise _Failed("mqtt", "[mqtt] client_id", f"the broker refused {as_who}: {why} (CONNACK code {connack[3]})")
    try:
        tls.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        pass


def _closed_after(as_who: str) -> _Failed:
    """EOF or reset without a CONNACK: AWS IoT's answer to a certificate or a policy it refuses."""
    return _Failed("mqtt", "[mqtt] client_id", (
        f"the broker closed the connection after {as_who}; AWS IoT does this when the certificate is not "
        "registered and active, or its policy does not allow iot:Connect for this client id"))


def _connect_packet(client_id: str, keepalive: int) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, no will, no user name."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big") + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + remaining_length(len(body)) + body


def remaining_length(n: int) -> bytes:
    """MQTT's variable byte integer (a packet's remaining length)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_exactly(tls: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = tls.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("end of stream")
        data += chunk
    return data
