"""A whole bench in one object: broker, AWS IoT emulator, signer, emulated devices, the daemon.

The end-to-end tests, the benchmarks and the demo all build their world with `Lab`, so
they exercise the same parts: a real mosquitto with mutual TLS, the AWS IoT emulator on it,
SMP devices on pseudo-terminals, and the real `ota-gatewayd` as a separate process with a
generated gateway.toml.

    with Lab(tmp_path) as lab:
        lab.add_device("pump", thing_name="pump")
        lab.start()
        image = lab.make_image((1, 1, 0))
        lab.ota_update("job-1", "pump", image)
        lab.wait("pump", "job-1")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .awsiot import AwsIotEmulator, ExecutionRecord, OtaFileSpec
from .broker import DEFAULT_VALID_DAYS, SERVICE_IDENTITY, Mosquitto, Pki, open_pki
from .runner import EmulatorThread
from .s3 import S3Emulator
from .signing import Signer, build_mcuboot_image, open_signer
from .smp_device import EmulatedDevice
from .wan import WanLink, WanProxy

FINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "REMOVED", "TIMED_OUT"})
CERTFILE = "ota_signer.pem"


@dataclass
class LabDevice:
    name: str
    emulator: EmulatedDevice
    link: Path | None  # its pty; None for a device served over BLE by the caller
    settings: dict[str, Any]


@dataclass
class Lab:
    root: Path
    gateway_thing: str = "gw-01"
    daemon_args: list[str] = field(default_factory=list)
    broker_port: int = 0  # 0: a free port
    valid_days: int = DEFAULT_VALID_DAYS  # of the certificates it makes
    pki: Pki = field(init=False)
    signer: Signer = field(init=False)
    made_keys: bool = field(init=False)  # False: the PKI and signer of an earlier run in `root` were kept
    devices: dict[str, LabDevice] = field(default_factory=dict, init=False)
    broker: Mosquitto | None = field(default=None, init=False)
    aws: AwsIotEmulator | None = field(default=None, init=False)
    s3: S3Emulator | None = field(default=None, init=False)
    url_lifetime: float = 3600.0  # seconds each presigned URL minted for a job document lives
    wan: WanLink | None = None  # the daemon reaches the broker through a WAN delay proxy with this link
    wan_proxy: WanProxy | None = field(default=None, init=False)
    daemon: subprocess.Popen | None = field(default=None, init=False)
    config_path: Path | None = field(default=None, init=False)
    _runner: EmulatorThread = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pki, made_pki = open_pki(self.root / "pki", self.valid_days)
        self.signer, made_signer = open_signer(self.root / "signer", valid_days=max(self.valid_days, 365))
        self.made_keys = made_pki or made_signer
        self._runner = EmulatorThread().start()
        self.config: dict[str, dict[str, Any]] = {
            "ota": {"block_size": 1024, "blocks_per_request": 16, "request_timeout": 2.0},
            "relay": {"reset_timeout": 20.0, "retry_interval": 0.5, "request_timeout": 3.0},
        }

    # devices and images

    def make_image(self, version: tuple[int, ...], size: int = 24 * 1024, seed: object = None) -> bytes:
        return make_image(version, size, seed)

    def add_device(self, name: str, *, version: tuple[int, ...] = (1, 0, 0), image: bytes | None = None,
                   thing_name: str | None = None, files: str | None = None, **emulator: Any) -> EmulatedDevice:
        """An emulated SMP device on a pty, listed in the gateway's config."""
        slot0 = image or self.make_image(version, seed=name)
        device = EmulatedDevice(name, slot0=slot0, **emulator)
        link = self.root / "tty" / name
        link.parent.mkdir(exist_ok=True)
        self._runner.call(device.serve_pty(link))
        settings: dict[str, Any] = {"name": name, "transport": "uart", "port": str(link)}
        if thing_name:
            settings["thing_name"] = thing_name
        if files:
            settings["files"] = files
        self.devices[name] = LabDevice(name, device, link, settings)
        return device

    def add_ble_device(self, name: str, address: str, *, version: tuple[int, ...] = (1, 0, 0),
                       image: bytes | None = None, thing_name: str | None = None, files: str | None = None,
                       link: dict[str, Any] | None = None, **emulator: Any) -> EmulatedDevice:
        """An emulated SMP device listed in the gateway's config as a BLE device at `address`;
        the caller serves it over BLE (`ble_device.HostStackBench` or `BleBench`) on this lab's
        device loop (`on_device_loop`). `link` adds BLE keys (reassembly, mtu, ...)."""
        device = EmulatedDevice(name, slot0=image or self.make_image(version, seed=name), **emulator)
        settings: dict[str, Any] = {"name": name, "transport": "ble", "address": address, **(link or {})}
        if thing_name:
            settings["thing_name"] = thing_name
        if files:
            settings["files"] = files
        self.devices[name] = LabDevice(name, device, None, settings)
        return device

    def device(self, name: str) -> EmulatedDevice:
        return self.devices[name].emulator

    def swap_device(self, name: str, *, version: tuple[int, ...] = (1, 0, 0), image: bytes | None = None,
                    **emulator: Any) -> EmulatedDevice:
        """Unplug the device on `name`'s port and plug in another board there, with `image` (or a
        factory image of `version`) in slot 0: a field swap, or a factory reset."""
        old = self.devices[name]
        assert old.link is not None, "swap_device is for devices on a pty"
        self._runner.call(old.emulator.stop())
        device = EmulatedDevice(name, slot0=image or self.make_image(version, seed=f"{name}-factory"), **emulator)
        self._runner.call(device.serve_pty(old.link))
        self.devices[name] = LabDevice(name, device, old.link, old.settings)
        return device

    def on_device_loop(self, work: Any, timeout: float = 10.0) -> Any:
        return self._runner.call(work, timeout)

    # cloud

    def start_cloud(self) -> None:
        proxied = [d.settings["thing_name"] for d in self.devices.values() if "thing_name" in d.settings]
        self.broker = Mosquitto(self.root / "broker", self.pki, {self.gateway_thing: proxied}, port=self.broker_port)
        self.broker.start()
        self.aws = AwsIotEmulator(self.broker.host, self.broker.port, self.pki.ca_file,
                                  self.pki.client(SERVICE_IDENTITY))
        self.aws.start()
        if self.wan is not None:  # the service inside AWS talks to the broker directly
            self.wan_proxy = self._runner.call(WanProxy(self.broker.host, self.broker.port, self.wan).start())

    def start_s3(self, **options: Any) -> S3Emulator:
        """HTTPS object storage for HTTP jobs; job documents get a freshly presigned URL each read."""
        assert self.aws is not None, "start_cloud() first"
        self.s3 = S3Emulator(self.root / "s3", tls=(self.pki.server.cert_file, self.pki.server.key_file),
                             **options).start()
        self.config["ota"]["https_ca_file"] = str(self.pki.ca_file)
        self.aws.set_url_minter(lambda url: self.s3.presign(url.rsplit("/", 1)[1], self.url_lifetime))
        return self.s3

    def ota_update(self, job_id: str, thing: str | list[str], image: bytes, *, filepath: str | None = None,
                   signed_data: bytes | None = None, certfile: str = CERTFILE,
                   protocols: tuple[str, ...] = ("MQTT",), file_type: int | None = None) -> dict:
        """Create a signed OTA update for `thing` (or each of a list of things), as CreateOTAUpdate would.

        `signed_data` signs other bytes than the file (a tampered file). With "HTTP" in
        `protocols` the file is put in the S3 emulator (see `start_s3`). `file_type` sets the
        file's `fileType`.
        """
        spec = dataclasses.replace(self._file_spec(job_id, 0, image, filepath, signed_data, certfile, protocols),
                                   file_type=file_type)
        assert self.aws is not None
        targets = [thing] if isinstance(thing, str) else thing
        return self.aws.create_ota_update(job_id, targets, [spec], protocols=protocols)

    def ota_update_files(self, job_id: str, thing: str, files: list[tuple[str, bytes]]) -> dict:
        """One OTA update with several signed files: [(filepath, image), ...]."""
        assert self.aws is not None
        specs = [self._file_spec(job_id, n, image, path, None, CERTFILE, ("MQTT",))
                 for n, (path, image) in enumerate(files)]
        return self.aws.create_ota_update(job_id, [thing], specs)

    def _file_spec(self, job_id: str, n: int, image: bytes, filepath: str | None, signed_data: bytes | None,
                   certfile: str, protocols: tuple[str, ...]) -> OtaFileSpec:
        url = None
        if "HTTP" in protocols:
            assert self.s3 is not None, "start_s3() first"
            key = f"{job_id}-{n}.bin"
            self.s3.put(key, image)
            url = f"${{aws:iot:s3-presigned-url:{self.s3.endpoint}/{self.s3.bucket}/{key}}}"
        return OtaFileSpec(filepath=filepath, data=image, certfile=certfile,
                           signature_key=self.signer.signature_key,
                           signature=self.signer.sign(image if signed_data is None else signed_data),
                           update_data_url=url)

    def wait(self, thing: str, job_id: str, statuses: frozenset[str] | set[str] = FINAL,
             timeout: float = 60.0) -> ExecutionRecord:
        assert self.aws is not None
        try:
            return self.aws.wait_for_status(thing, job_id, set(statuses), timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- daemon log (tail) ---\n{self.daemon_log()[-6000:]}") from None

    def wait_until(self, what: str, condition: Any, timeout: float = 30.0, poll: float = 0.02) -> None:
        """Poll `condition()` until true; on timeout fail naming `what`, with the daemon's log tail."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n--- daemon log (tail) ---\n"
                                     f"{self.daemon_log()[-4000:]}")
            time.sleep(poll)

    # the daemon

    @property
    def broker_port_for_daemon(self) -> int:
        """The broker's port, or the WAN proxy's in front of it."""
        assert self.broker is not None
        return self.wan_proxy.port if self.wan_proxy is not None else self.broker.port

    def write_config(self, devices_file: Path | None = None) -> Path:
        """gateway.toml in `root`; the devices go into it, or into `devices_file` (in its devices.d)."""
        assert self.broker is not None
        ident = self.pki.client(self.gateway_thing)
        sections: dict[str, dict[str, Any]] = {
            "gateway": {"thing_name": self.gateway_thing, "state_dir": str(self.root / "state"),
                        "control_socket": str(self.root / "control.sock"), "log_level": "debug"},
            "mqtt": {"endpoint": self.broker.host, "port": self.broker_port_for_daemon, "ca_file": str(self.pki.ca_file),
                     "cert_file": str(ident.cert_file), "key_file": str(ident.key_file), "keepalive": 30},
            "signing": {"certificates": {CERTFILE: str(self.signer.cert_file)}},
        }
        for name, values in self.config.items():
            sections.setdefault(name, {}).update(values)
        devices = [d.settings for d in self.devices.values()]
        self.config_path = self.root / "gateway.toml"
        if devices_file is None:
            self.config_path.write_text(toml_text(sections, devices))
        else:
            self.config_path.write_text(toml_text(sections, []))
            devices_file.parent.mkdir(exist_ok=True)
            devices_file.write_text(toml_text({}, devices))
        return self.config_path

    def start_daemon(self, env: dict[str, str] | None = None, *, stderr: Any = None,
                     wrapper: list[str] | None = None) -> subprocess.Popen:
        """Start ota-gatewayd; its output goes to daemon.log unless `stderr` says otherwise.
        `wrapper` is a command that execs the daemon's command line (e.g. in another namespace)."""
        config = self.write_config()
        log = open(self.root / "daemon.log", "ab")
        with log:
            # OTA_GATEWAYD runs another daemon, e.g. the installed /usr/bin/ota-gatewayd
            command = os.environ.get("OTA_GATEWAYD", "").split() or [sys.executable, "-m", "gatewayd.daemon"]
            self.daemon = subprocess.Popen(
                [*(wrapper or []), *command, "--config", str(config), *self.daemon_args],
                stdout=log, stderr=subprocess.STDOUT if stderr is None else stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        return self.daemon

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.daemon is None:
            return None
        if self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            try:
                self.daemon.wait(timeout)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        code = self.daemon.returncode
        self.daemon = None
        return code

    def kill_daemon(self) -> None:
        self.stop_daemon(signal.SIGKILL)

    def ctl_command(self, *args: str) -> list[str]:
        """An ota-gatewayctl command line for this lab's config (OTA_GATEWAYCTL runs another one)."""
        assert self.config_path is not None, "start_daemon() first"
        command = os.environ.get("OTA_GATEWAYCTL", "").split() or [sys.executable, "-m", "gatewayd.ctl"]
        return [*command, "--config", str(self.config_path), *args]

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ctl_command(*args), capture_output=True, text=True, timeout=timeout)

    def wait_control(self, timeout: float = 20.0) -> None:
        """Wait until the daemon answers on its control socket."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.ctl("status", "--json")
            if status.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"ota-gatewayd did not answer `status`: {status.stderr}\n"
                                   f"--- daemon log (tail) ---\n{self.daemon_log()[-4000:]}")
            time.sleep(0.2)

    def daemon_log(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self.start_cloud()
        self.start_daemon()

    def close(self) -> None:
        self.stop_daemon()
        if self.s3:
            self.s3.stop()
        if self.wan_proxy:
            self._runner.call(self.wan_proxy.stop())
        if self.aws:
            self.aws.stop()
        if self.broker:
            self.broker.stop()
        for d in self.devices.values():
            try:
                self._runner.call(d.emulator.stop())
            except Exception:
                pass
        self._runner.stop()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_image(version: tuple[int, ...], size: int = 24 * 1024, seed: object = None) -> bytes:
    """A valid MCUboot image with a deterministic pseudo-random body."""
    rng = random.Random(f"{seed}-{version}-{size}")
    payload = rng.randbytes(size)
    return build_mcuboot_image(payload, version=(tuple(version) + (0, 0, 0, 0))[:4])


def image_sha256(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


def toml_text(sections: dict[str, dict[str, Any]], devices: list[dict[str, Any]]) -> str:
    """The text of a gateway.toml: its tables, then one [[device]] entry per device."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        lines.append("")
    for settings in devices:
        lines.append("[[device]]")
        lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
        lines.append("")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")
