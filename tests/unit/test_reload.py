"""What a reload applies and what it leaves for a restart (gatewayd.reload)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gatewayd import reload
from gatewayd.config import Config, load_config
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
