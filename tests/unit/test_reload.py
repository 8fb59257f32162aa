"""What a reload applies and what it leaves for a restart (gatewayd.reload)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from pathlib import Path

import pytest

from gatewayd import reload
from gatewayd.config import Config, load_config
from gatewayd.daemon import Daemon
from gatewayd.emulators.broker import make_pki
from gatewayd.mqtt import ConnectionSettings, MqttError
from test_ctl import write_valid_config


def _config(tmp_path: Path) -> Config:
    return load_config(write_valid_config(tmp_path / "etc"))


def _with(config: Config, section: str, **values: object) -> Config:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})


def test_settings_a_running_daemon_takes_are_applied_and_the_rest_wait_for_a_restart(tmp_path: Path) -> None:
    old = _config(tmp_path)
    new = _with(_with(_with(old, "relay", device_timeout=60.0, max_parallel=2), "gateway", log_level="debug",
                      thing_name="gw-02"), "mqtt", keepalive=30)
    files = reload.file_digests(old)
    change = reload.changes(old, new, files, files, mqtt_reconnects=False)
    assert change.applied == ("[gateway] log_level", "[relay] device_timeout")
    assert change.need_restart == ("[gateway] thing_name", "[mqtt] keepalive", "[relay] max_parallel")
    running = reload.running(old, new, mqtt_reconnects=False)
    assert (running.gateway.thing_name, running.gateway.log_level) == ("gw-01", "debug")
    assert (running.relay.device_timeout, running.relay.max_parallel, running.mqtt.keepalive) == (60.0, 8, 60)


def test_mqtt_settings_are_applied_when_the_client_can_reconnect(tmp_path: Path) -> None:
    old = _config(tmp_path)
    new = _with(old, "mqtt", keepalive=30)
    files = reload.file_digests(old)
    change = reload.changes(old, new, files, files, mqtt_reconnects=True)
    assert (change.applied, change.need_restart, change.mqtt_reconnect) == (("[mqtt] keepalive",), (), True)
    assert reload.running(old, new, mqtt_reconnects=True).mqtt.keepalive == 30


def test_the_mqtt_client_id_waits_for_a_restart_even_when_the_client_reconnects(tmp_path: Path) -> None:
    old = _config(tmp_path)
    new = _with(old, "mqtt", client_id="gw-02", port=443)
    files = reload.file_digests(old)
    change = reload.changes(old, new, files, files, mqtt_reconnects=True)
    assert (change.applied, change.need_restart, change.mqtt_reconnect) == (
        ("[mqtt] port",), ("[mqtt] client_id",), True)
    running = reload.running(old, new, mqtt_reconnects=True)
    assert (running.mqtt.client_id, running.mqtt.port) == ("gw-01", 443)


def test_a_certificate_rotated_under_the_same_name_is_noticed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    before = reload.file_digests(config)
    config.mqtt.cert_file.write_text("a new certificate\n")
    after = reload.file_digests(config)
    assert reload.changes(config, config, before, after, mqtt_reconnects=True).applied == (
        "the MQTT cert file rotated on disk",)
    waiting = reload.changes(config, config, before, after, mqtt_reconnects=False)
    assert (waiting.applied, waiting.need_restart) == ((), ("the MQTT cert file rotated on disk",))


def test_the_device_list_says_what_was_added_removed_and_changed(tmp_path: Path) -> None:
    old = _config(tmp_path)
    pump = old.devices[0]
    new = dataclasses.replace(old, devices=(dataclasses.replace(pump, port="/dev/ttyUSB9"),
                                            dataclasses.replace(pump, name="fan")))
    files = reload.file_digests(old)
    assert reload.changes(old, new, files, files, mqtt_reconnects=False).applied == (
        "devices (added fan; changed pump)",)
    assert reload.changes(old, old, files, files, mqtt_reconnects=False).summary() == "nothing changed"


# the daemon's side: Daemon.reload hands the new [mqtt] settings to the MQTT client


class Reconfigures:
    """Stands in for MqttClient.reconfigure: records the settings, or refuses them with `error`."""

    def __init__(self) -> None:
        self.asked: list[ConnectionSettings] = []
        self.error: MqttError | None = None

    async def __call__(self, settings: ConnectionSettings) -> None:
        self.asked.append(settings)
        if self.error is not None:
            raise self.error


@pytest.fixture
def daemon(tmp_path: Path):
    path = write_valid_config(tmp_path / "etc")
    path.write_text(path.read_text().replace('thing_name = "gw-01"\n',
                                             f'thing_name = "gw-01"\nstate_dir = "{tmp_path / "state"}"\n'))
    daemon = Daemon(load_config(path), log_level="info")  # a log level given: reload leaves logging alone
    daemon.mqtt.reconfigure = Reconfigures()  # type: ignore[method-assign]
    yield daemon, path
    daemon.state.close()


def _reload(daemon: Daemon, path: Path, caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gatewayd"):
        asyncio.run(daemon.reload(path))
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "gatewayd")


def test_a_reload_reconnects_with_new_mqtt_settings_and_rotated_certificates(daemon, caplog) -> None:
    daemon, path = daemon
    asked = daemon.mqtt.reconfigure.asked
    path.write_text(path.read_text().replace('endpoint = "example.iot"', 'endpoint = "example.iot"\nport = 443'))
    logged = _reload(daemon, path, caplog)
    assert logged.endswith("reloaded configuration (1 devices): applied: [mqtt] port"), logged
    assert [(s.host, s.port, s.cert_file) for s in asked] == [("example.iot", 443, str(path.parent / "gw.cert.pem"))]
    assert daemon.config.mqtt.port == 443 and "restart" not in daemon._status_line()

    other = make_pki(path.parent / "other").client("gw-01")  # a new certificate and key under the old names
    shutil.copyfile(other.cert_file, path.parent / "gw.cert.pem")
    shutil.copyfile(other.key_file, path.parent / "gw.key")
    logged = _reload(daemon, path, caplog)
    assert logged.endswith("applied: the MQTT cert, key file rotated on disk"), logged
    assert len(asked) == 2

    logged = _reload(daemon, path, caplog)  # the rotation was applied: it is no news the next time
    assert logged.endswith("nothing changed") and len(asked) == 2, logged


def test_a_reload_whose_tls_files_the_mqtt_client_refuses_keeps_the_running_configuration(daemon, caplog) -> None:
    daemon, path = daemon
    reconfigure = daemon.mqtt.reconfigure
    reconfigure.error = MqttError("cannot load TLS files: [SSL] PEM lib")  # the files changed after load_config
    text = path.read_text()
    path.write_text(text.replace('endpoint = "example.iot"', 'endpoint = "example.iot"\nkeepalive = 30')
                    .replace('port = "/dev/ttyACM0"', 'port = "/dev/ttyACM1"'))
    logged = _reload(daemon, path, caplog)
    assert logged == "reload refused, keeping the running configuration: [mqtt] cannot load TLS files: [SSL] PEM lib"
    assert daemon.config.mqtt.keepalive == 60 and str(daemon.config.devices[0].port) == "/dev/ttyACM0"

    reconfigure.error = None  # the next SIGHUP tries again
    logged = _reload(daemon, path, caplog)
    assert logged.endswith("applied: [mqtt] keepalive, devices (changed pump)"), logged
    assert [s.keepalive for s in reconfigure.asked] == [30, 30] and daemon.config.mqtt.keepalive == 30
