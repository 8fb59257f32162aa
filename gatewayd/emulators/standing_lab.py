"""A lab that stays up: the bench behind `ota-gatewayctl lab`, kept in one folder.

`Lab` builds a world for one test and throws it away; `StandingLab` builds the same world
(mosquitto with mutual TLS, the AWS IoT emulator, SMP devices on ptys, the signer) in a folder
it keeps, so that a daemon and a user's scripts can use it for as long as it runs and again
after it is started anew:

    DIR/lab.json              the broker's port and the devices (kept, so gateway.toml stays valid)
    DIR/gateway.toml          for ota-gatewayd; devices in DIR/devices.d/lab.toml
    DIR/pki/, DIR/signer/     the CA, the identities and the code-signing key, made once
    DIR/tty/<device>          each UART device's pty
    DIR/flash/<device>.slotN  what each device had in flash when the lab last stopped
    DIR/daemon/               the daemon's state and control socket

When the lab runs as root and the packaged `ota-gateway` account exists, the files the daemon
reads are shared with it as the package expects (group-readable key, ptys in group dialout,
DIR/daemon owned by it), so the installed daemon may run as that user against the lab.

BLE devices (`ble-1` ..), where the machine can serve them to its own Bluetooth stack, are
served by bumble behind a controller on /dev/vhci (`lab_ble`); bumble is imported only then.
"""

from __future__ import annotations

import fcntl
import grp
import json
import logging
import os
import pwd
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .awsiot import ExecutionRecord
from .lab import CERTFILE, FINAL, Lab
from .lab_ble import BLE_PREFIX, LabRadio, address_of
from .smp_device import EmulatedDevice, parse_mcuboot_image

log = logging.getLogger(__name__)

DAEMON_USER = "ota-gateway"
SERIAL_GROUP = "dialout"
DEVICE_PREFIX = "dev-"
MAX_DEVICES = 64
MAX_BLE_DEVICES = 16  # each advertises every 20 ms to the one adapter
SLOT_SIZE = 1024 * 1024  # each emulated device's flash slot: the largest image a job may carry
VALID_DAYS = 3650  # a bench CA, on 127.0.0.1 only, that should not expire under a user's CI
_JOB_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class LabError(Exception):
    """The lab cannot do what was asked; the message says what was wrong."""


@dataclass(frozen=True)
class LabPaths:
    """Where a lab keeps each thing in its folder."""

    root: Path

    @property
    def settings(self) -> Path:
        return self.root / "lab.json"

    @property
    def socket(self) -> Path:
        return self.root / "lab.sock"

    @property
    def lock(self) -> Path:
        return self.root / "lab.lock"

    @property
    def config(self) -> Path:
        return self.root / "gateway.toml"

    @property
    def devices_file(self) -> Path:
        return self.root / "devices.d" / "lab.toml"

    @property
    def daemon_dir(self) -> Path:
        return self.root / "daemon"

    @property
    def control_socket(self) -> Path:
        return self.daemon_dir / "control.sock"

    def flash(self, device: str, slot: int) -> Path:
        return self.root / "flash" / f"{device}.slot{slot}"


@dataclass(frozen=True)
class LabSettings:
    """What must stay the same from one start to the next for gateway.toml to stay valid."""

    port: int
    devices: tuple[str, ...]  # UART devices
    ble_devices: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> LabSettings | None:
        """The settings saved at `path`, or None when there are none yet."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise LabError(f"{path}: cannot read the lab's settings ({e}); remove it to start anew") from None
        port, devices, ble = ((data.get("port"), data.get("devices"), data.get("ble_devices", []))
                              if isinstance(data, dict) else (None, None, None))
        if not _is_port(port) or not _is_names(devices) or not _is_names(ble):
            raise LabError(f'{path}: expected {{"port": 1..65535, "devices": [names], "ble_devices": [names]}}, '
                           f"got {data!r}; remove it to start anew")
        return cls(port, tuple(devices), tuple(ble))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"port": self.port, "devices": list(self.devices),
                                    "ble_devices": list(self.ble_devices)}, indent=2) + "\n")

    @property
    def all_devices(self) -> tuple[str, ...]:
        return self.devices + self.ble_devices


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, str) for d in value)


def device_names(count: int, *, least: int = 1) -> tuple[str, ...]:
    """dev-1 .. dev-N; `least` 0 when the lab has BLE devices."""
    if not least <= count <= MAX_DEVICES:
        raise LabError(f"--devices must be {least}..{MAX_DEVICES}" + (" (0 only with --ble-devices)" if least else "")
                       + f", got {count}")
    return tuple(f"{DEVICE_PREFIX}{n}" for n in range(1, count + 1))


def ble_device_names(count: int) -> tuple[str, ...]:
    if not 0 <= count <= MAX_BLE_DEVICES:
        raise LabError(f"--ble-devices must be 0..{MAX_BLE_DEVICES}, got {count}")
    return tuple(f"{BLE_PREFIX}{n}" for n in range(1, count + 1))


def choose_settings(saved: LabSettings | None, *, devices: int | None, port: int | None,
                    free_port: int, ble_devices: int | None = None) -> LabSettings:
    """This start's settings: what was asked, else what was saved, else the defaults (2 UART
    devices, no BLE device, a port free now that is then kept)."""
    if port is not None and not _is_port(port):
        raise LabError(f"--port must be 1..65535, got {port}")
    ble = ble_device_names(ble_devices) if ble_devices is not None else saved.ble_devices if saved else ()
    least = 0 if ble else 1
    names = (device_names(devices, least=least) if devices is not None else saved.devices if saved
             else device_names(2))
    if not names and not ble:
        raise LabError("the lab needs a device: --devices or --ble-devices at least 1")
    return LabSettings(port or (saved.port if saved else free_port), names, ble)


def new_job_id(now: float | None = None) -> str:
    """Unique across lab starts, as the daemon remembers job ids it has finished."""
    return f"lab-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class FlashImages:
    """A device's two slots as MCUboot would leave them after a power cycle."""

    slot0: bytes
    slot1: bytes

    @classmethod
    def after_power_cycle(cls, swap_type: str, slot0: bytes, slot1: bytes) -> FlashImages:
        # "perm": slot 1 is swapped in for good; "revert": the unconfirmed test image in slot 0
        # is swapped back out; "test" would boot slot 1 once and revert it, as nothing confirms it
        if swap_type in ("perm", "revert"):
            return cls(slot1, slot0)
        return cls(slot0, slot1)


class LabLock:
    """One lab per folder: an exclusive lock on DIR/lab.lock, held while the lab runs, with its pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LabError(f"a lab already runs in {self.path.parent} (pid {self.holder() or '?'})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with the descriptor
            self._fd = None

    def held_by_another(self) -> bool:
        """Whether a running lab holds the lock (probing takes it for an instant when free)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None


# ------------------------------------------------------------------ the daemon's account


@dataclass(frozen=True)
class DaemonAccount:
    """The packaged daemon's user, for whom a lab run by root prepares its files."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]
    serial_gid: int | None  # group dialout, which opens serial ports

    @classmethod
    def find(cls, name: str = DAEMON_USER) -> DaemonAccount | None:
        """The account, when this process is root (only root can give it files) and it exists."""
        if os.geteuid() != 0:
            return None
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            return None
        try:
            serial_gid: int | None = grp.getgrnam(SERIAL_GROUP).gr_gid
        except KeyError:
            serial_gid = None
        groups = frozenset(os.getgrouplist(name, user.pw_gid))
        return cls(name, user.pw_uid, user.pw_gid, groups, serial_gid)

    def may(self, path: Path, bits: int) -> bool:
        """Whether the account has the permission `bits` (4 read, 2 write, 1 search) on `path`,
        by the file's owner, group and mode, as the kernel decides without ACLs."""
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode)
        shift = 6 if st.st_uid == self.uid else 3 if st.st_gid in self.groups else 0
        return (mode >> shift) & bits == bits

    def lacks(self, path: Path, bits: int) -> str | None:
        """Why the account cannot use `path` with `bits` (4 read, 2 write, 1 search): the first
        folder above it that it cannot enter, or the file itself; None when it can."""
        path = Path(os.path.abspath(path))
        for folder in reversed(path.parents):
            if not self.may(folder, 1):
                return f"{self.name} cannot enter {folder}"
        real = Path(os.path.realpath(path))
        if not self.may(real, bits):
            wanted = "/".join(word for bit, word in ((4, "read"), (2, "write"), (1, "enter")) if bits & bit)
            return f"{self.name} cannot {wanted} {real}"
        return None


def share_key(path: Path, account: DaemonAccount | None) -> None:
    """A private key the daemon reads: its group's members may read it, nobody else."""
    if account is not None:
        os.chown(path, -1, account.gid)
        os.chmod(path, 0o640)


def give_folder(path: Path, account: DaemonAccount | None) -> None:
    """A folder the daemon writes in (its state, its control socket)."""
    path.mkdir(mode=0o750, exist_ok=True)
    if account is not None:
        os.chown(path, account.uid, account.gid)
        os.chmod(path, 0o750)


def share_serial_port(tty: Path, account: DaemonAccount | None) -> None:
    """A pty opened the way the daemon opens /dev/ttyACM0: as a member of group dialout."""
    if account is not None and account.serial_gid is not None:
        os.chown(tty, -1, account.serial_gid)
        os.chmod(tty, 0o660)


# ------------------------------------------------------------------ the lab


@dataclass(frozen=True)
class JobCreated:
    job_id: str
    things: tuple[str, ...]
    filepath: str
    size: int
    version: str | None  # None: not an MCUboot image (the gateway will reject the job)


class StandingLab:
    """A Lab in a kept folder: devices whose flash outlives the process, and jobs by name."""

    def __init__(self, paths: LabPaths, settings: LabSettings, account: DaemonAccount | None) -> None:
        self.paths, self.settings, self.account = paths, settings, account
        self.lab = Lab(paths.root, broker_port=settings.port, valid_days=VALID_DAYS)
        self.lab.config["gateway"] = {"state_dir": str(paths.daemon_dir / "state"),
                                      "control_socket": str(paths.control_socket), "log_level": "info"}
        self.restored: list[str] = []  # devices whose flash came from an earlier run
        self.forgotten: dict[str, str] = {}  # device -> why its saved flash could not be used
        self.radio: LabRadio | None = None  # the BLE devices' controller, when there are any

    @property
    def made_keys(self) -> bool:
        return self.lab.made_keys

    @property
    def signer_certificate(self) -> Path:
        return self.lab.signer.cert_file

    def start(self) -> None:
        """Devices, broker, AWS IoT emulator, and the files the daemon reads."""
        for name in self.settings.devices:
            self._add_device(name)
        if self.settings.ble_devices:
            self._add_ble_devices()
        self.lab.start_cloud()
        self.lab.write_config(devices_file=self.paths.devices_file)
        share_key(self.lab.pki.client(self.lab.gateway_thing).key_file, self.account)
        give_folder(self.paths.daemon_dir, self.account)
        self.settings.save(self.paths.settings)

    def _add_device(self, name: str) -> None:
        saved = self._saved_flash(name)
        slots = {"image": saved.slot0, "slot1": saved.slot1} if saved else {}
        self.lab.add_device(name, thing_name=name, slot_size=SLOT_SIZE, **slots)
        link = self.lab.devices[name].link
        assert link is not None
        share_serial_port(Path(os.path.realpath(link)), self.account)

    def _add_ble_devices(self) -> None:
        self.radio = LabRadio(self.lab.on_device_loop)
        self.lab.config["ble"] = {"adapter": self.radio.start()}
        for name in self.settings.ble_devices:
            saved = self._saved_flash(name)
            slots = {"image": saved.slot0, "slot1": saved.slot1} if saved else {}
            # as a Zephyr device with CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY and a flash write per request
            device = self.lab.add_ble_device(name, address_of(name), thing_name=name, link={"reassembly": True},
                                             slot_size=SLOT_SIZE, buf_size=2475, reset_delay=0.5,
                                             boot_banner=False, **slots)
            self.radio.add(device, address_of(name))

    def _saved_flash(self, name: str) -> FlashImages | None:
        files = [self.paths.flash(name, slot) for slot in (0, 1)]
        if not files[0].exists():
            return None
        try:
            images = FlashImages(files[0].read_bytes(), files[1].read_bytes() if files[1].exists() else b"")
            parse_mcuboot_image(images.slot0)
        except (OSError, ValueError) as e:
            self.forgotten[name] = f"{files[0]}: {e}"
            return None
        self.restored.append(name)
        return images

    def close(self) -> None:
        """Keep what each device has in flash, then stop everything."""
        for name, device in self.lab.devices.items():
            try:
                self._save_flash(name, device.emulator)
            except OSError as e:
                self.forgotten[name] = f"not saved: {e}"
        if self.radio is not None:
            try:
                self.radio.close()
            except Exception as e:  # the broker and the devices must stop all the same
                log.warning("the BLE controller did not close cleanly: %r", e)
        self.lab.close()

    def _save_flash(self, name: str, device: EmulatedDevice) -> None:
        images = self.lab.on_device_loop(lambda: FlashImages.after_power_cycle(
            device.swap_type, device.slot_image(0), device.slot_image(1)))
        self.paths.flash(name, 0).parent.mkdir(mode=0o700, exist_ok=True)
        for slot, data in enumerate((images.slot0, images.slot1)):
            self.paths.flash(name, slot).write_bytes(data)

    # jobs

    def check_job(self, devices: list[str], filepath: str, size: int, job_id: str | None) -> str:
        """The job's id, once what was asked is possible (before any file is sent)."""
        unknown = [d for d in devices if d not in self.lab.devices]
        if not devices or unknown:
            raise LabError(f"no device {', '.join(unknown) or '(none given)'} in this lab; it has "
                           f"{', '.join(self.lab.devices)}")
        job_id = job_id or new_job_id()
        if not _JOB_ID.fullmatch(job_id):
            raise LabError(f"job id {job_id!r}: AWS IoT takes 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if job_id in {ex.job_id for ex in self.executions()}:
            raise LabError(f"job id {job_id!r} is taken in this lab")
        if not 0 < size <= SLOT_SIZE:
            raise LabError(f"{filepath} is {size} bytes; the lab's devices take 1 to {SLOT_SIZE} bytes")
        return job_id

    def create_job(self, devices: list[str], filepath: str, data: bytes, job_id: str | None = None) -> JobCreated:
        """A signed OTA update of `data` for each device's thing, as CreateOTAUpdate makes it."""
        job_id = self.check_job(devices, filepath, len(data), job_id)
        things = tuple(self.lab.devices[d].settings["thing_name"] for d in devices)
        self.lab.ota_update(job_id, list(things), data, filepath=filepath, certfile=CERTFILE)
        return JobCreated(job_id, things, filepath, len(data), _version(data))

    def executions(self, job_id: str | None = None) -> list[ExecutionRecord]:
        return self.lab.aws.execution_states(job_id) if self.lab.aws is not None else []

    def status(self) -> dict[str, Any]:
        """The lab, its devices with their slots, and every job execution, as plain data."""
        assert self.lab.broker is not None
        devices = [self._device_status(name) for name in self.lab.devices]
        executions = [{"job_id": ex.job_id, "thing": ex.thing, "status": ex.status,
                       "status_details": dict(ex.status_details), "final": ex.status in FINAL}
                      for ex in self.executions()]
        return {"dir": str(self.paths.root), "pid": os.getpid(),
                "broker": f"{self.lab.broker.host}:{self.lab.broker.port}",
                "gateway_thing": self.lab.gateway_thing, "config": str(self.paths.config),
                "certfile": CERTFILE, "signer_certificate": str(self.signer_certificate),
                "devices": devices, "executions": executions}

    def _device_status(self, name: str) -> dict[str, Any]:
        device = self.lab.devices[name]
        slots = self.lab.on_device_loop(lambda: device.emulator.slots)
        link: dict[str, Any] = ({"transport": "uart", "port": str(device.link), "tty": device.emulator.tty_name}
                                if device.link is not None else
                                {"transport": "ble", "port": None, "address": device.settings["address"],
                                 "adapter": self.radio.adapter if self.radio else None})
        return {"name": name, "thing": device.settings.get("thing_name"), **link,
                "slots": [{"slot": s.slot, "version": s.version, "active": s.active, "confirmed": s.confirmed,
                           "pending": s.pending} for s in slots]}


def _version(data: bytes) -> str | None:
    try:
        return parse_mcuboot_image(data).version_str
    except ValueError:
        return None
