"""Every configuration mistake of issue 12: check-config names it (file, key, reason), and the
daemon refuses to start on it with that same line, exit status 2 and no traceback, so that
systemd (RestartPreventExitStatus=2) does not restart it every 5 s."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from gatewayd.emulators.broker import Pki
from gatewayd.emulators.signing import make_signer

GOOD = """\
[gateway]
thing_name = "gw-01"
state_dir = "{folder}/state"
control_socket = "{folder}/run/control.sock"

[mqtt]
endpoint = "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com"
ca_file = "ca.pem"
cert_file = "gw-01.cert.pem"
key_file = "gw-01.private.key"

[signing]
certificates = {{ "ota_signer.pem" = "signer.pem" }}

[[device]]
name = "pump"
transport = "uart"
port = "/dev/ttyACM-ota-test-pump"

[[device]]
name = "tank"
transport = "ble"
address = "C4:3B:21:9A:00:17"
"""


@dataclass(frozen=True)
class Setup:
    folder: Path
    path: Path  # gateway.toml
    pki: Pki

    def edit(self, old: str, new: str) -> None:
        text = self.path.read_text()
        assert old in text
        self.path.write_text(text.replace(old, new))


@dataclass(frozen=True)
class Mistake:
    make: Callable[[Setup], None]
    key: str  # the key the line names
    reason: str  # how the reason begins, with {folder} for the setup's folder
    at_start: bool = False  # found only by starting (check-config cannot see it)


def _mismatched_key(s: Setup) -> None:
    (s.folder / "gw-01.private.key").write_bytes(s.pki.client("other").key_file.read_bytes())


def _text_signer(s: Setup) -> None:
    (s.folder / "signer.pem").write_text("the signer's certificate is on the wiki\n")


def _control_socket_is_a_file(s: Setup) -> None:
    (s.folder / "run").mkdir()
    (s.folder / "run" / "control.sock").write_text("not a socket\n")


MISTAKES = {
    "certificate and key that do not match": Mistake(
        _mismatched_key, "[mqtt] key_file", "private key {folder}/gw-01.private.key does not belong to the certificate "
        "{folder}/gw-01.cert.pem of [mqtt] cert_file: their public keys differ"),
    "a text file as a signing certificate": Mistake(
        _text_signer, '[signing] certificates."ota_signer.pem"', "{folder}/signer.pem is not a certificate with an "
        "EC or RSA public key"),
    "a private key as ca_file": Mistake(
        lambda s: s.edit('ca_file = "ca.pem"', 'ca_file = "gw-01.private.key"'), "[mqtt] ca_file",
        "{folder}/gw-01.private.key holds a private key, not CA certificates"),
    "a certificate as key_file": Mistake(
        lambda s: s.edit('key_file = "gw-01.private.key"', 'key_file = "ca.pem"'), "[mqtt] key_file",
        "{folder}/ca.pem holds a certificate, not a private key"),
    "the shipped placeholder endpoint": Mistake(
        lambda s: s.edit("a1b2c3d4e5f6g7-ats", "abc123-ats"), "[mqtt] endpoint",
        '"abc123-ats.iot.eu-west-1.amazonaws.com" is the example of the shipped file'),
    "two devices on one port": Mistake(
        lambda s: s.path.write_text(s.path.read_text() + '\n[[device]]\nname = "fan"\ntransport = "uart"\n'
                                                          'port = "/dev/ttyACM-ota-test-pump"\n'),
        "device[3] (fan) port", '"/dev/ttyACM-ota-test-pump" is already the port of device[1] (pump)'),
    "a malformed BLE address": Mistake(
        lambda s: s.edit('"C4:3B:21:9A:00:17"', '"C4:3B:21:9A:00"'), "device[2] (tank) address",
        '"C4:3B:21:9A:00" is not allowed: use six pairs of hexadecimal digits'),
    "a state_dir that cannot be made": Mistake(
        lambda s: s.edit('state_dir = "{}/state"'.format(s.folder), 'state_dir = "/proc/ota-gateway-test"'),
        "[gateway] state_dir", "cannot open the state database in /proc/ota-gateway-test: ", at_start=True),
    "a control_socket path that is a file": Mistake(
        _control_socket_is_a_file, "[gateway] control_socket",
        "cannot listen on {folder}/run/control.sock: {folder}/run/control.sock exists and is not a socket",
        at_start=True),
}


@pytest.fixture
def setup(pki: Pki) -> Iterator[Setup]:
    """A good configuration, in a folder the daemon's user may enter (check-config run as root
    opens the files as that user when the account exists)."""
    folder = Path(tempfile.mkdtemp(prefix="ota-refuse-test-"))
    os.chmod(folder, 0o755)
    try:
        identity = pki.client("gw-01")
        shutil.copy(pki.ca_file, folder / "ca.pem")
        shutil.copy(identity.cert_file, folder / "gw-01.cert.pem")
        shutil.copy(identity.key_file, folder / "gw-01.private.key")
        shutil.copy(make_signer(folder / "signer").cert_file, folder / "signer.pem")
        _readable_by_the_daemons_group(folder / "gw-01.private.key")
        path = folder / "gateway.toml"
        path.write_text(GOOD.format(folder=folder))
        yield Setup(folder, path, pki)
    finally:
        shutil.rmtree(folder)


def _readable_by_the_daemons_group(key: Path) -> None:
    os.chmod(key, 0o640)
    try:
        gid = pwd.getpwnam("ota-gateway").pw_gid
    except KeyError:
        return
    if os.geteuid() == 0:
        os.chown(key, 0, gid)


def _command(variable: str, module: str) -> list[str]:
    """OTA_GATEWAYD / OTA_GATEWAYCTL run another build, e.g. the installed one (as lab.py does)."""
    return os.environ.get(variable, "").split() or [sys.executable, "-m", module]


def test_the_good_configuration_passes_check_config(setup: Setup) -> None:
    result = subprocess.run([*_command("OTA_GATEWAYCTL", "gatewayd.ctl"), "check-config", str(setup.path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(MISTAKES))
def test_check_config_names_it_and_the_daemon_exits_2_with_that_line(setup: Setup, name: str) -> None:
    mistake = MISTAKES[name]
    mistake.make(setup)
    line = f"{setup.path}: {mistake.key}: {mistake.reason.format(folder=setup.folder)}"

    daemon = subprocess.run([*_command("OTA_GATEWAYD", "gatewayd.daemon"), "--config", str(setup.path)],
                            capture_output=True, text=True, timeout=60)
    assert daemon.returncode == 2, daemon.stderr
    assert len(daemon.stderr.splitlines()) == 1, daemon.stderr
    assert daemon.stderr.startswith(f"ota-gatewayd: not starting: {line}")
    if mistake.at_start:
        return
    check = subprocess.run([*_command("OTA_GATEWAYCTL", "gatewayd.ctl"), "check-config", str(setup.path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert check.stdout.startswith(line)
    assert daemon.stderr == f"ota-gatewayd: not starting: {check.stdout}"


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming the daemon's user needs root")
def test_a_key_the_daemons_user_cannot_read(setup: Setup) -> None:
    """The daemon, as its user, refuses the key; check-config, as root, says so beforehand."""
    key = setup.folder / "gw-01.private.key"
    os.chown(key, 0, 0)
    os.chmod(key, 0o600)
    try:
        user = pwd.getpwnam("ota-gateway")
    except KeyError:
        user = pwd.getpwnam("nobody")
    else:
        check = subprocess.run([*_command("OTA_GATEWAYCTL", "gatewayd.ctl"), "check-config", str(setup.path)],
                               capture_output=True, text=True, timeout=60)
        assert (check.returncode, check.stdout) == (1, (
            f"{setup.path}: [mqtt] key_file: private key {key} cannot be read by user ota-gateway, whom the daemon "
            f"runs as (owner root, group root, mode 0600); e.g. chgrp ota-gateway {key} and chmod g+rX {key}\n"))

    code, stderr = _daemon_main_as(user, ["--config", str(setup.path)])
    assert (code, stderr) == (2, f"ota-gatewayd: not starting: {setup.path}: [mqtt] key_file: cannot read {key}: "
                                 "Permission denied\n")


def _daemon_main_as(user: pwd.struct_passwd, argv: list[str]) -> tuple[int, str]:
    """ota-gatewayd's main() in a child process that has become `user`, as systemd's User= makes
    it. Forked rather than run: this interpreter may sit where that user cannot execute it."""
    from gatewayd.daemon import main

    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.close(reader)
            os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            sys.stderr = os.fdopen(writer, "w")
            code = main(argv)
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stderr
