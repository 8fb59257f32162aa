"""Configuration: gateway.toml plus devices.d/*.toml, validated as a whole.

Every problem found is collected (not just the first) so an operator fixes a file in one
round. Each problem names the file and the key it is about.
"""

from __future__ import annotations

import datetime as dt
import difflib
import errno
import grp
import json
import math
import os
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from transports.link import DEFAULT_CONNECT_TIMEOUT, BleSettings, LinkSettings, UartSettings
from transports.smp import MAX_WINDOW

from .aws import (DEVICE_NAME, MAX_BLOCK_SIZE, MAX_BYTES_PER_REQUEST, MAX_GATEWAY_SHADOW_DEVICE_NAME, MIN_BLOCK_SIZE,
                  THING_NAME)
from .mqtt import MqttError, tls_context
from .verify import VerificationError, key_algorithm

DEFAULT_CONFIG_PATH = Path("/etc/ota-gateway/gateway.toml")
DEFAULT_STATE_DIR = Path("/var/lib/ota-gateway")
DEFAULT_CONTROL_SOCKET = Path("/run/ota-gateway/control.sock")
DEVICES_DIR_NAME = "devices.d"
# the account the package runs the daemon as (debian/ota-gateway.sysusers)
DAEMON_USER = "ota-gateway"
# the unit's SupplementaryGroups= (debian/ota-gateway.ota-gatewayd.service): the daemon reads with them too
SERVICE_GROUPS = ("dialout", "bluetooth")
# the [mqtt] endpoint of the shipped example (config/gateway.toml): no account's endpoint
PLACEHOLDER_ENDPOINT = "abc123-ats.iot.eu-west-1.amazonaws.com"
# what BlueZ (and so bleak) takes as a device address
BLE_ADDRESS = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")

# Smaller SMP buffers cannot carry an upload chunk with its CBOR envelope.
MIN_BUF_SIZE = 64

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TRANSPORTS = ("uart", "ble")
PREFER = ("mqtt", "http")
DEVICE_MODES = ("zephyr", "recovery")

UART_ONLY_KEYS = ("port", "baudrate", "line_delay")
BLE_ONLY_KEYS = ("address", "advertised_name", "reassembly", "connect_timeout", "mtu", "window", "passkey")
# the ATT MTU range (Core Vol 3 Part F 3.2.8: 23 minimum; BlueZ offers 517)
MIN_ATT_MTU, MAX_ATT_MTU = 23, 517
SECTIONS = ("gateway", "mqtt", "ota", "signing", "relay", "ble", "device")

# AWS IoT allows 50 subscriptions per connection; besides each notify-next the gateway holds 2
# job reply filters (cloud.py), 2 stream filters (stream_download.subscribe_streams), and for a
# moment a shadow update's 2 replies (shadow.py) and a stream description (stream_download.py)
MAX_THING_SUBSCRIPTIONS = 50 - 7

@dataclass(frozen=True)
class Problem:
    """One thing wrong in one file, about one key ("" when about the whole file)."""

    file: Path
    key: str
    message: str

    def __str__(self) -> str:
        parts = [str(self.file)] + ([self.key] if self.key else []) + [self.message]
        return ": ".join(parts)

    def as_json(self) -> dict[str, str]:
        return {"file": str(self.file), "key": self.key, "message": self.message}


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Writers:
    """Who may change a file the daemon trusts: root and the daemon's user, the ones who may
    push an unsigned image anyway. Group write is fine for root's group, and for the daemon
    user's own group while no one else is in it (operators join ota-gateway to use the ctl)."""

    user: str  # the daemon's user, as messages name it
    uids: frozenset[int]
    gids: frozenset[int]

    @property
    def names(self) -> str:
        return "root" if self.user == "root" else f"root and {self.user}"


def trusted_writers() -> Writers:
    """Root and the daemon's user: the packaged `ota-gateway` account when it exists, else
    (a development setup) the account running this. The same whoever asks, so that
    check-config run as root judges the files as the daemon running as ota-gateway will."""
    try:
        user = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        try:
            user = pwd.getpwuid(os.geteuid())
        except KeyError:  # an account without a passwd entry (containers)
            return Writers(str(os.geteuid()), frozenset({0, os.geteuid()}), frozenset({0}))
    gids = {0}
    try:
        group = grp.getgrgid(user.pw_gid)
        if all(member == user.pw_name for member in group.gr_mem):
            gids.add(user.pw_gid)
    except KeyError:
        pass
    return Writers(user.pw_name, frozenset({0, user.pw_uid}), frozenset(gids))


@dataclass(frozen=True)
class GatewayConfig:
    thing_name: str
    state_dir: Path = DEFAULT_STATE_DIR
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    log_level: str = "info"


@dataclass(frozen=True)
class MqttConfig:
    endpoint: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_id: str
    port: int = 8883
    keepalive: int = 60
    # things given their own notify-next subscription; the rest are polled with $next/get
    # every poll_interval seconds (AWS IoT allows 50 subscriptions per connection)
    max_thing_subscriptions: int = 40
    poll_interval: float = 60.0


@dataclass(frozen=True)
class OtaConfig:
    block_size: int = 4096
    blocks_per_request: int = 32
    max_file_size: int = 16777216
    prefer: str = "mqtt"
    https_ca_file: Path | None = None
    request_timeout: float = 10.0
    max_idle_requests: int = 32


@dataclass(frozen=True)
class SigningConfig:
    # certfile named in a job document -> trusted certificate file on this gateway
    certificates: Mapping[str, Path] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )


@dataclass(frozen=True)
class RelayConfig:
    max_parallel: int = 8
    device_timeout: float = 86400.0
    reset_timeout: float = 60.0
    retry_interval: float = 5.0
    request_timeout: float = 5.0
    inventory_interval: float = 3600.0  # seconds between inventory passes; 0: no inventory


@dataclass(frozen=True)
class BleConfig:
    adapter: str = "hci0"
    max_connections: int = 3


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    transport: str
    port: str | None = None
    baudrate: int = 115200
    line_delay: float = 0.0
    address: str | None = None
    advertised_name: str | None = None  # ble: instead of address, the first device advertising this name
    reassembly: bool | None = None  # ble: None = unknown, so every request fits one write
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # ble
    mtu: int | None = None  # ble: the ATT MTU to write with when the stack reports it wrong
    window: int | None = None  # ble: upload requests in flight at most; None = from the device's buffers
    passkey: int | None = None  # ble: the passkey the device displays when pairing; None = Just Works
    thing_name: str | None = None
    files: str = ""
    image: int = 0
    buf_size: int | None = None
    allow_downgrade: bool = False
    redeliver: bool = True  # put the last image confirmed here back after a swap or a reset
    mode: str = "zephyr"
    # where the entry was written (file, 1-based [[device]] position); not its identity
    source: Path = field(default=Path(), compare=False)
    entry: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Config:
    path: Path
    gateway: GatewayConfig
    mqtt: MqttConfig
    ota: OtaConfig
    signing: SigningConfig
    relay: RelayConfig
    ble: BleConfig
    devices: tuple[DeviceConfig, ...]

    def device(self, name: str) -> DeviceConfig | None:
        return next((d for d in self.devices if d.name == name), None)

    def link_settings(self, device: DeviceConfig) -> LinkSettings:
        """How `transports` reaches the device (a loaded config has port or address set)."""
        if device.transport == "ble":
            return BleSettings(device.address, adapter=self.ble.adapter, reassembly=device.reassembly,
                               advertised_name=device.advertised_name,
                               connect_timeout=device.connect_timeout, mtu=device.mtu, passkey=device.passkey)
        return UartSettings(device.port or "", device.baudrate, device.line_delay)


# --------------------------------------------------------------------------- loading


def load_config(path: Path, *, as_service_user: bool = False) -> Config:
    """Read and validate `path` and `devices.d/*.toml` beside it; raise ConfigError.

    `as_service_user` (check-config): when this runs as root, also open every file the daemon
    reads as the daemon's user, as the service will.
    """
    path = Path(os.path.abspath(path))
    problems: list[Problem] = []
    base = path.parent
    writers = trusted_writers()
    read: list[_Read] = []  # what the daemon reads, for as_service_user
    main = _parse_toml(path, problems)
    if main is not None:
        read.append(_Read(path, "", "configuration file", path))
        _check_writers(path, "", "configuration file", path, writers, problems)
    devices: list[DeviceConfig] = []
    if main is not None:
        for key, value in main.items():
            if key not in SECTIONS:
                _unknown(problems, path, f"[{key}]" if isinstance(value, dict) else key, key,
                         SECTIONS, "unknown section" if isinstance(value, dict) else "unknown key")
        gateway = _gateway(path, base, _section(path, main, "gateway", problems), problems)
        mqtt = _mqtt(path, base, _section(path, main, "mqtt", problems), gateway.thing_name,
                     problems)
        ota = _ota(path, base, _section(path, main, "ota", problems), problems)
        signing = _signing(path, base, _section(path, main, "signing", problems), problems)
        relay = _relay(path, _section(path, main, "relay", problems), problems)
        ble = _ble(path, _section(path, main, "ble", problems), problems)
        devices += _device_entries(path, main, problems)

    devices_dir = base / DEVICES_DIR_NAME
    if devices_dir.is_dir():  # whoever may add a file here may add a device
        read.append(_Read(path, "", "devices folder", devices_dir))
        _check_writers(path, "", "devices folder", devices_dir, writers, problems)
    for file in _device_files(devices_dir, problems):
        extra = _parse_toml(file, problems)
        if extra is None:
            continue
        read.append(_Read(file, "", "configuration file", file))
        _check_writers(file, "", "configuration file", file, writers, problems)
        for key, value in extra.items():
            if key != "device":
                kind = "section" if isinstance(value, dict) else "key"
                _unknown(problems, file, f"[{key}]" if isinstance(value, dict) else key, key,
                         ("device",), f"unknown {kind} (only [[device]] entries belong in "
                         f"{DEVICES_DIR_NAME} files)")
        devices += _device_entries(file, extra, problems)

    _check_unique(devices, gateway.thing_name if main is not None else "", base, problems)
    _check_links_unique(devices, base, problems)
    if main is None or relay.inventory_interval:
        _check_shadow_names(devices, problems)
    if main is not None:
        read += _check_files(path, mqtt, ota, signing, writers, problems)
        _check_contents(path, mqtt, ota, signing, problems)
    if as_service_user:
        _check_read_as_service_user(read, problems)
    if problems:
        raise ConfigError(problems)
    return Config(path, gateway, mqtt, ota, signing, relay, ble, tuple(devices))


def read_control_socket(path: Path) -> Path:
    """The control socket named by `path`, without validating the rest of the file.

    The ctl uses this: it must find the daemon even when it may not read the key files.
    """
    path = Path(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            value = tomllib.load(f).get("gateway", {}).get("control_socket")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return DEFAULT_CONTROL_SOCKET
    if not isinstance(value, str) or not value:
        return DEFAULT_CONTROL_SOCKET
    return _resolve(path.parent, value)


def summary(config: Config) -> str:
    """One line describing a loaded configuration."""
    devices = config.devices
    kinds = [f"{n} {t}" for t in TRANSPORTS if (n := sum(d.transport == t for d in devices))]
    dev = _plural(len(devices), "device") + (f" ({', '.join(kinds)})" if kinds else "")
    certs = _plural(len(config.signing.certificates), "signing certificate")
    return (f"{config.path}: thing {config.gateway.thing_name}, "
            f"broker {config.mqtt.endpoint}:{config.mqtt.port}, {dev}, {certs}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _parse_toml(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        problems.append(Problem(path, "", f"cannot read: {e.strerror or e}"))
    except tomllib.TOMLDecodeError as e:
        text = str(e)
        where = re.search(r"\s*\(at (line \d+, column \d+|end of document)\)$", text)
        key = where.group(1) if where else ""
        if where:
            text = text[: where.start()]
        problems.append(Problem(path, key, f"TOML syntax error: {text}"))
    except UnicodeDecodeError as e:
        problems.append(Problem(path, "", f"not UTF-8 text: {e}"))
    return None


def _device_files(folder: Path, problems: list[Problem]) -> list[Path]:
    try:
        if not folder.exists():
            return []
        if not folder.is_dir():
            problems.append(Problem(folder, "", "is not a folder"))
            return []
        names = sorted(p for p in folder.iterdir() if p.suffix == ".toml")
    except OSError as e:
        problems.append(Problem(folder, "", f"cannot read folder: {e.strerror or e}"))
        return []
    # editor backups and hidden files are not configuration
    return [p for p in names if not p.name.startswith(".") and not p.is_dir()]


def _section(file: Path, data: dict[str, Any], name: str,
             problems: list[Problem]) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        problems.append(Problem(file, f"[{name}]", f"expected a table, got {_describe(value)}"))
        return {}
    return value


# --------------------------------------------------------------------------- sections


def _gateway(file: Path, base: Path, sec: dict, problems: list[Problem]) -> GatewayConfig:
    t = _Table(file, base, "[gateway]", sec, problems)
    thing = t.string("thing_name", required=True, pattern=THING_NAME,
                     pattern_hint="1 to 128 characters of A-Z a-z 0-9 : _ -")
    config = GatewayConfig(
        thing_name=thing or "",
        state_dir=t.path("state_dir", DEFAULT_STATE_DIR),
        control_socket=t.path("control_socket", DEFAULT_CONTROL_SOCKET),
        log_level=(t.string("log_level", "info", choices=LOG_LEVELS, fold_case=True) or "info"),
    )
    t.finish()
    return config


def _mqtt(file: Path, base: Path, sec: dict, thing: str, problems: list[Problem]) -> MqttConfig:
    t = _Table(file, base, "[mqtt]", sec, problems)
    endpoint = t.string("endpoint", required=True) or ""
    if endpoint and ("/" in endpoint or ":" in endpoint or " " in endpoint):
        t.problem("endpoint", f'expected a host name only (no scheme, port or path), got "{endpoint}"')
    elif endpoint.lower() == PLACEHOLDER_ENDPOINT:
        t.problem("endpoint", f'"{endpoint}" is the example of the shipped file, not your account\'s endpoint; '
                              "set the one `aws iot describe-endpoint --endpoint-type iot:Data-ATS` prints")
    config = MqttConfig(
        endpoint=endpoint,
        port=t.integer("port", 8883, minimum=1, maximum=65535),
        client_id=t.string("client_id", thing) or thing,
        ca_file=t.path("ca_file", None, required=True) or Path(),
        cert_file=t.path("cert_file", None, required=True) or Path(),
        key_file=t.path("key_file", None, required=True) or Path(),
        keepalive=t.integer("keepalive", 60, minimum=1, maximum=65535),
        max_thing_subscriptions=t.integer("max_thing_subscriptions", 40, minimum=1, maximum=MAX_THING_SUBSCRIPTIONS,
                                          why="AWS IoT's 50 subscriptions per connection, 7 of which the gateway "
                                              "holds for job replies, streams and shadows"),
        poll_interval=t.number("poll_interval", 60.0, positive=True),
    )
    t.finish()
    return config


def _ota(file: Path, base: Path, sec: dict, problems: list[Problem]) -> OtaConfig:
    t = _Table(file, base, "[ota]", sec, problems)
    block_size = t.integer("block_size", 4096, minimum=MIN_BLOCK_SIZE, maximum=MAX_BLOCK_SIZE,
                           why="the AWS IoT stream block size limits")
    per_request = t.integer("blocks_per_request", 32, minimum=1)
    if t.valid("block_size") and t.valid("blocks_per_request"):
        if block_size * per_request > MAX_BYTES_PER_REQUEST:
            t.problem("blocks_per_request",
                      f"block_size * blocks_per_request = {block_size} * {per_request} = "
                      f"{block_size * per_request} bytes, more than the {MAX_BYTES_PER_REQUEST}"
                      f" one AWS IoT stream request may return; use at most "
                      f"{MAX_BYTES_PER_REQUEST // block_size}")
    config = OtaConfig(
        block_size=block_size,
        blocks_per_request=per_request,
        max_file_size=t.integer("max_file_size", 16777216, minimum=1),
        prefer=t.string("prefer", "mqtt", choices=PREFER) or "mqtt",
        https_ca_file=t.path("https_ca_file", None),
        request_timeout=t.number("request_timeout", 10.0, positive=True),
        max_idle_requests=t.integer("max_idle_requests", 32, minimum=1),
    )
    t.finish()
    return config


def _signing(file: Path, base: Path, sec: dict, problems: list[Problem]) -> SigningConfig:
    t = _Table(file, base, "[signing]", sec, problems)
    table = t.table("certificates")
    certificates: dict[str, Path] = {}
    for name, value in table.items():
        key = f"certificates.{json.dumps(name)}"
        if not name:
            t.problem(key, "the certfile name must not be empty")
        elif not isinstance(value, str) or not value:
            t.problem(key, f"expected a file path (a string), got {_describe(value)}")
        else:
            certificates[name] = _resolve(base, value)
    t.finish()
    return SigningConfig(MappingProxyType(certificates))


def _relay(file: Path, sec: dict, problems: list[Problem]) -> RelayConfig:
    t = _Table(file, file.parent, "[relay]", sec, problems)
    config = RelayConfig(
        max_parallel=t.integer("max_parallel", 8, minimum=1),
        device_timeout=t.number("device_timeout", 86400.0, positive=True),
        reset_timeout=t.number("reset_timeout", 60.0, positive=True),
        retry_interval=t.number("retry_interval", 5.0, positive=True),
        request_timeout=t.number("request_timeout", 5.0, positive=True),
        inventory_interval=t.number("inventory_interval", 3600.0, minimum=0.0),
    )
    t.finish()
    return config


def _ble(file: Path, sec: dict, problems: list[Problem]) -> BleConfig:
    t = _Table(file, file.parent, "[ble]", sec, problems)
    config = BleConfig(
        adapter=t.string("adapter", "hci0") or "hci0",
        max_connections=t.integer("max_connections", 3, minimum=1),
    )
    t.finish()
    return config


def _device_entries(file: Path, data: dict[str, Any], problems: list[Problem]) -> list[DeviceConfig]:
    entries = data.get("device", [])
    if not isinstance(entries, list):
        problems.append(Problem(file, "device", "expected [[device]] entries (an array of tables),"
                                f" got {_describe(entries)}"))
        return []
    devices = []
    for index, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            problems.append(Problem(file, f"device[{index}]",
                                    f"expected a table, got {_describe(entry)}"))
            continue
        device = _device(file, index, entry, problems)
        if device is not None:
            devices.append(device)
    return devices


def _device(file: Path, index: int, entry: dict, problems: list[Problem]) -> DeviceConfig | None:
    t = _Table(file, file.parent, f"device[{index}]", entry, problems)
    name = t.string("name", required=True, pattern=DEVICE_NAME,
                    pattern_hint="1 to 64 characters of A-Z a-z 0-9 _ -")
    if name and t.valid("name"):
        t.label = f"device[{index}] ({name})"
    transport = t.string("transport", required=True, choices=TRANSPORTS)
    not_here = BLE_ONLY_KEYS if transport == "uart" else UART_ONLY_KEYS if transport == "ble" else ()
    for key in not_here:
        if key in entry:
            other = "ble" if transport == "uart" else "uart"
            t.problem(key, f"applies only to {other} devices, this one is {transport}")
            t.seen.add(key)
    device = DeviceConfig(
        name=name or "",
        transport=transport or "",
        port=t.string("port", required=transport == "uart") if transport != "ble" else None,
        baudrate=t.integer("baudrate", 115200, minimum=1) if transport != "ble" else 115200,
        line_delay=t.number("line_delay", 0.0, minimum=0.0) if transport != "ble" else 0.0,
        address=t.string("address", None, pattern=BLE_ADDRESS,
                         pattern_hint='six pairs of hexadecimal digits joined by colons, e.g. "C4:3B:21:9A:00:17"')
        if transport != "uart" else None,
        advertised_name=t.string("advertised_name", None) if transport != "uart" else None,
        reassembly=t.boolean("reassembly", None) if transport != "uart" else None,
        connect_timeout=(t.number("connect_timeout", DEFAULT_CONNECT_TIMEOUT, positive=True)
                         if transport != "uart" else DEFAULT_CONNECT_TIMEOUT),
        mtu=t.integer("mtu", None, minimum=MIN_ATT_MTU, maximum=MAX_ATT_MTU) if transport != "uart" else None,
        window=t.integer("window", None, minimum=1, maximum=MAX_WINDOW) if transport != "uart" else None,
        passkey=t.integer("passkey", None, minimum=0, maximum=999999) if transport != "uart" else None,
        thing_name=t.string("thing_name", None, pattern=THING_NAME,
                            pattern_hint="1 to 128 characters of A-Z a-z 0-9 : _ -"),
        files=t.string("files", name) or name or "",
        image=t.integer("image", 0, minimum=0),
        buf_size=t.integer("buf_size", None, minimum=MIN_BUF_SIZE),
        allow_downgrade=t.boolean("allow_downgrade", False),
        redeliver=t.boolean("redeliver", True),
        mode=t.string("mode", "zephyr", choices=DEVICE_MODES) or "zephyr",
        source=file,
        entry=index,
    )
    if device.address and device.advertised_name:
        t.problem("advertised_name", "give address or advertised_name, not both")
    elif transport == "ble" and "address" not in entry and "advertised_name" not in entry:
        t.problem("address", "required key is missing (or give advertised_name)")
    t.finish()
    # kept even when invalid, so a duplicate name is still reported alongside other problems
    return device if name and t.valid("name") else None


def _check_unique(devices: list[DeviceConfig], gateway_thing: str, base: Path,
                  problems: list[Problem]) -> None:
    names: dict[str, DeviceConfig] = {}
    things: dict[str, DeviceConfig] = {}
    for d in devices:
        label = f"device[{d.entry}] ({d.name})"
        if d.name in names:
            other = names[d.name]
            problems.append(Problem(d.source, label, f'name "{d.name}" already used by '
                                    f"device[{other.entry}] in {_rel(other.source, base)}"))
        else:
            names[d.name] = d
        if d.thing_name is None:
            continue
        if d.thing_name == gateway_thing:
            problems.append(Problem(d.source, f"{label} thing_name",
                                    f'"{d.thing_name}" is the gateway\'s own thing_name'))
        elif d.thing_name in things:
            other = things[d.thing_name]
            problems.append(Problem(d.source, f"{label} thing_name",
                                    f'"{d.thing_name}" already used by device[{other.entry}] '
                                    f"({other.name}) in {_rel(other.source, base)}"))
        else:
            things[d.thing_name] = d


def _check_shadow_names(devices: list[DeviceConfig], problems: list[Problem]) -> None:
    """A device without a thing of its own reports to the gateway's shadow `ota-<name>`, and
    AWS IoT takes shadow names of at most 64 characters."""
    for d in devices:
        if d.thing_name is None and len(d.name) > MAX_GATEWAY_SHADOW_DEVICE_NAME:
            problems.append(Problem(d.source, f"device[{d.entry}] ({d.name}) name",
                                    f"{len(d.name)} characters: a device without thing_name reports to the "
                                    f"gateway's named shadow ota-<name>, and shadow names are at most 64 characters, "
                                    f"so its name may have at most {MAX_GATEWAY_SHADOW_DEVICE_NAME} while "
                                    "[relay] inventory_interval is not 0"))


def _check_links_unique(devices: list[DeviceConfig], base: Path, problems: list[Problem]) -> None:
    """One serial port, or one Bluetooth address, reaches one device: two entries sharing it
    would take turns updating the same board, each believing it is theirs."""
    taken: dict[tuple[str, str], DeviceConfig] = {}
    for d in devices:
        if d.transport == "uart" and d.port:
            key, where = "port", _serial_port_identity(d.port)
        elif d.transport == "ble" and d.address:
            key, where = "address", d.address.upper()
        else:
            continue
        other = taken.setdefault((key, where), d)
        if other is d:
            continue
        value = getattr(d, key)
        same = f'"{value}"' if value == getattr(other, key) else f'"{value}" ({where})'
        problems.append(Problem(d.source, f"device[{d.entry}] ({d.name}) {key}",
                                f"{same} is already the {key} of device[{other.entry}] ({other.name}) in "
                                f"{_rel(other.source, base)}; one {key} reaches one device"))


def _serial_port_identity(port: str) -> str:
    """The device a port names: a pyserial URL as written, a path with its symlinks resolved
    (/dev/serial/by-id/... and /dev/ttyACM0 may be the same port)."""
    return port if "://" in port else os.path.realpath(port)


def _check_files(file: Path, mqtt: MqttConfig, ota: OtaConfig, signing: SigningConfig, writers: Writers,
                 problems: list[Problem]) -> list[_Read]:
    named = [("[mqtt] ca_file", "CA certificate", mqtt.ca_file),
             ("[mqtt] cert_file", "client certificate", mqtt.cert_file),
             ("[mqtt] key_file", "private key", mqtt.key_file)]
    for key, _, path in named:
        if path != Path():
            _check_readable(file, key, path, problems)
    key_data = _credential_bytes(mqtt.key_file)
    if key_data is not None and _has_key(_labels(key_data)):  # anything else is refused for what it holds
        try:
            mode = os.stat(mqtt.key_file).st_mode
        except OSError:
            mode = 0
        if mode & 0o004:
            problems.append(Problem(file, "[mqtt] key_file",
                                    f"private key {mqtt.key_file} is readable by every user (mode "
                                    f"{mode & 0o7777:04o}); allow only its owner and group, e.g. "
                                    f"chmod 640 {mqtt.key_file}"))
    if ota.https_ca_file is not None:
        _check_readable(file, "[ota] https_ca_file", ota.https_ca_file, problems)
        named.append(("[ota] https_ca_file", "CA bundle", ota.https_ca_file))
    for name, path in signing.certificates.items():
        key = f"[signing] certificates.{json.dumps(name)}"
        _check_readable(file, key, path, problems)
        named.append((key, "signing certificate", path))
    for key, what, path in named:
        if path != Path():
            _check_writers(file, key, what, path, writers, problems)
    return [_Read(file, key, what, path) for key, what, path in named if path != Path()]


def _check_writers(file: Path, key: str, what: str, path: Path, writers: Writers,
                   problems: list[Problem]) -> None:
    """Refuse a file that anyone but root and the daemon's user could change: by its owner
    and mode, or by replacing it in a folder they may write (a sticky folder only lets the
    owners of its entries replace them)."""
    try:
        st = os.stat(path)
    except OSError:
        return  # _check_readable or _parse_toml reports it
    issue = _who_else_writes(path, st, writers, sticky_ok=False)
    if issue:
        problems.append(Problem(file, key, f"{what} {path} is {issue.text}; allow only {writers.names} "
                                f"to change it, e.g. {issue.fix}"))
        return
    for folder in _folders_above(path):
        try:
            st = os.stat(folder)
        except OSError:
            continue
        issue = _who_else_writes(folder, st, writers, sticky_ok=True)
        if issue:
            problems.append(Problem(file, key, f"{what} {path} is in folder {folder}, which is {issue.text}; "
                                    f"allow only {writers.names} to change it, e.g. {issue.fix}"))
            return


@dataclass(frozen=True)
class _WriterIssue:
    text: str  # "writable by every user (mode 0666)", "owned by user bob"
    fix: str  # the command that mends it


def _who_else_writes(path: Path, st: os.stat_result, writers: Writers, *, sticky_ok: bool) -> _WriterIssue | None:
    mode = stat.S_IMODE(st.st_mode)
    others: list[str] = []
    if not (sticky_ok and mode & stat.S_ISVTX):
        if mode & 0o020 and st.st_gid not in writers.gids:
            others.append(f"group {_group_name(st.st_gid)}")
        if mode & 0o002:
            others.append("every user")
    texts, fixes = [], []
    if others:
        texts.append(f"writable by {' and '.join(others)} (mode {mode:04o})")
        fixes.append(f"chmod {mode & ~0o022:o} {path}")
    if st.st_uid not in writers.uids:
        texts.append(f"owned by user {_user_name(st.st_uid)}")
        fixes.append(f"chown root {path}")
    return _WriterIssue(" and ".join(texts), " and ".join(fixes)) if texts else None


def _folders_above(path: Path) -> list[Path]:
    """The folders whose writers could replace `path`: those above the name as given (where
    a symlink may sit), then those above the file it resolves to; each nearest first."""
    seen: list[Path] = []
    for start in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for folder in start.parents:
            if folder not in seen:
                seen.append(folder)
    return seen


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _check_readable(file: Path, key: str, path: Path, problems: list[Problem]) -> None:
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        problems.append(Problem(file, key, f"cannot read {path}: {e.strerror or e}"))
        return
    if empty:
        problems.append(Problem(file, key, f"{path} is empty"))


# --------------------------------------------------------------------------- what the files hold

# bigger than any CA bundle (Debian's ca-certificates.crt is ~220 KB); a device node named as a
# certificate must not be read for ever
MAX_CREDENTIAL_FILE = 4 << 20
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)


def _check_contents(file: Path, mqtt: MqttConfig, ota: OtaConfig, signing: SigningConfig,
                    problems: list[Problem]) -> None:
    """What each named file holds, judged as the daemon will use it: CA certificates to trust,
    the gateway's certificate and the private key that belongs to it, signers' certificates.
    A file that cannot be read was reported already and is not judged."""
    ca_files = [("[mqtt] ca_file", mqtt.ca_file), ("[ota] https_ca_file", ota.https_ca_file)]
    for key, path in ca_files:
        if path is not None and (data := _credential_bytes(path)) is not None:
            _add(problems, file, key, _ca_bundle_problem(path, data))
    cert = private = None
    if (data := _credential_bytes(mqtt.cert_file)) is not None:
        cert, why = _client_certificate(mqtt.cert_file, data)
        _add(problems, file, "[mqtt] cert_file", why)
    if (data := _credential_bytes(mqtt.key_file)) is not None:
        private, why = _private_key(mqtt.key_file, data)
        _add(problems, file, "[mqtt] key_file", why)
    if cert is not None and private is not None:
        if _spki(cert.public_key()) != _spki(private.public_key()):
            problems.append(Problem(file, "[mqtt] key_file",
                                    f"private key {mqtt.key_file} does not belong to the certificate "
                                    f"{mqtt.cert_file} of [mqtt] cert_file: their public keys differ"))
        elif not any(p.file == file and p.key == "[mqtt] ca_file" for p in problems):
            _check_tls_context(file, mqtt, problems)
    for name, path in signing.certificates.items():
        if (data := _credential_bytes(path)) is not None:
            _add(problems, file, f"[signing] certificates.{json.dumps(name)}", _signer_problem(path, data))


def _check_tls_context(file: Path, mqtt: MqttConfig, problems: list[Problem]) -> None:
    """The context the daemon builds to connect: whatever else OpenSSL refuses is found here,
    not as a traceback when the daemon starts."""
    try:
        tls_context(str(mqtt.ca_file), str(mqtt.cert_file), str(mqtt.key_file), mqtt.port)
    except MqttError as e:
        problems.append(Problem(file, "[mqtt] cert_file", f"the TLS library refuses ca_file {mqtt.ca_file}, "
                                f"cert_file {mqtt.cert_file} and key_file {mqtt.key_file}: {e.__cause__ or e}"))


def _credential_bytes(path: Path | None) -> bytes | None:
    if path is None or path == Path():
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CREDENTIAL_FILE + 1)
    except OSError:
        return None  # _check_readable said so
    return data or None


def _add(problems: list[Problem], file: Path, key: str, why: str | None) -> None:
    if why:
        problems.append(Problem(file, key, why))


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in `data` (x509.load_pem_x509_certificates needs cryptography 39;
    Debian 12 has 38). ValueError if one cannot be parsed or there is none."""
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data) if m.group(1) == b"CERTIFICATE"]
    if not blocks:
        raise ValueError("no PEM certificate")
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def _labels(data: bytes) -> list[str]:
    return [m.group(1).decode() for m in _PEM_BLOCK.finditer(data)]


def _has_key(labels: list[str]) -> bool:
    return any(label.endswith("PRIVATE KEY") for label in labels)


def _has_certificate(labels: list[str]) -> bool:
    return any(label.endswith("CERTIFICATE") for label in labels)


def _no_pem_certificate(path: Path, data: bytes) -> str:
    if len(data) > MAX_CREDENTIAL_FILE:
        return f"{path} is larger than {MAX_CREDENTIAL_FILE >> 20} MiB: not a certificate file"
    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    return f"{path} is a DER certificate, and the TLS library reads PEM: openssl x509 -inform der -in {path} -out NEW.pem"


def _ca_bundle_problem(path: Path, data: bytes) -> str | None:
    labels = _labels(data)
    if _has_key(labels):
        return f"{path} holds a private key, not CA certificates"
    if not _has_certificate(labels):
        return _no_pem_certificate(path, data)
    try:
        load_pem_certificates(data)
    except ValueError as e:
        return f"{path} holds a certificate that cannot be parsed: {_why(e)}"
    return None


def _client_certificate(path: Path, data: bytes) -> tuple[x509.Certificate | None, str | None]:
    labels = _labels(data)
    if not _has_certificate(labels):
        if _has_key(labels):
            return None, f"{path} holds a private key, not a certificate (are cert_file and key_file swapped?)"
        return None, _no_pem_certificate(path, data)
    try:  # the first certificate is the gateway's, as OpenSSL takes it; any others are its chain
        return load_pem_certificates(data)[0], None
    except ValueError as e:
        return None, f"{path} holds a certificate that cannot be parsed: {_why(e)}"


def _private_key(path: Path, data: bytes) -> tuple[Any, str | None]:
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data) if m.group(1).endswith(b"PRIVATE KEY")]
    if not blocks:
        if _has_certificate(_labels(data)):
            return None, f"{path} holds a certificate, not a private key (are cert_file and key_file swapped?)"
        return None, f"{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
    try:
        return serialization.load_pem_private_key(blocks[0], password=None), None
    except TypeError:  # encrypted
        return None, (f"{path} is protected by a passphrase, which the daemon cannot enter; store the key "
                      f"without one (openssl pkey -in {path} -out NEW), readable only by its owner and group")
    except (ValueError, UnsupportedAlgorithm) as e:
        return None, f"{path} holds a private key that cannot be parsed: {_why(e)}"


def _signer_problem(path: Path, data: bytes) -> str | None:
    if _has_key(_labels(data)):
        return f"{path} holds a private key, not a certificate: the gateway needs only the signer's certificate"
    try:
        key_algorithm(path)
    except VerificationError:
        return (f"{path} is not a certificate with an EC or RSA public key (X.509 in PEM or DER, or a PEM "
                "public key): no job's signature could be checked against it")
    return None


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _why(error: Exception) -> str:
    """cryptography's message without its FAQ link."""
    return str(error).split(". See https://", 1)[0]


# --------------------------------------------------------------------------- read as the service reads


@dataclass(frozen=True)
class _Read:
    """A file or folder the daemon reads, and how a problem with it is reported."""

    file: Path  # the configuration file that names it
    key: str
    what: str  # "private key", "configuration file", ...
    path: Path


def service_user() -> pwd.struct_passwd | None:
    """The account to judge readability as: the daemon's, when this runs as root and that is
    another account. Anyone else reads the files as themselves."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return None
    return user if user.pw_uid != 0 else None


def _check_read_as_service_user(reads: list[_Read], problems: list[Problem]) -> None:
    user = service_user()
    reads = [r for r in reads if r.path.exists()]  # the others were reported already
    if user is None or not reads:
        return
    answers = _open_as(user, _service_groups(user), [r.path for r in reads])
    for r, (error, folder) in zip(reads, answers or []):
        if error:
            problems.append(Problem(r.file, r.key, _unreadable_as(r, user, error, folder)))


def _service_groups(user: pwd.struct_passwd) -> list[int]:
    """The groups systemd gives the service: the user's own (initgroups) and SupplementaryGroups=."""
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for name in SERVICE_GROUPS:
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            pass
    return sorted(gids)


def _open_as(user: pwd.struct_passwd, groups: list[int], paths: list[Path]) -> list[tuple[int, str]] | None:
    """Open each path in a child process that has become `user`, so that the kernel judges
    modes, owners, ACLs and every folder on the way as it will judge the daemon. For each path:
    (0, "") when it opens, else (errno, the first folder on its way the user may not enter, or "").
    None when the child could not become the user (no CAP_SETUID)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os calls from here, then _exit
        status = 1
        try:
            os.close(reader)
            os.setgroups(groups)
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            out = "\0".join(_try_open(path) for path in paths).encode()
            while out:
                out = out[os.write(writer, out):]
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        text = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        return None
    answers = []
    for record in text.split("\0"):
        error, _, folder = record.partition(":")
        answers.append((int(error), folder))
    return answers


def _try_open(path: Path) -> str:
    try:  # O_NONBLOCK: a FIFO named as a certificate must not hang the check
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))
        return "0:"
    except OSError as e:
        return f"{e.errno}:{_closed_folder(path)}"


def _closed_folder(path: Path) -> str:
    for start in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for folder in reversed(start.parents):
            if not os.access(folder, os.X_OK):
                return str(folder)
    return ""


def _unreadable_as(read: _Read, user: pwd.struct_passwd, error: int, folder: str) -> str:
    who = f"user {user.pw_name}, whom the daemon runs as"
    if folder:
        return (f"{read.what} {read.path} cannot be read by {who}: folder {folder} does not let it through "
                f"({_owner_and_mode(Path(folder))})")
    if error == errno.EACCES:
        group = _group_name(user.pw_gid)
        return (f"{read.what} {read.path} cannot be read by {who} ({_owner_and_mode(read.path)}); e.g. "
                f"chgrp {group} {read.path} and chmod g+rX {read.path}")
    return f"{read.what} {read.path} cannot be read by {who}: {os.strerror(error)}"


def _owner_and_mode(path: Path) -> str:
    st = os.stat(path)
    return f"owner {_user_name(st.st_uid)}, group {_group_name(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o}"


# --------------------------------------------------------------------------- helpers


def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.abspath(base / value))


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {json.dumps(shown)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return f"date/time {value.isoformat()}"
    return type(value).__name__


def _unknown(problems: list[Problem], file: Path, key: str, name: str,
             known: Iterable[str], message: str) -> None:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        message += f' (did you mean "{close[0]}"?)'
    problems.append(Problem(file, key, message))


_MISSING = object()


class _Table:
    """Typed reads of one TOML table that record problems instead of raising."""

    def __init__(self, file: Path, base: Path, label: str, data: dict, problems: list[Problem]):
        self.file = file
        self.base = base
        self.label = label
        self.data = data
        self.problems = problems
        self.seen: set[str] = set()
        self.invalid: set[str] = set()

    def problem(self, key: str, message: str) -> None:
        self.invalid.add(key)
        self.problems.append(Problem(self.file, f"{self.label} {key}", message))

    def valid(self, key: str) -> bool:
        return key not in self.invalid

    def _get(self, key: str, required: bool) -> Any:
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if required:
            self.problem(key, "required key is missing")
        return _MISSING

    def _wrong(self, key: str, expected: str, value: Any) -> None:
        self.problem(key, f"expected {expected}, got {_describe(value)}")

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               choices: tuple[str, ...] = (), fold_case: bool = False,
               pattern: re.Pattern[str] | None = None, pattern_hint: str = "") -> str | None:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self._wrong(key, "a string", value)
            return default
        if fold_case:
            value = value.lower()
        if not value:
            self.problem(key, "must not be empty")
            return default
        if choices and value not in choices:
            self.problem(key, f"expected one of {', '.join(json.dumps(c) for c in choices)},"
                              f" got {json.dumps(value)}")
            return default
        if pattern is not None and not pattern.fullmatch(value):
            self.problem(key, f"{json.dumps(value)} is not allowed: use {pattern_hint}")
            return default
        return value

    def integer(self, key: str, default: Any, *, minimum: int | None = None,
                maximum: int | None = None, why: str = "") -> Any:
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong(key, "an integer", value)
            return default
        return value if self._in_range(key, value, minimum, maximum, why) else default

    def number(self, key: str, default: float, *, positive: bool = False,
               minimum: float | None = None) -> float:
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._wrong(key, "a number", value)
            return default
        if not math.isfinite(value):
            self.problem(key, f"expected a finite number, got {value}")
            return default
        if positive and value <= 0:
            self.problem(key, f"must be greater than 0, got {value}")
            return default
        if not self._in_range(key, value, minimum, None, ""):
            return default
        return float(value)

    def _in_range(self, key: str, value: float, minimum: float | None, maximum: float | None,
                  why: str) -> bool:
        low = minimum is not None and value < minimum
        high = maximum is not None and value > maximum
        if not (low or high):
            return True
        because = f" ({why})" if why else ""
        if minimum is not None and maximum is not None:
            self.problem(key, f"must be between {minimum} and {maximum}{because}, got {value}")
        elif low:
            self.problem(key, f"must be at least {minimum}{because}, got {value}")
        else:
            self.problem(key, f"must be at most {maximum}{because}, got {value}")
        return False

    def boolean(self, key: str, default: bool | None) -> bool | None:
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self._wrong(key, "true or false", value)
            return default
        return value

    def path(self, key: str, default: Any, *, required: bool = False) -> Any:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self._wrong(key, "a file path (a string)", value)
            return default
        if not value:
            self.problem(key, "must not be empty")
            return default
        return _resolve(self.base, value)

    def table(self, key: str) -> dict[str, Any]:
        value = self._get(key, False)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self._wrong(key, "a table", value)
            return {}
        return value

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.invalid.add(key)
                _unknown(self.problems, self.file, f"{self.label} {key}", key, self.seen,
                         "unknown key")
