"""A real mosquitto broker with mutual TLS and per-thing ACLs, and the test PKI it needs.

Used by the test suite, the benchmarks and the demo. The broker plays AWS IoT Core's
message broker: every client authenticates with a certificate whose CN is its thing
name, and may only touch `$aws/things/<its name>/...` plus the things it is allowed to
act for (a gateway serving proxied things). The AWS IoT emulator connects as the
privileged identity `SERVICE_IDENTITY` and may use every `$aws/` topic.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_IDENTITY = "aws-iot-core-emulator"


@dataclass(frozen=True)
class Identity:
    """A client certificate and its private key, both PEM files."""

    name: str
    cert_file: Path
    key_file: Path


DEFAULT_VALID_DAYS = 30


@dataclass
class Pki:
    """A throw-away certificate authority with a server certificate for localhost."""

    directory: Path
    ca_file: Path
    server: Identity
    _ca_key: ec.EllipticCurvePrivateKey
    _ca_cert: x509.Certificate
    valid_days: int = DEFAULT_VALID_DAYS  # of the certificates it issues

    def client(self, name: str) -> Identity:
        """The identity for `name` (CN = name), made on first use."""
        cert_file = self.directory / f"{name}.cert.pem"
        key_file = self.directory / f"{name}.private.key"
        if not cert_file.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _issue(self._ca_cert, self._ca_key, name, key, server=False, days=self.valid_days)
            _write_key(key_file, key)
            cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Identity(name, cert_file, key_file)

    def renew(self, name: str) -> Identity:
        """A new key and certificate for `name` in place of its files (a certificate rotated on disk)."""
        for path in (self.directory / f"{name}.cert.pem", self.directory / f"{name}.private.key"):
            path.unlink(missing_ok=True)
        return self.client(name)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _issue(
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey,
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
    days: int = DEFAULT_VALID_DAYS,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    # the extensions of RFC 5280 that Python 3.13's strict verification (VERIFY_X509_STRICT) needs
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    is_ca = ca_cert is None
    builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    builder = builder.add_extension(x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=is_ca, crl_sign=is_ca, encipher_only=False, decipher_only=False),
        critical=True)
    if not is_ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path, valid_days: int = DEFAULT_VALID_DAYS) -> Pki:
    """Create a CA (ca.pem, its key ca.key) and a localhost server certificate in `directory`;
    any client identities left there from an earlier CA are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.private.key"):
        stale.unlink()
        stale.with_name(stale.name.removesuffix(".private.key") + ".cert.pem").unlink(missing_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue(None, ca_key, "ota-gateway test CA", ca_key, server=False, days=valid_days)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "ca.key", ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(ca_cert, ca_key, "localhost", server_key, server=True, days=valid_days)
    server = Identity("localhost", directory / "server.pem", directory / "server.key")
    server.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server.key_file, server_key)
    return Pki(directory, ca_file, server, ca_key, ca_cert, valid_days)


def open_pki(directory: Path, valid_days: int = DEFAULT_VALID_DAYS, *, margin_days: int = 1) -> tuple[Pki, bool]:
    """The PKI kept in `directory`, or a new one when there is none or any of its certificates
    expires within `margin_days` (clients then get new identities). Returns (pki, made)."""
    ca_file, ca_key_file = directory / "ca.pem", directory / "ca.key"
    server = Identity("localhost", directory / "server.pem", directory / "server.key")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        certificates = [ca_cert, x509.load_pem_x509_certificate(server.cert_file.read_bytes())]
        certificates += [x509.load_pem_x509_certificate(f.read_bytes()) for f in directory.glob("*.cert.pem")]
        server.key_file.stat()
    except (OSError, ValueError):
        return make_pki(directory, valid_days), True
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or any(
            expires_within(cert, margin_days) for cert in certificates):
        return make_pki(directory, valid_days), True
    return Pki(directory, ca_file, server, ca_key, ca_cert, valid_days), False


def expires_within(cert: x509.Certificate, days: float) -> bool:
    """Whether `cert` is no longer valid `days` from now."""
    end = getattr(cert, "not_valid_after_utc", None)  # cryptography 42+; Debian 12's 38 has naive UTC
    if end is None:
        end = cert.not_valid_after.replace(tzinfo=dt.timezone.utc)
    return end - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=days)


def tls_client(ca_file: Path, identity: Identity, client_id: str | None = None) -> mqtt.Client:
    """A paho client (1.6 or 2.x, MQTT 3.1.1) authenticating with `identity` over mutual TLS."""
    client_id = client_id or identity.name
    if hasattr(mqtt, "CallbackAPIVersion"):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    else:
        client = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(identity.cert_file), str(identity.key_file))
    client.tls_set_context(ctx)
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)), None
    )


@dataclass
class Mosquitto:
    """One mosquitto process on 127.0.0.1 with mTLS, identity = certificate CN.

    `acts_for` maps a client name to the other thing names it may use (a gateway and its
    proxied things). Every client may use `$aws/things/<own name>/#`.
    """

    directory: Path
    pki: Pki
    acts_for: dict[str, list[str]] = field(default_factory=dict)
    port: int = 0
    host: str = "127.0.0.1"
    _proc: subprocess.Popen | None = None

    def _write_config(self) -> Path:
        acl = [f"user {SERVICE_IDENTITY}", "topic readwrite $aws/#", ""]
        for client, things in self.acts_for.items():
            acl.append(f"user {client}")
            acl += [f"topic readwrite $aws/things/{thing}/#" for thing in things]
            acl.append("")
        acl.append("pattern readwrite $aws/things/%u/#")
        acl_file = self.directory / "acl"
        acl_file.write_text("\n".join(acl) + "\n")
        conf = [
            f"listener {self.port} {self.host}",
            "allow_anonymous false",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "max_inflight_messages 100",
            "max_queued_messages 10000",
            "set_tcp_nodelay true",  # else Nagle holds each small request ~40 ms
            f"cafile {self.pki.ca_file}",
            f"certfile {self.pki.server.cert_file}",
            f"keyfile {self.pki.server.key_file}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            f"acl_file {acl_file}",
        ]
        if os.geteuid() == 0:
            conf.insert(0, "user root")
        conf_file = self.directory / "mosquitto.conf"
        conf_file.write_text("\n".join(conf) + "\n")
        return conf_file

    def start(self, timeout: float = 10.0) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        conf = self._write_config()
        with open(self.directory / "mosquitto.log", "ab") as log:
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode}: "
                    + (self.directory / "mosquitto.log").read_text(errors="replace")[-2000:]
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port}")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def freeze(self) -> None:
        """A network blackout: the broker neither answers nor closes connections (SIGSTOP)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def crash(self) -> None:
        """Die without a goodbye (SIGKILL): clients see their connections drop."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop and start again on the same port (a broker restart seen by clients)."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
