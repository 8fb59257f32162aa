"""sd_notify for Type=notify: READY, STATUS, WATCHDOG, STOPPING, RELOADING.

A pure-Python sender: it behaves exactly like systemd.daemon.notify (one datagram to
$NOTIFY_SOCKET, `@` meaning the abstract namespace) and needs no optional package.
Everything is a no-op returning False when not run by systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock: and other forms are not used by our unit


def notify(state: str) -> bool:
    """Send `state` (newline-separated VAR=value assignments); True if it was delivered."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = _address(target)
    if address is None:
        log.debug("unsupported NOTIFY_SOCKET %r", target)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", target, e)
        return False
    return True


def _one_line(text: str) -> str:
    # a newline would start a new assignment
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status is not None else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status is not None else ""))


def reloading() -> bool:
    """Before re-reading the configuration (SIGHUP); send ready() when done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None if not watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # meant for another process (e.g. our parent)
        except ValueError:
            return None
    try:
        period = int(usec)
    except ValueError:
        return None
    if period <= 0:
        return None
    return period / 2 / 1_000_000
