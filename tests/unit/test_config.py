"""gatewayd.config: loading, defaults, path resolution and every kind of problem."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from gatewayd import config as config_module
from gatewayd.config import (
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_STATE_DIR,
    ConfigError,
    Problem,
    load_config,
    read_control_socket,
    summary,
)

from gatewayd.ctl import main as ctl_main
from gatewayd.daemon import main as daemon_main
from pem_files import pem, write_pem
from transports.link import BleSettings

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
[gateway]
thing_name = "gw-01"

[mqtt]
endpoint = "example-ats.iot.eu-west-1.amazonaws.com"
ca_file = "ca.pem"
cert_file = "gw.cert.pem"
key_file = "keys/gw.key"
"""
SIGNING = """
[signing]
certificates = { "ota_signer.pem" = "signer.pem" }
"""
DEVICE = """
[[device]]
name = "pump"
transport = "uart"
port = "/dev/ttyACM0"
"""


def make_files(folder: Path) -> None:
    write_pem(folder / "ca.pem", pem().ca)
    write_pem(folder / "gw.cert.pem", pem().cert)
    write_pem(folder / "keys" / "gw.key", pem().key, 0o600)
    write_pem(folder / "signer.pem", pem().signer)


def write_config(folder: Path, main: str, devices: dict[str, str] | None = None) -> Path:
    make_files(folder)
    path = folder / "gateway.toml"
    path.write_text(textwrap.dedent(main))
    if devices:
        (folder / "devices.d").mkdir(exist_ok=True)
        for name, text in devices.items():
            (folder / "devices.d" / name).write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def only_problem(path: Path) -> str:
    problems = problems_of(path)
    assert len(problems) == 1, [str(p) for p in problems]
    return str(problems[0])


# ------------------------------------------------------------------ valid configurations


def test_minimal_config_has_design_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL))
    assert config.path == tmp_path / "gateway.toml"
    assert config.gateway.thing_name == "gw-01"
    assert config.gateway.state_dir == DEFAULT_STATE_DIR
    assert config.gateway.control_socket == DEFAULT_CONTROL_SOCKET
    assert config.gateway.log_level == "info"
    assert config.mqtt.port == 8883
    assert config.mqtt.client_id == "gw-01"
    assert config.mqtt.keepalive == 60
    assert config.mqtt.max_thing_subscriptions == 40 and config.mqtt.poll_interval == 60.0
    assert (config.ota.block_size, config.ota.blocks_per_request) == (4096, 32)
    assert config.ota.max_file_size == 16777216
    assert config.ota.prefer == "mqtt"
    assert config.ota.https_ca_file is None
    assert config.ota.request_timeout == 10.0
    assert config.ota.max_idle_requests == 32
    assert dict(config.signing.certificates) == {}
    assert config.relay.max_parallel == 8
    assert config.relay.device_timeout == 86400
    assert (config.relay.reset_timeout, config.relay.retry_interval) == (60.0, 5.0)
    assert config.relay.request_timeout == 5.0
    assert config.relay.inventory_interval == 3600
    assert (config.ble.adapter, config.ble.max_connections) == ("hci0", 3)
    assert config.devices == ()


def test_relative_paths_resolve_against_the_files_folder(tmp_path: Path, monkeypatch) -> None:
    write_config(tmp_path / "etc", MINIMAL + """
[signing]
certificates = { "ota_signer.pem" = "signer.pem", "abs.pem" = "/opt/x/abs.pem" }
""".replace('"/opt/x/abs.pem"', f'"{tmp_path}/etc/signer.pem"'))
    monkeypatch.chdir(tmp_path)  # a relative argument must not change the result
    config = load_config(Path("etc/gateway.toml"))
    etc = tmp_path / "etc"
    assert config.path == etc / "gateway.toml"
    assert config.mqtt.ca_file == etc / "ca.pem"
    assert config.mqtt.key_file == etc / "keys" / "gw.key"
    assert config.mqtt.key_file.is_absolute()
    assert config.signing.certificates.get("ota_signer.pem") == etc / "signer.pem"
    assert config.signing.certificates.get("abs.pem") == etc / "signer.pem"
    assert config.signing.certificates.get("other.pem") is None


def test_devices_from_main_file_and_devices_d(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + """
[[device]]
name = "pump"
transport = "uart"
port = "/dev/ttyACM-does-not-exist"
thing_name = "pump"
line_delay = 0.01
mode = "recovery"
""", {
        "b.toml": '[[device]]\nname = "tank"\ntransport = "ble"\naddress = "C4:3B:21:9A:00:17"\n',
        "a.toml": '[[device]]\nname = "fan"\ntransport = "uart"\nport = "socket://localhost:1"\n'
                  'baudrate = 9600\nfiles = "fan-*.bin"\nimage = 1\nbuf_size = 512\n'
                  'allow_downgrade = true\n',
        "ignored.toml.sample": "this is not toml at all [",
    })
    config = load_config(path)
    assert [d.name for d in config.devices] == ["pump", "fan", "tank"]  # main, then sorted
    pump, fan, tank = config.devices
    assert pump.port == "/dev/ttyACM-does-not-exist"  # a missing port is not an error
    assert (pump.baudrate, pump.files, pump.image, pump.buf_size) == (115200, "pump", 0, None)
    assert (pump.line_delay, pump.mode, pump.thing_name) == (0.01, "recovery", "pump")
    assert (fan.baudrate, fan.files, fan.image, fan.buf_size) == (9600, "fan-*.bin", 1, 512)
    assert fan.allow_downgrade is True and fan.mode == "zephyr"
    assert fan.source == tmp_path / "devices.d" / "a.toml"
    assert (tank.transport, tank.address, tank.port) == ("ble", "C4:3B:21:9A:00:17", None)
    assert config.device("tank") is tank and config.device("nope") is None
    assert summary(config) == (
        f"{path}: thing gw-01, broker example-ats.iot.eu-west-1.amazonaws.com:8883, "
        "3 devices (2 uart, 1 ble), 0 signing certificates")


def test_shipped_examples_load_once_the_placeholder_endpoint_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    shutil.copy(REPO / "config" / "gateway.toml", path)
    (tmp_path / "devices.d").mkdir()
    shutil.copy(REPO / "config" / "devices.d" / "example.toml.sample",
                tmp_path / "devices.d" / "example.toml")
    write_pem(tmp_path / "AmazonRootCA1.pem", pem().ca)
    write_pem(tmp_path / "gw-01.cert.pem", pem().cert)
    write_pem(tmp_path / "gw-01.private.key", pem().key, 0o640)
    write_pem(tmp_path / "signer.pem", pem().signer)
    assert only_problem(path) == (
        f'{path}: [mqtt] endpoint: "abc123-ats.iot.eu-west-1.amazonaws.com" is the example of the shipped file, '
        "not your account's endpoint; set the one `aws iot describe-endpoint --endpoint-type iot:Data-ATS` prints")
    path.write_text(path.read_text().replace('"abc123-ats.iot', '"a1b2c3d4e5f6g7-ats.iot'))
    config = load_config(path)
    assert config.signing.certificates.get("ota_signer.pem") == tmp_path / "signer.pem"
    assert [d.name for d in config.devices] == ["pump", "tank-sensor"]
    assert summary(config).endswith("2 devices (1 uart, 1 ble), 1 signing certificate")


def test_shipped_example_documents_every_key() -> None:
    text = (REPO / "config" / "gateway.toml").read_text()
    for key in ("thing_name", "state_dir", "control_socket", "log_level", "endpoint", "port",
                "client_id", "ca_file", "cert_file", "key_file", "keepalive",
                "max_thing_subscriptions", "poll_interval", "block_size",
                "blocks_per_request", "max_file_size", "prefer", "https_ca_file",
                "request_timeout", "max_idle_requests", "certificates", "max_parallel",
                "device_timeout", "reset_timeout", "retry_interval", "inventory_interval", "adapter",
                "max_connections"):
        assert f"{key} = " in text, key
    sample = (REPO / "config" / "devices.d" / "example.toml.sample").read_text()
    for key in ("name", "transport", "port", "baudrate", "line_delay", "mode", "address", "reassembly",
                "connect_timeout", "mtu", "window", "passkey", "advertised_name", "thing_name", "files", "image",
                "buf_size", "allow_downgrade", "redeliver"):
        assert f"\n{key} = " in sample or f"\n# {key} = " in sample, key  # an alternative is commented out


# ------------------------------------------------------------------ problems


def test_unknown_key_names_file_section_and_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + "\n[ota]\nblock_sise = 1024\n")
    assert only_problem(path) == (f'{path}: [ota] block_sise: unknown key '
                                  f'(did you mean "block_size"?)')


def test_unknown_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + "\n[gatway]\nx = 1\n")
    assert only_problem(path).startswith(f"{path}: [gatway]: unknown section")


def test_unknown_device_key_and_devices_d_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL, {"p.toml": """\
        [[device]]
        name = "pump"
        transport = "uart"
        port = "/dev/ttyUSB0"
        baud = 9600

        [gateway]
        thing_name = "x"
        """})
    lines = [str(p) for p in problems_of(path)]
    dfile = tmp_path / "devices.d" / "p.toml"
    assert f"{dfile}: device[1] (pump) baud: unknown key (did you mean \"baudrate\"?)" in lines
    assert any(line.startswith(f"{dfile}: [gateway]: unknown section") for line in lines)


def test_wrong_types_bool_is_not_an_integer(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL.replace(
        "[mqtt]\n", '[mqtt]\nport = "x"\nkeepalive = true\n') + "[relay]\nreset_timeout = \"1\"\n")
    lines = [str(p) for p in problems_of(path)]
    assert lines == [
        f'{path}: [mqtt] port: expected an integer, got string "x"',
        f"{path}: [mqtt] keepalive: expected an integer, got boolean true",
        f'{path}: [relay] reset_timeout: expected a number, got string "1"',
    ]


def test_subscription_budget_and_poll_interval(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + "max_thing_subscriptions = 2\npoll_interval = 0.5\n")
    config = load_config(path)
    assert config.mqtt.max_thing_subscriptions == 2 and config.mqtt.poll_interval == 0.5
    path = write_config(tmp_path, MINIMAL + "max_thing_subscriptions = 0\npoll_interval = 0\n")
    lines = [str(p) for p in problems_of(path)]
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: [mqtt] max_thing_subscriptions: ") and "0" in lines[0]
    assert lines[1] == f"{path}: [mqtt] poll_interval: must be greater than 0, got 0"
    path = write_config(tmp_path, MINIMAL + 'max_thing_subscriptions = 2.5\npoll_interval = "1"\n')
    assert [str(p) for p in problems_of(path)] == [
        f"{path}: [mqtt] max_thing_subscriptions: expected an integer, got float 2.5",
        f'{path}: [mqtt] poll_interval: expected a number, got string "1"',
    ]


def test_section_of_wrong_type(tmp_path: Path) -> None:
    path = write_config(tmp_path, "ble = 3\n" + MINIMAL)
    assert only_problem(path) == f"{path}: [ble]: expected a table, got integer 3"


def test_missing_required_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[gateway]\nstate_dir = "state"\n[mqtt]\nport = 8883\n')
    lines = [str(p) for p in problems_of(path)]
    assert lines == [f"{path}: [gateway] thing_name: required key is missing"] + [
        f"{path}: [mqtt] {key}: required key is missing"
        for key in ("endpoint", "ca_file", "cert_file", "key_file")]


def test_missing_device_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL, {"d.toml": """\
        [[device]]
        transport = "uart"
        [[device]]
        name = "pump"
        transport = "uart"
        [[device]]
        name = "tank"
        transport = "ble"
        [[device]]
        name = "fan"
        transport = "can"
        """})
    f = tmp_path / "devices.d" / "d.toml"
    assert [str(p) for p in problems_of(path)] == [
        f"{f}: device[1] name: required key is missing",
        f"{f}: device[1] port: required key is missing",
        f"{f}: device[2] (pump) port: required key is missing",
        f"{f}: device[3] (tank) address: required key is missing (or give advertised_name)",
        f'{f}: device[4] (fan) transport: expected one of "uart", "ble", got "can"',
    ]


def test_transport_specific_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + """
[[device]]
name = "tank"
transport = "ble"
address = "C4:3B:21:9A:00:17"
baudrate = 9600
""")
    assert only_problem(path) == (f"{path}: device[1] (tank) baudrate: applies only to uart "
                                  "devices, this one is ble")


def test_ble_link_settings_are_per_device_and_checked(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + """
[ble]
adapter = "hci1"

[[device]]
name = "tank"
transport = "ble"
address = "C4:3B:21:9A:00:17"
reassembly = true
connect_timeout = 7.5
mtu = 247
window = 2
passkey = 4242

[[device]]
name = "valve"
transport = "ble"
address = "C4:3B:21:9A:00:18"

[[device]]
name = "gauge"
transport = "ble"
advertised_name = "Zephyr Gauge"
""")
    config = load_config(path)
    tank, valve, gauge = (config.link_settings(d) for d in config.devices)
    assert gauge == BleSettings(None, adapter="hci1", advertised_name="Zephyr Gauge")
    assert tank == BleSettings("C4:3B:21:9A:00:17", adapter="hci1", reassembly=True, connect_timeout=7.5, mtu=247,
                               passkey=4242)
    assert valve == BleSettings("C4:3B:21:9A:00:18", adapter="hci1", reassembly=None, connect_timeout=20.0)
    assert [d.window for d in config.devices] == [2, None, None]

    path = write_config(tmp_path, MINIMAL + """
[[device]]
name = "tank"
transport = "ble"
address = "C4:3B:21:9A:00:17"
reassembly = "yes"
connect_timeout = 0
mtu = 600
window = 9
passkey = 1000000

[[device]]
name = "pump"
transport = "uart"
port = "/dev/ttyACM0"
reassembly = true

[[device]]
name = "both"
transport = "ble"
address = "C4:3B:21:9A:00:19"
advertised_name = "both"

[[device]]
name = "neither"
transport = "ble"
""")
    assert sorted(str(p) for p in problems_of(path)) == [
        f'{path}: device[1] (tank) connect_timeout: must be greater than 0, got 0',
        f'{path}: device[1] (tank) mtu: must be between 23 and 517, got 600',
        f'{path}: device[1] (tank) passkey: must be between 0 and 999999, got 1000000',
        f'{path}: device[1] (tank) reassembly: expected true or false, got string "yes"',
        f'{path}: device[1] (tank) window: must be between 1 and 8, got 9',
        f"{path}: device[2] (pump) reassembly: applies only to ble devices, this one is uart",
        f"{path}: device[3] (both) advertised_name: give address or advertised_name, not both",
        f"{path}: device[4] (neither) address: required key is missing (or give advertised_name)",
    ]


def test_a_device_name_too_long_for_its_shadow_name_is_refused_while_the_inventory_is_on(tmp_path: Path) -> None:
    long_name = "x" * 61  # ota-<name> would be 65 characters; AWS IoT takes 64
    device = f'[[device]]\nname = "{long_name}"\ntransport = "uart"\nport = "/dev/ttyACM0"\n'
    problem = only_problem(write_config(tmp_path, MINIMAL + device))
    assert f"device[1] ({long_name}) name" in problem and "at most 60" in problem and "inventory_interval" in problem
    # with a thing of its own it reports to that thing's shadow ota; with the inventory off, to none
    load_config(write_config(tmp_path, MINIMAL + device + 'thing_name = "t-1"\n'))
    load_config(write_config(tmp_path, MINIMAL + "[relay]\ninventory_interval = 0\n" + device))
    config = load_config(write_config(tmp_path, MINIMAL + DEVICE + "redeliver = false\n"))
    assert config.devices[0].redeliver is False


def test_duplicate_device_across_files_names_both(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + """
[[device]]
name = "pump"
transport = "uart"
port = "/dev/ttyACM0"
""", {"pumps.toml": """\
        [[device]]
        name = "other"
        transport = "uart"
        port = "/dev/ttyACM1"
        [[device]]
        name = "pump"
        transport = "uart"
        port = "/dev/ttyACM2"
        """})
    assert only_problem(path) == (f"{tmp_path}/devices.d/pumps.toml: device[2] (pump): "
                                  'name "pump" already used by device[1] in gateway.toml')


def test_duplicate_thing_names(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL, {"d.toml": """\
        [[device]]
        name = "a"
        transport = "uart"
        port = "/dev/ttyACM0"
        thing_name = "gw-01"
        [[device]]
        name = "b"
        transport = "uart"
        port = "/dev/ttyACM1"
        thing_name = "shared"
        [[device]]
        name = "c"
        transport = "uart"
        port = "/dev/ttyACM2"
        thing_name = "shared"
        """})
    f = tmp_path / "devices.d" / "d.toml"
    assert [str(p) for p in problems_of(path)] == [
        f"{f}: device[1] (a) thing_name: \"gw-01\" is the gateway's own thing_name",
        f'{f}: device[3] (c) thing_name: "shared" already used by device[2] (b) in devices.d/d.toml',
    ]


@pytest.mark.parametrize("name", ["a b", "x" * 65, "pump/1", "", "üml"])
def test_bad_device_name(tmp_path: Path, name: str) -> None:
    path = write_config(tmp_path, MINIMAL + f"""
[[device]]
name = "{name}"
transport = "uart"
port = "/dev/ttyACM0"
""")
    line = only_problem(path)
    assert line.startswith(f"{path}: device[1] name: ")


def test_unreadable_certificate_files(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL.replace('"ca.pem"', '"missing-ca.pem"')
                        .replace('"gw.cert.pem"', '"keys"')  # a folder cannot be read
                        + '[signing]\ncertificates = { "s.pem" = "nope/s.pem" }\n')
    lines = [str(p) for p in problems_of(path)]
    assert lines == [
        f"{path}: [mqtt] ca_file: cannot read {tmp_path}/missing-ca.pem: No such file or directory",
        f"{path}: [mqtt] cert_file: cannot read {tmp_path}/keys: Is a directory",
        f'{path}: [signing] certificates."s.pem": cannot read {tmp_path}/nope/s.pem: '
        "No such file or directory",
    ]


def test_empty_certificate_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    (tmp_path / "ca.pem").write_text("")
    assert only_problem(path) == f"{path}: [mqtt] ca_file: {tmp_path}/ca.pem is empty"


@pytest.mark.parametrize("mode,ok", [(0o600, True), (0o640, True), (0o660, True),
                                     (0o644, False), (0o604, False)])
def test_world_readable_private_key_refused(tmp_path: Path, mode: int, ok: bool) -> None:
    path = write_config(tmp_path, MINIMAL)
    os.chmod(tmp_path / "keys" / "gw.key", mode)
    if ok:
        load_config(path)
    else:
        line = only_problem(path)
        assert line.startswith(f"{path}: [mqtt] key_file: private key {tmp_path}/keys/gw.key "
                               f"is readable by every user (mode 0{mode:o})")


def test_toml_syntax_error_reports_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + "\n[ota]\nblock_size = = 3\n")
    assert only_problem(path).startswith(f"{path}: line 11, column 14: TOML syntax error: ")


def test_syntax_error_in_devices_d_and_other_problems_all_reported(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + '\n[mqtt.x]\n', {
        "bad.toml": '[[device]]\nname = "pump\n',
        "good.toml": '[[device]]\nname = "ok"\ntransport = "ble"\naddress = "C4:3B:21:9A:00:17"\nmode = "x"\n'})
    lines = [str(p) for p in problems_of(path)]
    assert lines[0] == f"{path}: [mqtt] x: unknown key"
    assert lines[1].startswith(f"{tmp_path}/devices.d/bad.toml: line 2, column ")
    assert lines[2] == (f'{tmp_path}/devices.d/good.toml: device[1] (ok) mode: expected one of '
                        '"zephyr", "recovery", got "x"')
    assert len(lines) == 3


def test_missing_main_file(tmp_path: Path) -> None:
    assert only_problem(tmp_path / "nope.toml") == (
        f"{tmp_path}/nope.toml: cannot read: No such file or directory")


@pytest.mark.parametrize("block_size", [128, 255, 131073, 262144])
def test_block_size_outside_aws_limits(tmp_path: Path, block_size: int) -> None:
    path = write_config(tmp_path, MINIMAL + f"[ota]\nblock_size = {block_size}\n"
                                            "blocks_per_request = 1\n")
    assert only_problem(path) == (f"{path}: [ota] block_size: must be between 256 and 131072 "
                                  f"(the AWS IoT stream block size limits), got {block_size}")


@pytest.mark.parametrize("block_size,per_request,ok", [
    (256, 512, True), (131072, 1, True), (4096, 32, True), (4096, 33, False), (8192, 17, False)])
def test_stream_request_limit(tmp_path: Path, block_size: int, per_request: int, ok: bool) -> None:
    path = write_config(tmp_path, MINIMAL + f"[ota]\nblock_size = {block_size}\n"
                                            f"blocks_per_request = {per_request}\n")
    if ok:
        assert load_config(path).ota.blocks_per_request == per_request
    else:
        assert only_problem(path).startswith(
            f"{path}: [ota] blocks_per_request: block_size * blocks_per_request = ")


def test_values_out_of_range_and_choices(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + """
[ota]
blocks_per_request = 0
prefer = "ftp"
request_timeout = -1
max_file_size = 0
[relay]
max_parallel = 0
device_timeout = 0
retry_interval = nan
[ble]
max_connections = 0
[gateway.x]
""")
    keys = [p.key for p in problems_of(path)]
    assert keys == ["[gateway] x", "[ota] blocks_per_request", "[ota] max_file_size", "[ota] prefer",
                    "[ota] request_timeout", "[relay] max_parallel", "[relay] device_timeout",
                    "[relay] retry_interval", "[ble] max_connections"]


def test_signing_certificates_must_map_names_to_paths(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + '[signing]\ncertificates = { "a.pem" = 3 }\n')
    assert only_problem(path) == (f'{path}: [signing] certificates."a.pem": expected a file path '
                                  "(a string), got integer 3")
    path = write_config(tmp_path, MINIMAL + '[signing]\ncertificates = ["a.pem"]\n')
    assert only_problem(path) == f"{path}: [signing] certificates: expected a table, got an array"


def test_device_written_as_single_table(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + '[device]\nname = "x"\n')
    assert only_problem(path).startswith(f"{path}: device: expected [[device]] entries")


def test_endpoint_must_be_a_host(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL.replace('"example-ats', '"mqtts://example-ats'))
    assert only_problem(path).startswith(f"{path}: [mqtt] endpoint: expected a host name only")


def test_read_control_socket(tmp_path: Path) -> None:
    assert read_control_socket(tmp_path / "missing.toml") == DEFAULT_CONTROL_SOCKET
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\ncontrol_socket = "run/ctl.sock"\n[mqtt]\nport = "broken"\n')
    assert read_control_socket(path) == tmp_path / "run" / "ctl.sock"
    path.write_text("not toml [")
    assert read_control_socket(path) == DEFAULT_CONTROL_SOCKET


# ------------------------------------------------------------------ what the named files hold


def test_a_private_key_that_does_not_belong_to_the_certificate(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    key = write_pem(tmp_path / "keys" / "gw.key", pem().other_key, 0o600)
    assert only_problem(path) == (f"{path}: [mqtt] key_file: private key {key} does not belong to the certificate "
                                  f"{tmp_path}/gw.cert.pem of [mqtt] cert_file: their public keys differ")


def test_a_private_key_as_ca_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + '[ota]\nhttps_ca_file = "keys/gw.key"\n')
    write_pem(tmp_path / "ca.pem", pem().key, 0o600)
    assert [str(p) for p in problems_of(path)] == [
        f"{path}: [mqtt] ca_file: {tmp_path}/ca.pem holds a private key, not CA certificates",
        f"{path}: [ota] https_ca_file: {tmp_path}/keys/gw.key holds a private key, not CA certificates"]


def test_a_certificate_as_key_file_and_both_swapped(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    write_pem(tmp_path / "keys" / "gw.key", pem().cert, 0o600)
    assert only_problem(path) == (f"{path}: [mqtt] key_file: {tmp_path}/keys/gw.key holds a certificate, not a "
                                  "private key (are cert_file and key_file swapped?)")
    path.write_text(MINIMAL.replace('cert_file = "gw.cert.pem"', 'cert_file = "keys/gw.key"')
                    .replace('key_file = "keys/gw.key"', 'key_file = "gw.cert.pem"'))
    write_pem(tmp_path / "keys" / "gw.key", pem().key, 0o600)
    assert [str(p) for p in problems_of(path)] == [
        f"{path}: [mqtt] cert_file: {tmp_path}/keys/gw.key holds a private key, not a certificate (are cert_file "
        "and key_file swapped?)",
        f"{path}: [mqtt] key_file: {tmp_path}/gw.cert.pem holds a certificate, not a private key (are cert_file "
        "and key_file swapped?)"]


@pytest.mark.parametrize("content,why", [
    (b"ota signer: see the wiki\n", "is not a certificate with an EC or RSA public key (X.509 in PEM or DER, or a "
                                    "PEM public key): no job's signature could be checked against it"),
    (None, "holds a private key, not a certificate: the gateway needs only the signer's certificate"),
])
def test_a_signing_certificate_that_is_no_certificate(tmp_path: Path, content: bytes | None, why: str) -> None:
    path = write_config(tmp_path, MINIMAL + SIGNING)
    signer = write_pem(tmp_path / "signer.pem", pem().key if content is None else content, 0o600)
    assert only_problem(path) == f'{path}: [signing] certificates."ota_signer.pem": {signer} {why}'


def test_certificate_files_that_are_text_der_or_encrypted(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    path = write_config(tmp_path, MINIMAL)
    (tmp_path / "ca.pem").write_text("AmazonRootCA1: download it from https://www.amazontrust.com/repository/\n")
    der = x509.load_pem_x509_certificate(pem().cert).public_bytes(serialization.Encoding.DER)
    write_pem(tmp_path / "gw.cert.pem", der)
    key = serialization.load_pem_private_key(pem().key, None)
    write_pem(tmp_path / "keys" / "gw.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")), 0o600)
    assert [str(p) for p in problems_of(path)] == [
        f"{path}: [mqtt] ca_file: {tmp_path}/ca.pem holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        f"{path}: [mqtt] cert_file: {tmp_path}/gw.cert.pem is a DER certificate, and the TLS library reads PEM: "
        f"openssl x509 -inform der -in {tmp_path}/gw.cert.pem -out NEW.pem",
        f"{path}: [mqtt] key_file: {tmp_path}/keys/gw.key is protected by a passphrase, which the daemon cannot "
        f"enter; store the key without one (openssl pkey -in {tmp_path}/keys/gw.key -out NEW), readable only by "
        "its owner and group"]


def test_a_chain_in_cert_file_and_a_key_after_its_parameters_are_fine(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    write_pem(tmp_path / "gw.cert.pem", pem().cert + pem().ca)
    write_pem(tmp_path / "keys" / "gw.key", b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n"
                                            b"-----END EC PARAMETERS-----\n" + pem().key, 0o600)
    load_config(path)


def test_what_the_tls_library_refuses_beyond_these_checks_is_a_problem_too(tmp_path: Path, monkeypatch) -> None:
    from gatewayd.mqtt import MqttError

    def refuse(*args: object) -> None:
        raise MqttError("cannot load TLS files") from OSError("[SSL] something new")

    monkeypatch.setattr(config_module, "tls_context", refuse)
    path = write_config(tmp_path, MINIMAL)
    assert only_problem(path) == (f"{path}: [mqtt] cert_file: the TLS library refuses ca_file {tmp_path}/ca.pem, "
                                  f"cert_file {tmp_path}/gw.cert.pem and key_file {tmp_path}/keys/gw.key: "
                                  "[SSL] something new")


# ------------------------------------------------------------------ one device per link


def test_two_devices_on_one_serial_port(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "ttyACM0").touch()
    (tmp_path / "dev" / "by-id").mkdir()
    (tmp_path / "dev" / "by-id" / "usb-pump").symlink_to(tmp_path / "dev" / "ttyACM0")
    path = write_config(tmp_path, MINIMAL + f"""
[[device]]
name = "pump"
transport = "uart"
port = "{tmp_path}/dev/ttyACM0"
[[device]]
name = "net"
transport = "uart"
port = "socket://localhost:4000"
""", {"site.toml": f"""
[[device]]
name = "fan"
transport = "uart"
port = "{tmp_path}/dev/ttyACM0"
[[device]]
name = "valve"
transport = "uart"
port = "{tmp_path}/dev/by-id/usb-pump"
[[device]]
name = "net2"
transport = "uart"
port = "socket://localhost:4001"
"""})
    site = tmp_path / "devices.d" / "site.toml"
    assert [str(p) for p in problems_of(path)] == [
        f'{site}: device[1] (fan) port: "{tmp_path}/dev/ttyACM0" is already the port of device[1] (pump) in '
        "gateway.toml; one port reaches one device",
        f'{site}: device[2] (valve) port: "{tmp_path}/dev/by-id/usb-pump" ({tmp_path}/dev/ttyACM0) is already '
        "the port of device[1] (pump) in gateway.toml; one port reaches one device"]


def test_two_devices_at_one_bluetooth_address(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + """
[[device]]
name = "tank"
transport = "ble"
address = "C4:3B:21:9A:00:17"
[[device]]
name = "tank2"
transport = "ble"
address = "c4:3b:21:9a:00:17"
""")
    assert only_problem(path) == (f'{path}: device[2] (tank2) address: "c4:3b:21:9a:00:17" (C4:3B:21:9A:00:17) is '
                                  "already the address of device[1] (tank) in gateway.toml; one address reaches "
                                  "one device")


@pytest.mark.parametrize("address", ["a", "C4:3B:21:9A:00", "C4-3B-21-9A-00-17", "G4:3B:21:9A:00:17",
                                     "C4:3B:21:9A:00:17:00", "C43B219A0017", " C4:3B:21:9A:00:17"])
def test_a_malformed_bluetooth_address(tmp_path: Path, address: str) -> None:
    path = write_config(tmp_path, MINIMAL + f'[[device]]\nname = "tank"\ntransport = "ble"\naddress = "{address}"\n')
    assert only_problem(path) == (f'{path}: device[1] (tank) address: "{address}" is not allowed: use six pairs of '
                                  'hexadecimal digits joined by colons, e.g. "C4:3B:21:9A:00:17"')


# ------------------------------------------------------------------ who may change trusted files

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
STRANGER = 54321  # a uid and gid with no account


def let_group_read(path: Path, user: pwd.struct_passwd) -> None:
    """The packaged layout of the private key: root's, readable by the daemon's group."""
    if os.geteuid() == 0:
        os.chown(path, 0, user.pw_gid)
    os.chmod(path, 0o640)


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter (tmp_path is under a folder of root's alone), for
    check-config, which, run as root, opens the files as the daemon's user."""
    folder = Path(tempfile.mkdtemp(prefix="ota-config-test-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def daemon_user_nobody(monkeypatch) -> pwd.struct_passwd:
    """The daemon runs as `nobody` (as the package runs it as ota-gateway): root and nobody
    may change its files, whoever loads the config."""
    nobody = pwd.getpwnam("nobody")  # Debian always has it (base-passwd)
    monkeypatch.setattr(config_module, "DAEMON_USER", "nobody")
    return nobody


@pytest.mark.parametrize("name,key,what", [
    ("signer.pem", '[signing] certificates."ota_signer.pem"', "signing certificate"),
    ("ca.pem", "[mqtt] ca_file", "CA certificate"),
    ("gw.cert.pem", "[mqtt] cert_file", "client certificate"),
])
def test_world_writable_certificate_refused(tmp_path: Path, daemon_user_nobody, name: str, key: str,
                                            what: str) -> None:
    path = write_config(tmp_path, MINIMAL + SIGNING)
    os.chmod(tmp_path / name, 0o666)
    assert only_problem(path) == (f"{path}: {key}: {what} {tmp_path}/{name} is writable by every user "
                                  f"(mode 0666); allow only root and nobody to change it, e.g. "
                                  f"chmod 644 {tmp_path}/{name}")


def test_world_writable_configuration_files_refused(tmp_path: Path, daemon_user_nobody) -> None:
    path = write_config(tmp_path, MINIMAL, {"site.toml": DEVICE})
    os.chmod(path, 0o646)
    site = tmp_path / "devices.d" / "site.toml"
    os.chmod(site, 0o662)
    assert [str(p) for p in problems_of(path)] == [
        f"{path}: configuration file {path} is writable by every user (mode 0646); allow only root and "
        f"nobody to change it, e.g. chmod 644 {path}",
        f"{site}: configuration file {site} is writable by every user (mode 0662); allow only root and "
        f"nobody to change it, e.g. chmod 640 {site}",
    ]


@needs_root
def test_group_writable_only_by_root_or_the_daemon_users_own_group(tmp_path: Path, daemon_user_nobody) -> None:
    path = write_config(tmp_path, MINIMAL + SIGNING)
    signer = tmp_path / "signer.pem"
    os.chmod(signer, 0o664)
    for gid in (0, daemon_user_nobody.pw_gid):  # nogroup: nobody else is in it
        os.chown(signer, 0, gid)
        load_config(path)
    os.chown(signer, 0, STRANGER)
    assert only_problem(path) == (
        f'{path}: [signing] certificates."ota_signer.pem": signing certificate {signer} is writable by '
        f"group {STRANGER} (mode 0664); allow only root and nobody to change it, e.g. chmod 644 {signer}")


@needs_root
def test_the_daemon_users_group_may_not_write_once_operators_are_in_it(tmp_path: Path, monkeypatch,
                                                                      daemon_user_nobody) -> None:
    nogroup = grp.getgrgid(daemon_user_nobody.pw_gid)
    with_an_operator = grp.struct_group((nogroup.gr_name, nogroup.gr_passwd, nogroup.gr_gid, ["alice"]))
    real_getgrgid = grp.getgrgid
    monkeypatch.setattr(grp, "getgrgid", lambda gid: with_an_operator if gid == nogroup.gr_gid
                        else real_getgrgid(gid))
    path = write_config(tmp_path, MINIMAL + SIGNING)
    signer = tmp_path / "signer.pem"
    os.chown(signer, 0, nogroup.gr_gid)
    os.chmod(signer, 0o664)
    assert f"is writable by group {nogroup.gr_name} (mode 0664)" in only_problem(path)


@needs_root
def test_files_owned_by_another_user_refused(tmp_path: Path, daemon_user_nobody) -> None:
    path = write_config(tmp_path, MINIMAL + SIGNING)
    signer = tmp_path / "signer.pem"
    os.chown(signer, daemon_user_nobody.pw_uid, 0)
    load_config(path)  # the daemon's own user may own it
    os.chown(signer, STRANGER, 0)
    assert only_problem(path) == (
        f'{path}: [signing] certificates."ota_signer.pem": signing certificate {signer} is owned by user '
        f"{STRANGER}; allow only root and nobody to change it, e.g. chown root {signer}")
    os.chmod(signer, 0o666)
    assert only_problem(path).endswith(
        f"is writable by every user (mode 0666) and owned by user {STRANGER}; allow only root and nobody to "
        f"change it, e.g. chmod 644 {signer} and chown root {signer}")


def test_a_folder_others_may_write_lets_them_replace_the_file(tmp_path: Path, daemon_user_nobody) -> None:
    path = write_config(tmp_path, MINIMAL)
    keys = tmp_path / "keys"
    os.chmod(keys, 0o777)
    assert only_problem(path) == (
        f"{path}: [mqtt] key_file: private key {keys}/gw.key is in folder {keys}, which is writable by every "
        f"user (mode 0777); allow only root and nobody to change it, e.g. chmod 755 {keys}")
    os.chmod(keys, 0o1777)  # sticky, like /tmp: only the file's owner may replace it
    load_config(path)


def test_a_devices_folder_others_may_write_is_refused_even_empty(tmp_path: Path, daemon_user_nobody) -> None:
    path = write_config(tmp_path, MINIMAL)
    (tmp_path / "devices.d").mkdir()
    os.chmod(tmp_path / "devices.d", 0o1777)  # sticky does not stop anyone adding a device
    assert only_problem(path).startswith(f"{path}: devices folder {tmp_path}/devices.d is writable by every user")


def test_a_symlinked_certificate_is_judged_where_it_points(tmp_path: Path, daemon_user_nobody) -> None:
    path = write_config(tmp_path, MINIMAL + SIGNING.replace('"signer.pem"', '"link.pem"'))
    shared = tmp_path / "shared"
    shared.mkdir()
    write_pem(shared / "signer.pem", pem().signer)
    (tmp_path / "link.pem").symlink_to(shared / "signer.pem")
    load_config(path)
    os.chmod(shared, 0o777)
    assert f"is in folder {shared}, which is writable by every user" in only_problem(path)


def test_without_the_packaged_user_the_running_user_is_the_daemons(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(config_module, "DAEMON_USER", "no-such-user-for-ota-gateway")
    me = pwd.getpwuid(os.geteuid()).pw_name
    writers = config_module.trusted_writers()
    assert writers.user == me and writers.uids == {0, os.geteuid()}
    path = write_config(tmp_path, MINIMAL + SIGNING)
    os.chmod(tmp_path / "signer.pem", 0o646)
    assert only_problem(path).endswith(f"allow only {writers.names} to change it, e.g. chmod 644 "
                                       f"{tmp_path}/signer.pem")


def test_check_config_and_the_daemon_refuse_the_same_files(open_folder: Path, daemon_user_nobody, capsys) -> None:
    path = write_config(open_folder, MINIMAL + SIGNING)
    let_group_read(open_folder / "keys" / "gw.key", daemon_user_nobody)
    os.chmod(open_folder / "signer.pem", 0o666)
    expected = str(only_problem(path))

    assert ctl_main(["check-config", str(path)]) == 1
    assert capsys.readouterr().out == expected + "\n"
    assert daemon_main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == f"ota-gatewayd: not starting: {expected}\n"


# ------------------------------------------------------------------ read as the daemon's user


@needs_root
def test_check_config_as_root_opens_the_files_as_the_daemons_user(open_folder: Path, daemon_user_nobody,
                                                                   capsys) -> None:
    path = write_config(open_folder, MINIMAL + SIGNING)
    key = open_folder / "keys" / "gw.key"  # root's, 0600: root reads it, the daemon would not
    load_config(path)  # the daemon, run as root, reads it
    line = (f"{path}: [mqtt] key_file: private key {key} cannot be read by user nobody, whom the daemon runs as "
            f"(owner root, group root, mode 0600); e.g. chgrp nogroup {key} and chmod g+rX {key}")
    assert ctl_main(["check-config", str(path)]) == 1
    assert capsys.readouterr().out == line + "\n"
    assert [str(p) for p in problems_of_as_service_user(path)] == [line]

    let_group_read(key, daemon_user_nobody)
    assert ctl_main(["check-config", str(path)]) == 0
    capsys.readouterr()

    os.chmod(open_folder / "keys", 0o700)  # the folder, not the file, keeps nobody out
    assert [str(p) for p in problems_of_as_service_user(path)] == [
        f"{path}: [mqtt] key_file: private key {key} cannot be read by user nobody, whom the daemon runs as: "
        f"folder {open_folder}/keys does not let it through (owner root, group root, mode 0700)"]


@needs_root
def test_every_file_the_daemon_reads_is_opened_as_its_user(open_folder: Path, daemon_user_nobody) -> None:
    path = write_config(open_folder, MINIMAL + SIGNING, {"site.toml": DEVICE})
    let_group_read(open_folder / "keys" / "gw.key", daemon_user_nobody)
    for name in ("gateway.toml", "ca.pem", "gw.cert.pem", "signer.pem", "devices.d/site.toml", "devices.d"):
        os.chmod(open_folder / name, 0o700 if name == "devices.d" else 0o600)
    site = open_folder / "devices.d" / "site.toml"
    keys = [(p.file, p.key) for p in problems_of_as_service_user(path)]
    assert keys == [(path, ""), (path, ""), (site, ""), (path, "[mqtt] ca_file"), (path, "[mqtt] cert_file"),
                    (path, '[signing] certificates."ota_signer.pem"')]


def test_without_the_daemons_user_or_as_another_user_nothing_more_is_checked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(config_module, "DAEMON_USER", "no-such-user-for-ota-gateway")
    load_config(write_config(tmp_path, MINIMAL), as_service_user=True)
    assert config_module.service_user() is None


def problems_of_as_service_user(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(path, as_service_user=True)
    return info.value.problems


def test_max_thing_subscriptions_leaves_room_for_the_gateways_own_filters(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + "max_thing_subscriptions = 44\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}: [mqtt] max_thing_subscriptions: " in str(e.value) and "50 subscriptions" in str(e.value)
    config = load_config(write_config(tmp_path, MINIMAL + "max_thing_subscriptions = 43\n"))
    assert config.mqtt.max_thing_subscriptions == 43
