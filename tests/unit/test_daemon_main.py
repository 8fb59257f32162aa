"""ota-gatewayd's main(): a configuration that cannot work is one line and exit status 2;
anything else keeps its traceback."""

from __future__ import annotations

import ssl
import textwrap
from pathlib import Path

import pytest

from gatewayd import daemon as daemon_module
from gatewayd.control import ControlError
from gatewayd.mqtt import MqttError
from pem_files import pem, write_pem


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    write_pem(tmp_path / "ca.pem", pem().ca)
    write_pem(tmp_path / "gw.cert.pem", pem().cert)
    write_pem(tmp_path / "gw.key", pem().key, 0o600)
    path = tmp_path / "gateway.toml"
    path.write_text(textwrap.dedent(f"""\
        [gateway]
        thing_name = "gw-01"
        state_dir = "{tmp_path}/state"
        control_socket = "{tmp_path}/run/control.sock"
        [mqtt]
        endpoint = "localhost"
        ca_file = "ca.pem"
        cert_file = "gw.cert.pem"
        key_file = "gw.key"
        """))
    return path


class FailingDaemon:
    """Stands in for Daemon: built, or run, it raises what the test gives it."""

    def __init__(self, on_build: BaseException | None = None, on_run: BaseException | None = None) -> None:
        self.on_build, self.on_run = on_build, on_run

    def __call__(self, _config: object, _log_level: str | None = None) -> "FailingDaemon":
        if self.on_build is not None:
            raise self.on_build
        return self

    async def run(self, _path: Path) -> int:
        if self.on_run is not None:
            raise self.on_run
        return 0


def _tls_error() -> MqttError:
    try:
        raise MqttError("cannot load TLS files") from ssl.SSLError(116, "[X509: KEY_VALUES_MISMATCH] key values mismatch")
    except MqttError as e:
        return e


@pytest.mark.parametrize("failing,key,reason", [
    (FailingDaemon(on_build=OSError(13, "Permission denied", "{tmp}/state")), "[gateway] state_dir",
     "cannot open the state database in {tmp}/state: Permission denied"),
    (FailingDaemon(on_run=ControlError("{tmp}/run/control.sock exists and is not a socket")),
     "[gateway] control_socket", "cannot listen on {tmp}/run/control.sock: {tmp}/run/control.sock exists and is "
                                 "not a socket"),
    (FailingDaemon(on_run=OSError(30, "Read-only file system", "{tmp}/run")), "[gateway] control_socket",
     "cannot listen on {tmp}/run/control.sock: Read-only file system"),
    (FailingDaemon(on_run=_tls_error()), "[mqtt] cert_file",
     "the TLS library refuses ca_file {tmp}/ca.pem, cert_file {tmp}/gw.cert.pem and key_file {tmp}/gw.key: "
     "[X509: KEY_VALUES_MISMATCH] key values mismatch"),
])
def test_what_only_starting_finds_is_one_line_and_exit_2(config_path: Path, monkeypatch, capsys,
                                                         failing: FailingDaemon, key: str, reason: str) -> None:
    tmp = str(config_path.parent)
    for error in (failing.on_build, failing.on_run):
        if isinstance(error, OSError) and error.filename:
            error.filename = error.filename.format(tmp=tmp)
        elif isinstance(error, ControlError):
            error.args = (error.args[0].format(tmp=tmp),)
    monkeypatch.setattr(daemon_module, "Daemon", failing)
    assert daemon_module.main(["--config", str(config_path)]) == 2
    assert capsys.readouterr().err == f"ota-gatewayd: not starting: {config_path}: {key}: {reason.format(tmp=tmp)}\n"


@pytest.mark.parametrize("failing", [
    FailingDaemon(on_build=RuntimeError("a bug")),
    FailingDaemon(on_run=OSError(5, "Input/output error", "/somewhere/else")),
    FailingDaemon(on_run=MqttError("no PUBACK within 10 s")),
])
def test_anything_else_keeps_its_traceback(config_path: Path, monkeypatch, failing: FailingDaemon) -> None:
    monkeypatch.setattr(daemon_module, "Daemon", failing)
    with pytest.raises((RuntimeError, OSError, MqttError)):
        daemon_module.main(["--config", str(config_path)])


def test_a_configuration_with_problems_is_one_line_each(tmp_path: Path, capsys) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nthing_name = "gw-01"\nbogus = 1\n')
    assert daemon_module.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ota-gatewayd: not starting: {path}: [gateway] bogus: unknown key",
        f"ota-gatewayd: not starting: {path}: [mqtt] endpoint: required key is missing",
        f"ota-gatewayd: not starting: {path}: [mqtt] ca_file: required key is missing",
        f"ota-gatewayd: not starting: {path}: [mqtt] cert_file: required key is missing",
        f"ota-gatewayd: not starting: {path}: [mqtt] key_file: required key is missing",
    ]
