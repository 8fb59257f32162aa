"""`ota-gatewayctl check-config --online` against a real mosquitto with mutual TLS: each failure
is one line naming the file, the key at fault and the cause."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gatewayd import config as config_module
from gatewayd.ctl import main as ctl_main
from gatewayd.emulators.broker import Identity, Mosquitto, Pki, free_port, make_pki


@pytest.fixture(autouse=True)
def no_daemon_user(monkeypatch) -> None:
    """check-config in this process reads the files as whoever runs the tests (as root on a
    machine with the ota-gateway account it would open them as that user, and tmp_path is
    under a folder of root's alone)."""
    monkeypatch.setattr(config_module, "DAEMON_USER", "no-such-user-for-ota-gateway")


def write_config(folder: Path, *, endpoint: str, port: int, ca: Path, identity: Identity,
                 control_socket: Path | None = None) -> Path:
    key = folder / "gw.private.key"
    shutil.copy(identity.key_file, key)
    os.chmod(key, 0o600)
    path = folder / "gateway.toml"
    path.write_text(f"""\
[gateway]
thing_name = "gw-01"
control_socket = "{control_socket or folder / 'no-daemon.sock'}"
[mqtt]
endpoint = "{endpoint}"
port = {port}
ca_file = "{ca}"
cert_file = "{identity.cert_file}"
key_file = "{key}"
""")
    return path


def check_online(path: Path, capsys, *options: str) -> tuple[int, list[str]]:
    code = ctl_main(["check-config", "--online", *options, str(path)])
    return code, capsys.readouterr().out.splitlines()


def issue(pki: Pki, folder: Path, name: str, *, server: bool, days: tuple[int, int] = (-1, 30)) -> Identity:
    """A certificate from the test CA that make_pki does not make: for another host name, or
    outside its validity."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(pki._ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + dt.timedelta(days=days[0]))
               .not_valid_after(now + dt.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki._ca_key.public_key()),
                              critical=False)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    folder.mkdir(parents=True, exist_ok=True)
    identity = Identity(name, folder / f"{name}.cert.pem", folder / f"{name}.key")
    identity.cert_file.write_bytes(builder.sign(pki._ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    identity.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    os.chmod(identity.key_file, 0o600)
    return identity


@pytest.fixture
def broker_with_server_cert(tmp_path: Path, pki: Pki) -> Iterator:
    """Start a mosquitto of the test PKI whose server certificate is `issue(...)`'s."""
    started: list[Mosquitto] = []

    def start(identity: Identity) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker-{identity.name}", dataclasses.replace(pki, server=identity))
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def test_a_good_configuration_connects(tmp_path: Path, broker: Mosquitto, pki: Pki, capsys) -> None:
    path = write_config(tmp_path, endpoint="localhost", port=broker.port, ca=pki.ca_file, identity=pki.client("gw-01"))
    code, lines = check_online(path, capsys)
    assert code == 0, lines
    assert lines[0].startswith(f"{path}: thing gw-01, broker localhost:{broker.port}")
    assert re.fullmatch(rf"online: localhost:{broker.port} \(127\.0\.0\.1\): TLSv1\.[23] handshake completed, and "
                        r"the broker accepted MQTT CONNECT as gw-01", lines[1]), lines[1]


def test_a_good_configuration_as_json(tmp_path: Path, broker: Mosquitto, pki: Pki, capsys) -> None:
    path = write_config(tmp_path, endpoint="localhost", port=broker.port, ca=pki.ca_file, identity=pki.client("gw-01"))
    assert ctl_main(["check-config", "--online", "--json", str(path)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is True and answer["problems"] == []
    assert answer["online"]["ok"] is True and answer["online"]["step"] == "done"


def test_a_ca_file_that_did_not_sign_the_servers_certificate(tmp_path: Path, broker: Mosquitto, pki: Pki,
                                                             capsys) -> None:
    other_ca = make_pki(tmp_path / "other").ca_file
    path = write_config(tmp_path, endpoint="localhost", port=broker.port, ca=other_ca, identity=pki.client("gw-01"))
    assert check_online(path, capsys) == (1, [
        f"{path}: thing gw-01, broker localhost:{broker.port}, 0 devices, 0 signing certificates",
        f"{path}: [mqtt] ca_file: the TLS handshake with localhost:{broker.port} failed: the server's certificate "
        f"is not signed by a CA in {other_ca} (unknown CA)"])


def test_a_server_certificate_for_another_host_name(tmp_path: Path, pki: Pki, broker_with_server_cert,
                                                    capsys) -> None:
    broker = broker_with_server_cert(issue(pki, tmp_path / "certs", "broker.example", server=True))
    path = write_config(tmp_path, endpoint="localhost", port=broker.port, ca=pki.ca_file, identity=pki.client("gw-01"))
    code, lines = check_online(path, capsys)
    assert (code, lines[1]) == (1, f"{path}: [mqtt] endpoint: the TLS handshake with localhost:{broker.port} "
                                   "failed: the server's certificate is not for localhost (host name mismatch)")


def test_an_expired_server_certificate(tmp_path: Path, pki: Pki, broker_with_server_cert, capsys) -> None:
    broker = broker_with_server_cert(issue(pki, tmp_path / "certs", "localhost", server=True, days=(-60, -30)))
    path = write_config(tmp_path, endpoint="localhost", port=broker.port, ca=pki.ca_file, identity=pki.client("gw-01"))
    code, lines = check_online(path, capsys)
    assert code == 1
    assert lines[1].startswith(f"{path}: [mqtt] endpoint: the TLS handshake with localhost:{broker.port} failed: "
                               "the server's certificate has expired (or this machine's clock is wrong: it says ")


def test_a_client_certificate_of_a_ca_the_broker_does_not_trust(tmp_path: Path, broker: Mosquitto, pki: Pki,
                                                                capsys) -> None:
    stranger = make_pki(tmp_path / "other").client("gw-01")
    path = write_config(tmp_path, endpoint="localhost", port=broker.port, ca=pki.ca_file, identity=stranger)
    code, lines = check_online(path, capsys)
    assert code == 1
    assert re.fullmatch(
        rf"{re.escape(str(path))}: \[mqtt\] cert_file: the server refused the gateway's certificate "
        rf"{re.escape(str(stranger.cert_file))} (during|after) the TLS handshake: it does not trust the CA that "
        r"issued it \(unknown CA\); is the certificate registered with this account, or its CA\?", lines[1]), lines[1]


def test_an_expired_client_certificate(tmp_path: Path, broker: Mosquitto, pki: Pki, capsys) -> None:
    expired = issue(pki, tmp_path / "certs", "gw-01", server=False, days=(-60, -30))
    path = write_config(tmp_path, endpoint="localhost", port=broker.port, ca=pki.ca_file, identity=expired)
    code, lines = check_online(path, capsys)
    assert code == 1
    assert lines[1].startswith(f"{path}: [mqtt] cert_file: the server refused the gateway's certificate "
                               f"{expired.cert_file} ")
    assert lines[1].endswith(f"it says the certificate has expired; the certificate expired on "
                             f"{dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30):%Y-%m-%d}")


def test_a_port_nothing_listens_on(tmp_path: Path, pki: Pki, capsys) -> None:
    port = free_port()
    path = write_config(tmp_path, endpoint="localhost", port=port, ca=pki.ca_file, identity=pki.client("gw-01"))
    code, lines = check_online(path, capsys)
    assert (code, lines[1:]) == (1, [f"{path}: [mqtt] port: localhost (127.0.0.1) refused the connection to port "
                                     f"{port}: nothing listens there"])


def test_a_host_name_that_does_not_resolve(tmp_path: Path, pki: Pki, capsys) -> None:
    # .invalid never resolves (RFC 6761); without a reachable DNS server the bound ends it
    path = write_config(tmp_path, endpoint="no-such-broker.invalid", port=8883, ca=pki.ca_file,
                        identity=pki.client("gw-01"))
    code, lines = check_online(path, capsys, "--timeout", "3")
    assert code == 1
    assert re.fullmatch(rf"{re.escape(str(path))}: \[mqtt\] endpoint: the name no-such-broker\.invalid "
                        r"(cannot be resolved: .+|was not resolved within 3 s \(is a DNS server reachable\?\))",
                        lines[1]), lines[1]


def test_a_port_that_accepts_but_never_speaks_tls(tmp_path: Path, pki: Pki, capsys) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        path = write_config(tmp_path, endpoint="localhost", port=port, ca=pki.ca_file, identity=pki.client("gw-01"))
        code, lines = check_online(path, capsys, "--timeout", "1")
    assert (code, lines[1:]) == (1, [f"{path}: [mqtt] port: localhost:{port} accepted the connection but did not "
                                     "complete a TLS handshake within 1 s (is it a TLS port?)"])


def test_no_mqtt_connect_while_the_daemon_is_running(tmp_path: Path, broker: Mosquitto, pki: Pki,
                                                     capsys) -> None:
    """The broker would drop the daemon's session for this one (same client id)."""
    sock_path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as daemon:
        daemon.bind(str(sock_path))
        daemon.listen(1)
        path = write_config(tmp_path, endpoint="localhost", port=broker.port, ca=pki.ca_file,
                            identity=pki.client("gw-01"), control_socket=sock_path)
        code, lines = check_online(path, capsys)
    assert code == 0
    assert lines[1].endswith("handshake completed; MQTT CONNECT not tried, as ota-gatewayd is running and the "
                             "broker would drop its connection for one with the same client id")


def test_online_is_not_tried_on_a_configuration_with_problems(tmp_path: Path, pki: Pki, capsys) -> None:
    path = write_config(tmp_path, endpoint="localhost", port=1, ca=pki.ca_file, identity=pki.client("gw-01"))
    path.write_text(path.read_text().replace(f'ca_file = "{pki.ca_file}"', f'ca_file = "{tmp_path}/gw.private.key"'))
    code, lines = check_online(path, capsys)
    assert (code, lines) == (1, [f"{path}: [mqtt] ca_file: {tmp_path}/gw.private.key holds a private key, not CA "
                                 "certificates"])


def test_the_console_script(broker: Mosquitto, pki: Pki) -> None:
    """As the operator runs it: a process, with the files where the daemon's user may read them."""
    folder = Path(tempfile.mkdtemp(prefix="ota-online-test-"))
    try:
        os.chmod(folder, 0o755)
        identity = pki.client("gw-01")
        for file in (pki.ca_file, identity.cert_file):
            shutil.copy(file, folder)
        path = write_config(folder, endpoint="localhost", port=broker.port, ca=folder / pki.ca_file.name,
                            identity=Identity("gw-01", folder / identity.cert_file.name, identity.key_file))
        _let_the_daemon_read(folder / "gw.private.key")
        command = os.environ.get("OTA_GATEWAYCTL", "").split() or [sys.executable, "-m", "gatewayd.ctl"]
        result = subprocess.run([*command, "check-config", "--online", str(path)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "handshake completed, and the broker accepted MQTT CONNECT as gw-01" in result.stdout
    finally:
        shutil.rmtree(folder)


def _let_the_daemon_read(key: Path) -> None:
    """The packaged layout: root's, readable by the ota-gateway group (when that account exists)."""
    import pwd

    try:
        gid = pwd.getpwnam("ota-gateway").pw_gid
    except KeyError:
        return
    if os.geteuid() == 0:
        os.chown(key, 0, gid)
        os.chmod(key, 0o640)
