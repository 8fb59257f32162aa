"""What a reload (SIGHUP) changes: the settings that differ, and which of them need a restart.

The daemon applies what it can while running (log level, relay timeouts, the device list,
signing certificates, [ota] settings, MQTT settings and certificates rotated on disk, by
reconnecting) and says in the log and in systemd's STATUS= line what changed and what only
a restart will apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from .config import Config

# settings the running daemon cannot take over: where it keeps its state, the socket it
# listens on, who it is in AWS IoT (its thing name and MQTT client id), and sizes fixed when
# its parts were built; the other [mqtt] settings are applied by reconnecting
NEEDS_RESTART = frozenset({
    ("gateway", "thing_name"), ("gateway", "state_dir"), ("gateway", "control_socket"),
    ("relay", "max_parallel"), ("ble", "max_connections"),
    ("mqtt", "client_id"), ("mqtt", "max_thing_subscriptions"), ("mqtt", "poll_interval"),
})
# files whose content matters, not only their path: certificates rotated in place
MQTT_FILES = ("ca_file", "cert_file", "key_file")
SECTIONS = ("gateway", "mqtt", "ota", "signing", "relay", "ble")


@dataclass(frozen=True)
class Changes:
    applied: tuple[str, ...]  # e.g. "[relay] device_timeout", "devices (added fan)"
    need_restart: tuple[str, ...]
    mqtt_reconnect: bool  # MQTT settings or their files changed: reconnect with the new ones

    def summary(self) -> str:
        parts = [f"applied: {', '.join(self.applied)}" if self.applied else "nothing changed"]
        if self.need_restart:
            parts.append(f"needs a restart to apply: {', '.join(self.need_restart)}")
        return "; ".join(parts)


def file_digests(config: Config) -> dict[str, str]:
    """The MQTT credential files' contents, to notice certificates rotated under the same name."""
    out = {}
    for key in MQTT_FILES:
        path: Path = getattr(config.mqtt, key)
        try:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            out[key] = ""
    return out


def changes(old: Config, new: Config, old_files: dict[str, str], new_files: dict[str, str], *,
            mqtt_reconnects: bool) -> Changes:
    """What differs; MQTT settings are applied only if the MQTT client can reconnect with new ones."""
    applied: list[str] = []
    restart: list[str] = []
    mqtt = False
    for section, key in _differences(old, new):
        name = f"[{section}] {key}"
        if _needs_restart(section, key, mqtt_reconnects):
            restart.append(name)
        else:
            applied.append(name)
            mqtt = mqtt or section == "mqtt"
    rotated = [k for k in MQTT_FILES if old_files.get(k) != new_files.get(k)
               and f"[mqtt] {k}" not in applied + restart]
    if rotated:
        what = "the MQTT " + ", ".join(k.replace("_file", "") for k in rotated) + " file rotated on disk"
        (applied if mqtt_reconnects else restart).append(what)
        mqtt = mqtt or mqtt_reconnects
    devices = _device_changes(old, new)
    if devices:
        applied.append(f"devices ({devices})")
    return Changes(tuple(applied), tuple(restart), mqtt)


def _differences(old: Config, new: Config) -> list[tuple[str, str]]:
    return [(section, f.name) for section in SECTIONS for f in dataclasses.fields(getattr(old, section))
            if getattr(getattr(old, section), f.name) != getattr(getattr(new, section), f.name)]


def _needs_restart(section: str, key: str, mqtt_reconnects: bool) -> bool:
    return (section, key) in NEEDS_RESTART or (section == "mqtt" and not mqtt_reconnects)


def _device_changes(old: Config, new: Config) -> str:
    before = {d.name: d for d in old.devices}
    after = {d.name: d for d in new.devices}
    parts = []
    for label, names in (("added", after.keys() - before.keys()), ("removed", before.keys() - after.keys()),
                         ("changed", {n for n in before.keys() & after.keys() if before[n] != after[n]})):
        if names:
            parts.append(f"{label} {', '.join(sorted(names))}")
    return "; ".join(parts)


def running(old: Config, new: Config, *, mqtt_reconnects: bool) -> Config:
    """The configuration the daemon runs with after a reload: `new`, except what needs a restart."""
    kept = {}
    for section in SECTIONS:
        keys = {f.name: getattr(getattr(old, section), f.name) for f in dataclasses.fields(getattr(old, section))
                if _needs_restart(section, f.name, mqtt_reconnects)}
        if keys:
            kept[section] = dataclasses.replace(getattr(new, section), **keys)
    return dataclasses.replace(new, **kept)
