"""The lab's BLE devices (`ota-gatewayctl lab start --ble-devices N`): what the machine needs for
them, and the bumble controller that serves them to the machine's own Bluetooth stack.

    ota-gatewayd -> bleak -> BlueZ (bluetoothd) -> kernel hciN <- /dev/vhci -> bumble controller
                                                                   ~~ LocalLink ~~ ble-1 .. ble-N

The controller on /dev/vhci (hci_vhci) becomes a new adapter of the kernel, hciN, which BlueZ
takes and the daemon uses as `[ble] adapter`; the devices are `EmulatedDevice`s served as SMP
GATT peripherals behind it (`ble_device.HostStackBench`). bumble is a test tool, never a
dependency of the package: this module imports it only when a lab with BLE devices starts, and
`missing()` tells what the machine lacks before anything is started.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VHCI = Path("/dev/vhci")
ADAPTERS = Path("/sys/class/bluetooth")  # hciN, one per adapter the kernel has
BLE_PREFIX = "ble-"
ADAPTER_ADDRESS = "F0:1A:B0:00:00:00"  # the controller's own (public) address
ADAPTER_TIMEOUT = 10.0  # seconds for the kernel to list the new adapter


def address_of(name: str) -> str:
    """ble-N's address, the same at every start (so gateway.toml and BlueZ's cache stay valid)."""
    return f"F0:1A:B0:00:00:{int(name.removeprefix(BLE_PREFIX)):02X}"


def missing(vhci: Path = VHCI, proc: Path = Path("/proc"),
            find_spec: Callable[[str], Any] = importlib.util.find_spec) -> list[str]:
    """What this machine lacks to serve BLE devices to its own Bluetooth stack, each with what
    brings it; empty when nothing is missing."""
    lacks = []
    if not vhci.exists():
        lacks.append(f"{vhci}, the kernel's virtual HCI device (modprobe hci_vhci; a kernel with Bluetooth)")
    elif not os.access(vhci, os.R_OK | os.W_OK):
        lacks.append(f"read and write access to {vhci} (run the lab as root)")
    if find_spec("bumble") is None:
        lacks.append(f"bumble for {sys.executable} (pip install bumble: a test tool, not a dependency of "
                     "ota-gateway)")
    if not bluetoothd_running(proc):
        lacks.append("BlueZ's bluetoothd running (apt-get install bluez; systemctl start bluetooth)")
    return lacks


def bluetoothd_running(proc: Path = Path("/proc")) -> bool:
    for comm in proc.glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "bluetoothd":
                return True
        except OSError:  # the process ended while we looked
            continue
    return False


def adapters() -> set[str]:
    try:
        return {p.name for p in ADAPTERS.iterdir() if p.name.startswith("hci") and ":" not in p.name}
    except FileNotFoundError:
        return set()


class LabRadio:
    """The lab's BLE devices behind one bumble controller on /dev/vhci, on the lab's device
    loop (`on_loop(coroutine, timeout)` runs it there and returns its result)."""

    def __init__(self, on_loop: Callable[..., Any]) -> None:
        self._on_loop = on_loop
        self.adapter: str | None = None  # the kernel's name for it, once started
        self._world: Any = None  # ble_device.HostStackBench

    def start(self) -> str:
        """Open /dev/vhci and return the adapter the kernel made of it (hciN); RuntimeError
        when it cannot."""
        try:
            from .ble_device import HostStackBench
        except ImportError as e:
            raise RuntimeError(f"BLE devices need bumble for {sys.executable}: {e} (pip install bumble)") from None
        # bumble's controller warns of ACL data for a link already gone, as at every device reset:
        # noise on the lab's console
        logging.getLogger("bumble.controller").setLevel(logging.ERROR)
        self._world = HostStackBench(transport=f"vhci:{VHCI}", address=ADAPTER_ADDRESS)
        self._on_loop(self._world.start())
        adapter = f"hci{self._on_loop(self._world.adapter_index(ADAPTER_TIMEOUT), ADAPTER_TIMEOUT + 1)}"
        deadline = time.monotonic() + ADAPTER_TIMEOUT
        while adapter not in adapters():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the kernel made {adapter} of {VHCI} but does not list it in {ADAPTERS}")
            time.sleep(0.05)
        self.adapter = adapter
        return adapter

    def add(self, device: Any, address: str) -> None:
        """Serve `device` (an EmulatedDevice on the lab's loop) as a GATT peripheral at `address`."""
        self._on_loop(self._world.add(device, address, mtu=517))

    def close(self) -> None:
        """The peripherals stop and the controller goes: the kernel removes the adapter."""
        if self._world is not None:
            world, self._world = self._world, None
            self._on_loop(world.close())
